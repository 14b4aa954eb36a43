//! The object store behind the fake API server: objects by resource, one global
//! resourceVersion, the event log watches replay, and the write semantics of the real API
//! server (create, update with preconditions, status subresource, generation, finalizers,
//! owner-reference cascade). Nothing here panics on a request's input: failures are [`ApiError`]s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::pods::{new_uid, now_rfc3339};
use crate::registry::{Registry, ResId, ResourceType};
pub(crate) use crate::writes::{DeleteOpts, Deleted, Part};
use crate::{RequestCounts, WriteCounts};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// A stored object and its JSON, serialized once when it is written: list pages and watch events
/// are built from the bytes (as the API server's watch cache keeps serialized objects), so the
/// server's share of a large list stays small next to the client's.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) value: Value,
    pub(crate) json: Bytes,
}

impl Stored {
    pub(crate) fn new(value: Value) -> Arc<Self> {
        let json = Bytes::from(value.to_string());
        Arc::new(Stored { value, json })
    }
}

/// One logged mutation: the object after it (for a delete: the final object) and before it.
#[derive(Debug)]
pub(crate) struct LogEntry {
    pub(crate) rv: u64,
    pub(crate) ty: EventType,
    pub(crate) res: ResId,
    pub(crate) ns: String,
    pub(crate) obj: Arc<Stored>,
    pub(crate) prev: Option<Arc<Stored>>,
}

/// The objects a paged list is served from: every object of the list's resource and namespace
/// scope when its first page was asked for, in key order, and that moment's resourceVersion.
pub(crate) struct Snapshot {
    pub(crate) rv: u64,
    pub(crate) items: Arc<Vec<Arc<Stored>>>,
}

/// What open watch streams are told.
#[derive(Clone, Debug)]
pub(crate) enum Signal {
    Event(Arc<LogEntry>),
    Bookmark,
    Drop,
}

/// A failed request, answered as a `metav1.Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    /// `details`: name, group and kind of the object concerned, when there is one.
    pub(crate) details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} {name:?} not found", rt.name())).about(rt, name)
    }

    pub(crate) fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} {name:?}: {why}",
            rt.name()
        );
        Self::new(409, "Conflict", msg).about(rt, name)
    }

    pub(crate) fn modified(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(crate) fn already_exists(rt: &ResourceType, name: &str) -> Self {
        let msg = format!("{} {name:?} already exists", rt.name());
        Self::new(409, "AlreadyExists", msg).about(rt, name)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }
}

/// Injected failures for one resource.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Faults {
    pub(crate) conflicts: u32,
    pub(crate) errors: u32,
}

pub(crate) type Key = (String, String);

pub(crate) struct State {
    pub(crate) rv: u64,
    /// Watches from a resourceVersion below this get 410 Expired.
    pub(crate) compacted: u64,
    pub(crate) registry: Registry,
    objects: HashMap<ResId, BTreeMap<Key, Arc<Stored>>>,
    pub(crate) log: Vec<Arc<LogEntry>>,
    /// Paged lists in flight, by the id their continue tokens carry; oldest first.
    pub(crate) snapshots: BTreeMap<u64, Snapshot>,
    pub(crate) next_snapshot: u64,
    pub(crate) counts: RequestCounts,
    pub(crate) requests: Vec<String>,
    /// Every write request, in order.
    pub(crate) write_log: Vec<crate::WriteRecord>,
    /// Time spent building and serializing list responses (not sending them).
    pub(crate) list_time: Duration,
    pub(crate) faults: HashMap<ResId, Faults>,
    pub(crate) writes: HashMap<ResId, WriteCounts>,
    /// Stored objects with owner references: the cascade scan is skipped while there are none.
    owned: usize,
    signals: broadcast::Sender<Signal>,
}

fn meta(v: &Value) -> &Value {
    &v["metadata"]
}

pub(crate) fn str_at<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v["metadata"][field].as_str().filter(|s| !s.is_empty())
}

fn has_owners(v: &Value) -> bool {
    meta(v)["ownerReferences"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
}

pub(crate) fn has_finalizers(v: &Value) -> bool {
    meta(v)["finalizers"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
}

/// Whether two objects differ outside `metadata` and `status` (what bumps `generation`).
fn spec_changed(a: &Value, b: &Value) -> bool {
    let empty = Map::new();
    let a = a.as_object().unwrap_or(&empty);
    let b = b.as_object().unwrap_or(&empty);
    let skip = |k: &String| !matches!(k.as_str(), "metadata" | "status");
    let count = |m: &Map<String, Value>| m.keys().filter(|k| skip(k)).count();
    count(a) != count(b)
        || a.iter()
            .filter(|(k, _)| skip(k))
            .any(|(k, v)| b.get(k) != Some(v))
}

/// An object without the fields every write changes, to tell a no-op update.
pub(crate) fn comparable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("generation");
    }
    v
}

impl State {
    pub(crate) fn new(signals: broadcast::Sender<Signal>) -> Self {
        Self {
            rv: 0,
            compacted: 0,
            registry: Registry::default(),
            objects: HashMap::new(),
            log: Vec::new(),
            snapshots: BTreeMap::new(),
            next_snapshot: 0,
            counts: RequestCounts::default(),
            requests: Vec::new(),
            write_log: Vec::new(),
            list_time: Duration::ZERO,
            faults: HashMap::new(),
            writes: HashMap::new(),
            owned: 0,
            signals,
        }
    }

    pub(crate) fn objects(&self, res: ResId) -> impl Iterator<Item = &Arc<Stored>> {
        self.objects.get(&res).into_iter().flat_map(|m| m.values())
    }

    pub(crate) fn object(&self, res: ResId, ns: &str, name: &str) -> Option<&Arc<Stored>> {
        self.objects
            .get(&res)?
            .get(&(ns.to_string(), name.to_string()))
    }

    /// The namespace key an object of `res` is stored under.
    pub(crate) fn ns_key(&self, res: ResId, ns: Option<&str>) -> String {
        if self.registry.get(res).namespaced {
            ns.unwrap_or("default").to_string()
        } else {
            String::new()
        }
    }

    fn record(&mut self, entry: LogEntry) {
        let entry = Arc::new(entry);
        self.log.push(entry.clone());
        // Sent under the lock so every watch sees events in resourceVersion order.
        let _ = self.signals.send(Signal::Event(entry));
    }

    /// Stores an object as given (a test-side write, or the last step of an API write): new
    /// resourceVersion, `kind`/`apiVersion` if missing, `uid` and `creationTimestamp` kept from
    /// the stored object (or filled in), `generation` 1 at first and bumped when anything
    /// outside `metadata` and `status` changes; emits `ADDED` or `MODIFIED`.
    /// The caller has checked `metadata.name`.
    pub(crate) fn put(
        &mut self,
        res: ResId,
        ns: String,
        name: String,
        mut obj: Value,
    ) -> Arc<Stored> {
        self.rv += 1;
        let rv = self.rv;
        let key = (ns.clone(), name);
        let prev = self.objects.get(&res).and_then(|m| m.get(&key)).cloned();
        let rt = self.registry.get(res);
        if obj.get("kind").and_then(Value::as_str).is_none() {
            obj["kind"] = json!(rt.kind);
        }
        if obj.get("apiVersion").and_then(Value::as_str).is_none() {
            obj["apiVersion"] = json!(rt.api_version());
        }
        let generation = match &prev {
            Some(p) => {
                let old = p.value["metadata"]["generation"].as_i64().unwrap_or(1);
                old + i64::from(spec_changed(&p.value, &obj))
            }
            None => obj["metadata"]["generation"].as_i64().unwrap_or(1),
        };
        let m = &mut obj["metadata"];
        if rt.namespaced {
            m["namespace"] = json!(ns);
        } else if let Some(m) = m.as_object_mut() {
            m.remove("namespace");
        }
        m["resourceVersion"] = json!(rv.to_string());
        m["generation"] = json!(generation);
        if let Some(prev) = &prev {
            m["uid"] = prev.value["metadata"]["uid"].clone();
            m["creationTimestamp"] = prev.value["metadata"]["creationTimestamp"].clone();
        } else {
            if m["uid"].as_str().is_none() {
                m["uid"] = json!(new_uid());
            }
            if m["creationTimestamp"].as_str().is_none() {
                m["creationTimestamp"] = json!(now_rfc3339());
            }
        }
        self.owned += usize::from(has_owners(&obj));
        let was_owned = prev.as_ref().is_some_and(|p| has_owners(&p.value));
        self.owned = self.owned.saturating_sub(usize::from(was_owned));
        let stored = Stored::new(obj);
        self.objects
            .entry(res)
            .or_default()
            .insert(key.clone(), Arc::clone(&stored));
        let ty = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let obj = Arc::clone(&stored);
        self.record(LogEntry {
            rv,
            ty,
            res,
            ns: key.0,
            obj,
            prev,
        });
        stored
    }

    /// Removes an object at once (no finalizers consulted); emits `DELETED` with the final
    /// object at a new resourceVersion; with `cascade`, then deletes its dependents like the
    /// garbage collector.
    pub(crate) fn remove(
        &mut self,
        res: ResId,
        ns: &str,
        name: &str,
        cascade: bool,
    ) -> Option<Value> {
        self.remove_as(res, ns, name, None, cascade)
    }

    /// [`remove`](Self::remove), the final object being `last` (default: the stored one).
    pub(crate) fn remove_as(
        &mut self,
        res: ResId,
        ns: &str,
        name: &str,
        last: Option<Value>,
        cascade: bool,
    ) -> Option<Value> {
        let key = (ns.to_string(), name.to_string());
        let prev = self.objects.get_mut(&res)?.remove(&key)?;
        self.owned = self
            .owned
            .saturating_sub(usize::from(has_owners(&prev.value)));
        self.rv += 1;
        let rv = self.rv;
        let mut obj = last.unwrap_or_else(|| prev.value.clone());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let entry = LogEntry {
            rv,
            ty: EventType::Deleted,
            res,
            ns: key.0,
            obj: Stored::new(obj.clone()),
            prev: Some(prev),
        };
        self.record(entry);
        if cascade {
            if let Some(uid) = str_at(&obj, "uid") {
                self.collect_dependents(uid);
            }
        }
        Some(obj)
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .flat_map(|m| m.values())
            .any(|o| str_at(&o.value, "uid") == Some(uid))
    }

    /// The garbage collector, synchronously: every object owned by `uid` whose owners are now
    /// all gone is deleted (finalizers honoured, cascading further).
    fn collect_dependents(&mut self, uid: &str) {
        if self.owned == 0 {
            return;
        }
        let mut dependents = Vec::new();
        for (res, objects) in &self.objects {
            for ((ns, name), o) in objects {
                let owners = o.value["metadata"]["ownerReferences"].as_array();
                let uids: Vec<&str> = owners
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["uid"].as_str())
                    .collect();
                if uids.contains(&uid) {
                    let others: Vec<String> = uids
                        .iter()
                        .filter(|u| **u != uid)
                        .map(|u| u.to_string())
                        .collect();
                    dependents.push((*res, ns.clone(), name.clone(), others));
                }
            }
        }
        for (res, ns, name, others) in dependents {
            if others.iter().any(|u| self.uid_exists(u)) {
                continue;
            }
            let _ = self.delete(res, &ns, &name, &DeleteOpts::default());
        }
    }

    /// An injected failure for the next write to `res`, if one is pending.
    pub(crate) fn take_fault(&mut self, res: ResId) -> Option<ApiError> {
        let f = self.faults.get_mut(&res)?;
        let rt = self.registry.get(res);
        if f.conflicts > 0 {
            f.conflicts -= 1;
            return Some(ApiError::modified(rt, "(injected)"));
        }
        if f.errors > 0 {
            f.errors -= 1;
            return Some(ApiError::internal("injected internal error"));
        }
        None
    }

    pub(crate) fn writes(&mut self, res: ResId) -> &mut WriteCounts {
        self.writes.entry(res).or_default()
    }
}
