//! List and watch, for every resource: label and field selectors, resourceVersion semantics,
//! paged lists served from snapshots, replayed and live watch events, bookmarks, 410s and the
//! injectable watch lag. Nothing here may panic on a request.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::http::{bytes_response, error, status_object, Body, Chunk, Query};
use crate::pods::LabelSelector;
use crate::registry::ResId;
use crate::store::{EventType, LogEntry, Signal, Snapshot, State, Stored};
use crate::{Shared, MAX_LIST_SNAPSHOTS};

pub(crate) fn invalid(shared: &Shared, msg: &str) -> Response<Body> {
    error(shared, StatusCode::UNPROCESSABLE_ENTITY, "Invalid", msg)
}

pub(crate) fn list(shared: &Shared, q: &Query, rv: Option<u64>, filter: &Filter) -> Response<Body> {
    if q.send_initial_events {
        return invalid(shared, "sendInitialEvents is forbidden for list");
    }
    if q.rv_match.is_some() && q.resource_version.is_none() {
        return invalid(
            shared,
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        );
    }
    let started = std::time::Instant::now();
    let mut st = shared.lock();
    match q.rv_match.as_deref() {
        None | Some("NotOlderThan") => {}
        // An exact list is served from the current state only if it is still the current
        // state; older history is gone once compacted (this fake keeps no past states).
        Some("Exact") if rv.is_some_and(|rv| rv < st.compacted) => {
            drop(st);
            let msg = "The resourceVersion for the provided list is too old.";
            return error(shared, StatusCode::GONE, "Expired", msg);
        }
        Some("Exact") => {}
        Some(other) => {
            drop(st);
            return invalid(
                shared,
                &format!("unsupported resourceVersionMatch {other:?}"),
            );
        }
    }
    // Where this page starts: a new list from the current state, or the snapshot and position
    // a continue token names.
    let (id, snapshot, from) = match &q.continue_token {
        None => {
            let items: Vec<Arc<Stored>> = st
                .objects(filter.res)
                .filter(|p| filter.in_ns(ns_of(&p.value)))
                .cloned()
                .collect();
            let snapshot = Snapshot {
                rv: st.rv,
                items: Arc::new(items),
            };
            (None, snapshot, 0)
        }
        Some(_) if q.resource_version.is_some() => {
            drop(st);
            let msg = "specifying resource version is not allowed when using continue";
            return error(shared, StatusCode::BAD_REQUEST, "BadRequest", msg);
        }
        Some(token) => {
            let Some((id, from)) = parse_continue(token) else {
                drop(st);
                let msg = format!("continue key is not valid: {token:?}");
                return error(shared, StatusCode::BAD_REQUEST, "BadRequest", &msg);
            };
            match st.snapshots.get(&id) {
                Some(s) => {
                    let snapshot = Snapshot {
                        rv: s.rv,
                        items: Arc::clone(&s.items),
                    };
                    (Some(id), snapshot, from)
                }
                None => {
                    st.counts.expired += 1;
                    drop(st);
                    let msg = "The provided continue parameter is too old to display a \
                               consistent list result. You can start a new list without the \
                               continue parameter.";
                    return error(shared, StatusCode::GONE, "Expired", msg);
                }
            }
        }
    };
    st.counts.lists += 1;
    drop(st);

    // The page: up to `limit` matching items from `from`, then the position of the next
    // matching one, if any (the real server also reads one past the limit to know).
    let limit = q
        .limit
        .filter(|l| *l > 0)
        .map_or(usize::MAX, |l| l as usize);
    let mut page = Vec::new();
    let mut next = None;
    for (i, p) in snapshot.items.iter().enumerate().skip(from) {
        if !filter.selects(&p.value) {
            continue;
        }
        if page.len() == limit {
            next = Some(i);
            break;
        }
        page.push(&p.json);
    }
    let token = next.map(|pos| {
        let id = id.unwrap_or_else(|| {
            let mut st = shared.lock();
            keep_snapshot(&mut st, &snapshot)
        });
        continue_token(id, pos)
    });
    let mut meta = json!({"resourceVersion": snapshot.rv.to_string()});
    if let Some(t) = &token {
        meta["continue"] = json!(t);
    }
    let (kind, api_version) = {
        let st = shared.lock();
        let rt = st.registry.get(filter.res);
        (format!("{}List", rt.kind), rt.api_version())
    };
    let mut body = Vec::with_capacity(64 + page.iter().map(|j| j.len() + 1).sum::<usize>());
    let head = json!({"kind": kind, "apiVersion": api_version}).to_string();
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.extend_from_slice(br#","metadata":"#);
    body.extend_from_slice(meta.to_string().as_bytes());
    body.extend_from_slice(br#","items":["#);
    for (i, json) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(json);
    }
    body.extend_from_slice(b"]}");
    let resp = bytes_response(StatusCode::OK, Bytes::from(body));
    shared.lock().list_time += started.elapsed();
    resp
}

/// Stores a list's snapshot for its next pages; returns the id its continue tokens carry.
fn keep_snapshot(st: &mut State, snapshot: &Snapshot) -> u64 {
    st.next_snapshot += 1;
    let id = st.next_snapshot;
    st.snapshots.insert(
        id,
        Snapshot {
            rv: snapshot.rv,
            items: Arc::clone(&snapshot.items),
        },
    );
    while st.snapshots.len() > MAX_LIST_SNAPSHOTS {
        st.snapshots.pop_first();
    }
    id
}

/// The continue token: opaque to clients (they only send it back), here the snapshot id and the
/// position of the next page's first item.
fn continue_token(id: u64, pos: usize) -> String {
    format!("fake-{id:x}-{pos:x}")
}

fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let (id, pos) = token.strip_prefix("fake-")?.split_once('-')?;
    Some((
        u64::from_str_radix(id, 16).ok()?,
        usize::from_str_radix(pos, 16).ok()?,
    ))
}

fn ns_of(obj: &Value) -> &str {
    obj["metadata"]["namespace"].as_str().unwrap_or("")
}

/// A list's or watch's view: resource, namespace, label and field selectors.
pub(crate) struct Filter {
    pub(crate) res: ResId,
    pub(crate) ns: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    fn selects(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn in_ns(&self, ns: &str) -> bool {
        self.ns.as_deref().is_none_or(|want| want == ns)
    }

    fn matches_now(&self, obj: &Value) -> bool {
        self.in_ns(ns_of(obj)) && self.selects(obj)
    }

    /// The event this watch sees for a logged mutation, like the API server's watch cache:
    /// matching before and after → MODIFIED; only after → ADDED; only before → DELETED
    /// (the previous object at the event's resourceVersion); neither → nothing.
    fn convert(&self, e: &LogEntry) -> Option<Bytes> {
        if e.res != self.res || !self.in_ns(&e.ns) {
            return None;
        }
        let cur = e.ty != EventType::Deleted && self.selects(&e.obj.value);
        let old = e.prev.as_ref().is_some_and(|p| self.selects(&p.value));
        match (cur, old) {
            (true, false) => Some(stored_event_line("ADDED", &e.obj)),
            (true, true) => Some(stored_event_line("MODIFIED", &e.obj)),
            (false, true) => {
                let mut obj = e.prev.as_ref().map_or(Value::Null, |p| p.value.clone());
                obj["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                Some(event_line("DELETED", &obj))
            }
            (false, false) => None,
        }
    }
}

/// A watch event line for a stored object, from its serialized form.
fn stored_event_line(ty: &str, obj: &Stored) -> Bytes {
    let mut line = Vec::with_capacity(obj.json.len() + 32);
    line.extend_from_slice(br#"{"type":""#);
    line.extend_from_slice(ty.as_bytes());
    line.extend_from_slice(br#"","object":"#);
    line.extend_from_slice(&obj.json);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": ty, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_line(rv: u64, initial_events_end: bool, kind: &(String, String)) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.0, "apiVersion": kind.1, "metadata": meta}),
    )
}

pub(crate) fn watch(
    shared: &Arc<Shared>,
    q: &Query,
    rv: Option<u64>,
    filter: Filter,
) -> Response<Body> {
    if q.send_initial_events && (q.rv_match.as_deref() != Some("NotOlderThan") || !q.bookmarks) {
        let msg = "sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true";
        return invalid(shared, msg);
    }
    if !q.send_initial_events && q.rv_match.is_some() {
        return invalid(
            shared,
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is set",
        );
    }
    let mut initial = Vec::new();
    let (signals, start_rv, kind) = {
        let mut st = shared.lock();
        st.counts.watches += 1;
        let rt = st.registry.get(filter.res);
        let kind = (rt.kind.clone(), rt.api_version());
        let signals = shared.signals.subscribe();
        match rv {
            Some(rv) if rv < st.compacted && !q.send_initial_events => {
                st.counts.expired += 1;
                let msg = format!("too old resource version: {rv} ({})", st.compacted);
                let status = status_object(410, "Expired", &msg);
                initial.push(event_line("ERROR", &status));
                drop(st);
                return stream_response(initial, None);
            }
            // Replay what happened after the requested version.
            Some(rv) if !q.send_initial_events => {
                initial.extend(
                    st.log
                        .iter()
                        .filter(|e| e.rv > rv)
                        .filter_map(|e| filter.convert(e)),
                );
            }
            // "Any"/unset version or a streaming list: synthetic ADDED for the current state.
            _ => {
                let added = st
                    .objects(filter.res)
                    .filter(|p| filter.matches_now(&p.value));
                initial.extend(added.map(|p| stored_event_line("ADDED", p)));
                if q.send_initial_events {
                    initial.push(bookmark_line(st.rv, true, &kind));
                }
            }
        }
        (signals, rv.unwrap_or(0).max(st.rv), kind)
    };
    let (tx, rx) = mpsc::channel::<Chunk>(64);
    let deadline = q
        .timeout_seconds
        .filter(|s| *s > 0)
        .map(|s| Instant::now() + Duration::from_secs(s));
    let pump = Pump {
        tx,
        signals,
        filter,
        last_rv: start_rv,
        bookmarks: q.bookmarks,
        interval: shared.opts.bookmark_interval,
        deadline,
        kind,
        shared: Arc::clone(shared),
        lagged: VecDeque::new(),
    };
    tokio::spawn(pump.run(initial));
    stream_response(Vec::new(), Some(rx))
}

/// A chunked JSON-lines response: `initial` lines, then whatever `rx` yields until it closes.
fn stream_response(initial: Vec<Bytes>, rx: Option<mpsc::Receiver<Chunk>>) -> Response<Body> {
    let head = stream::iter(initial.into_iter().map(|b| Ok(Frame::data(b))));
    let tail = stream::unfold(rx, |rx| async move {
        let mut rx = rx?;
        let item = rx.recv().await?;
        Some((item, Some(rx)))
    });
    let body = StreamBody::new(futures_util::StreamExt::chain(head, tail));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Feeds one watch stream: replayed events, then live events and bookmarks.
struct Pump {
    tx: mpsc::Sender<Chunk>,
    signals: broadcast::Receiver<Signal>,
    filter: Filter,
    /// The newest resourceVersion this stream is consistent with (every matching event up to
    /// it has been queued): what a bookmark may promise.
    last_rv: u64,
    bookmarks: bool,
    interval: Duration,
    deadline: Option<Instant>,
    /// The resource's kind and apiVersion, for bookmarks.
    kind: (String, String),
    /// For the watch lag in force when an event arrives.
    shared: Arc<Shared>,
    /// Live events received, waiting out the watch lag: when each is due.
    lagged: VecDeque<(Instant, Arc<LogEntry>)>,
}

impl Pump {
    async fn run(mut self, initial: Vec<Bytes>) {
        for line in initial {
            if self.tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
        let periodic = self.bookmarks && !self.interval.is_zero();
        // The period only matters when `periodic`; keep it non-zero for `interval_at`.
        let period = self.interval.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        let deadline = self.deadline;
        loop {
            let due = self.lagged.front().map(|(at, _)| *at);
            let line = tokio::select! {
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                    if deadline.is_some() => return, // timeoutSeconds: a clean end of stream
                _ = self.tx.closed() => return,
                _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await },
                    if due.is_some() => match self.lagged.pop_front() {
                        Some((_, e)) => {
                            self.last_rv = self.last_rv.max(e.rv);
                            self.filter.convert(&e)
                        }
                        None => None,
                    },
                _ = ticks.tick(), if periodic => Some(bookmark_line(self.last_rv, false, &self.kind)),
                sig = self.signals.recv() => match sig {
                    // Every live event waits out the lag in force when it arrived (none by
                    // default), in order: a bookmark only promises what was delivered.
                    Ok(Signal::Event(e)) => {
                        let lag = self.shared.watch_lag();
                        if lag.is_zero() && self.lagged.is_empty() {
                            self.last_rv = self.last_rv.max(e.rv);
                            self.filter.convert(&e)
                        } else {
                            self.lagged.push_back((Instant::now() + lag, e));
                            None
                        }
                    }
                    Ok(Signal::Bookmark) => self.bookmarks.then(|| bookmark_line(self.last_rv, false, &self.kind)),
                    Ok(Signal::Drop) => {
                        let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped by test");
                        let _ = self.tx.send(Err(cut)).await;
                        return;
                    }
                    // A watcher too slow to keep up is closed, as the API server does.
                    Err(_) => return,
                },
            };
            if let Some(line) = line {
                if self.tx.send(Ok(Frame::data(line))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A parsed field selector: a conjunction of `path=value` (or `==`) and `path!=value`, where
/// `path` is any dotted path into the object (`metadata.name`, `metadata.namespace`,
/// `spec.nodeName`, `status.phase`, …); a missing field reads as "". The API server allows only
/// some paths per resource; this fake allows any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(format!("invalid field selector: {term:?}"));
            }
            reqs.push((path, eq, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let got = path.iter().try_fold(obj, |v, k| v.get(k));
            let got = match got {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}
