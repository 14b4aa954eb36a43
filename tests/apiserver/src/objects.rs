//! The test side of [`FakeApiServer`]: reading and writing objects directly (no HTTP), the
//! resource table, injected faults and the write counters.
//!
//! Resources are named as kubectl names them: a plural (`sandboxes`, `leases`), or
//! `plural.group` where several groups share a plural (`events` is the core group's,
//! `events.events.k8s.io` the other). These helpers panic on an unknown resource or an object
//! without `metadata.name`: a test bug, not a server path.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::registry::{ResId, ResourceType};
use crate::store::{str_at, DeleteOpts, Deleted, State};
use crate::{FakeApiServer, WriteCounts};

fn resolve(st: &State, resource: &str) -> ResId {
    st.registry
        .by_name(resource)
        .unwrap_or_else(|| panic!("FakeApiServer: unknown resource {resource:?}"))
}

impl FakeApiServer {
    /// Adds a resource to the table (or replaces the one with the same group, version and
    /// plural): it is then served, listed in discovery and usable in these helpers.
    pub fn register_resource(&self, rt: ResourceType) {
        self.shared.lock().registry.register(rt);
    }

    /// Every resource served.
    pub fn resources(&self) -> Vec<ResourceType> {
        self.shared.lock().registry.types.clone()
    }

    /// Creates or replaces an object as given, bypassing the API's write rules (status,
    /// preconditions, finalizers): how a test sets up state, or plays a kubelet or another
    /// controller. Keyed by `metadata.namespace` (default `default`; ignored for cluster-scoped
    /// resources) and `metadata.name`; emits `ADDED` or `MODIFIED`. An update keeps the stored
    /// `uid` and `creationTimestamp`, like the API server; `generation` starts at 1 and is
    /// bumped when anything outside `metadata` and `status` changes; `kind` and `apiVersion`
    /// are filled in if missing. Returns the stored object with its new `resourceVersion`.
    ///
    /// # Panics
    /// On an unknown resource, or an object without `metadata.name`.
    pub fn apply_object(&self, resource: &str, obj: Value) -> Value {
        let mut st = self.shared.lock();
        let res = resolve(&st, resource);
        apply_locked(&mut st, res, obj).value.clone()
    }

    /// The stored object (`ns` is ignored for cluster-scoped resources).
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn get_object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        let res = resolve(&st, resource);
        let ns = st.ns_key(res, Some(ns));
        st.object(res, &ns, name).map(|o| o.value.clone())
    }

    /// Every stored object of a resource, by namespace and name.
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn list_objects(&self, resource: &str) -> Vec<Value> {
        let st = self.shared.lock();
        let res = resolve(&st, resource);
        st.objects(res).map(|o| o.value.clone()).collect()
    }

    /// Deletes an object as an API `DELETE` would (not counted as a write): with finalizers it
    /// only gets a `deletionTimestamp` (`MODIFIED`) and is returned as it now is; otherwise it is
    /// removed (`DELETED`, the final object returned) and its dependents (objects whose
    /// `ownerReferences` name its uid) are deleted the same way. `None` if there was no such
    /// object.
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn delete_object(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.shared.lock();
        let res = resolve(&st, resource);
        let ns = st.ns_key(res, Some(ns));
        match st.delete(res, &ns, name, &DeleteOpts::default()).ok()? {
            Deleted::Pending(obj) => Some(obj.value.clone()),
            Deleted::Gone(obj) => Some(obj),
        }
    }

    /// The next `n` API writes (create, update, patch, delete, of the object or a subresource)
    /// to `resource` answer 409 `Conflict` without applying, as when another writer got there
    /// first. Adds to any still pending.
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn inject_conflicts(&self, resource: &str, n: u32) {
        let mut st = self.shared.lock();
        let res = resolve(&st, resource);
        st.faults.entry(res).or_default().conflicts += n;
    }

    /// The next `n` API writes to `resource` answer 500 `InternalError` without applying
    /// (after any pending injected conflicts). Reads are not affected.
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn inject_errors(&self, resource: &str, n: u32) {
        let mut st = self.shared.lock();
        let res = resolve(&st, resource);
        st.faults.entry(res).or_default().errors += n;
    }

    /// Every request waits this long before it is served (`Duration::ZERO`: none).
    pub fn set_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency.store(nanos, Ordering::Relaxed);
    }

    /// Live watch events reach open watches this much later than the change (as an informer
    /// lags behind the store), in order; gets and lists stay current, and events replayed when
    /// a watch opens are not delayed. Applies to events that happen after the call.
    pub fn set_watch_lag(&self, lag: Duration) {
        let nanos = u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX);
        self.shared.watch_lag.store(nanos, Ordering::Relaxed);
    }

    /// API writes received so far, by resource ([`ResourceType::name`]: `pods`,
    /// `sandboxes.sandboxgateway.io`, …); resources never written to are absent.
    pub fn write_counts(&self) -> BTreeMap<String, WriteCounts> {
        let st = self.shared.lock();
        st.writes
            .iter()
            .map(|(res, w)| (st.registry.get(*res).name(), *w))
            .collect()
    }

    /// API writes received so far to one resource.
    ///
    /// # Panics
    /// On an unknown resource.
    pub fn write_counts_for(&self, resource: &str) -> WriteCounts {
        let st = self.shared.lock();
        let res = resolve(&st, resource);
        st.writes.get(&res).copied().unwrap_or_default()
    }

    /// Creates or updates a Pod: [`apply_object`](Self::apply_object) for `pods`.
    ///
    /// # Panics
    /// If the object has no `metadata.name` (a test bug, not a server path).
    pub fn apply(&self, pod: Value) -> Value {
        self.apply_object("pods", pod)
    }

    /// [`apply`](Self::apply) for many pods at once, under one lock, without handing each stored
    /// object back: how a test fills the server with 100k pods quickly. Every pod still gets its
    /// own resourceVersion and event (a watch open meanwhile that cannot keep up is closed, as
    /// the API server closes slow watchers). Returns the resourceVersion after the last one.
    ///
    /// # Panics
    /// If an object has no `metadata.name`.
    pub fn apply_all(&self, pods: impl IntoIterator<Item = Value>) -> u64 {
        let mut st = self.shared.lock();
        let res = resolve(&st, "pods");
        for pod in pods {
            apply_locked(&mut st, res, pod);
        }
        st.rv
    }

    /// Deletes a Pod at once (finalizers and dependents are not consulted: the kubelet's final
    /// delete); emits `DELETED` with the final object (at a new resourceVersion). Returns that
    /// object, or `None` if there was no such Pod. [`delete_object`](Self::delete_object) is
    /// the API's delete.
    pub fn delete(&self, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.shared.lock();
        let res = resolve(&st, "pods");
        st.remove(res, ns, name, false)
    }

    /// The stored Pod, if any.
    pub fn get(&self, ns: &str, name: &str) -> Option<Value> {
        self.get_object("pods", ns, name)
    }
}

fn apply_locked(st: &mut State, res: ResId, obj: Value) -> std::sync::Arc<crate::store::Stored> {
    assert!(
        obj.is_object(),
        "FakeApiServer::apply_object: not an object: {obj}"
    );
    let Some(name) = str_at(&obj, "name").map(str::to_string) else {
        panic!("FakeApiServer::apply_object: object without metadata.name: {obj}");
    };
    let ns = st.ns_key(res, str_at(&obj, "namespace"));
    st.put(res, ns, name, obj)
}
