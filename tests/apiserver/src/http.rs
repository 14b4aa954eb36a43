//! The HTTP side of the fake API server: connections, routing, list and watch.
//! Nothing here may panic on a request: every failure is an error Status or a closed stream.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use super::pods::LabelSelector;
use super::{EventType, LogEntry, Shared, Signal, Snapshot, State, Stored, MAX_LIST_SNAPSHOTS};

type Body = BoxBody<Bytes, io::Error>;
type Chunk = Result<Frame<Bytes>, io::Error>;

pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Transient accept errors (e.g. EMFILE): back off briefly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                // Shutdown (or the handle going away) drops the connection: the socket closes.
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    bytes_response(status, Bytes::from(body.to_string()))
}

fn bytes_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(bytes).map_err(|e: Infallible| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A `metav1.Status` failure, as the API server returns it.
pub(super) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error(shared: &Shared, code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    shared.lock().counts.rejected += 1;
    full(code, &status_object(code.as_u16(), reason, message))
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| char::from(c).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default, Debug)]
struct Query {
    label_selector: String,
    resource_version: Option<String>,
    rv_match: Option<String>,
    watch: bool,
    bookmarks: bool,
    timeout_seconds: Option<u64>,
    send_initial_events: bool,
    /// `limit`: at most this many items per list page (absent or 0: everything).
    limit: Option<u64>,
    /// `continue`: the token of the previous page.
    continue_token: Option<String>,
}

fn parse_query(q: &str) -> Result<Query, String> {
    let mut out = Query::default();
    let truthy = |v: &str| v == "true" || v == "1";
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match percent_decode(k).as_str() {
            "labelSelector" => out.label_selector = v,
            "resourceVersion" => out.resource_version = Some(v),
            "resourceVersionMatch" => out.rv_match = Some(v),
            "watch" => out.watch = truthy(&v),
            "allowWatchBookmarks" => out.bookmarks = truthy(&v),
            "sendInitialEvents" => out.send_initial_events = truthy(&v),
            "timeoutSeconds" => {
                out.timeout_seconds = Some(
                    v.parse()
                        .map_err(|_| format!("invalid timeoutSeconds {v:?}"))?,
                );
            }
            "limit" => {
                out.limit = Some(v.parse().map_err(|_| format!("invalid limit {v:?}"))?);
            }
            "continue" => out.continue_token = Some(v).filter(|t| !t.is_empty()),
            "fieldSelector" | "pretty" => {}
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    Ok(out)
}

/// Parses an explicit resourceVersion; `None` for "unset" (absent, empty or "0").
fn parse_rv(rv: Option<&str>) -> Result<Option<u64>, String> {
    match rv {
        None | Some("") | Some("0") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid resource version {s:?}")),
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    shared.lock().requests.push(if raw_query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{raw_query}")
    });
    if req.method() != Method::GET {
        return Ok(error(
            &shared,
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server only serves GET",
        ));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ns = match segments.as_slice() {
        ["api", "v1", "pods"] => None,
        ["api", "v1", "namespaces", ns, "pods"] if !ns.is_empty() => Some(ns.to_string()),
        _ => {
            let msg = "the server could not find the requested resource";
            return Ok(error(&shared, StatusCode::NOT_FOUND, "NotFound", msg));
        }
    };
    let q = match parse_query(&raw_query) {
        Ok(q) => q,
        Err(msg) => return Ok(error(&shared, StatusCode::BAD_REQUEST, "BadRequest", &msg)),
    };
    let selector = match LabelSelector::parse(&q.label_selector) {
        Ok(s) => s,
        Err(msg) => return Ok(error(&shared, StatusCode::BAD_REQUEST, "BadRequest", &msg)),
    };
    let rv = match parse_rv(q.resource_version.as_deref()) {
        Ok(rv) => rv,
        Err(msg) => return Ok(error(&shared, StatusCode::BAD_REQUEST, "BadRequest", &msg)),
    };
    let filter = Filter { ns, selector };
    Ok(if q.watch {
        watch(&shared, &q, rv, filter)
    } else {
        list(&shared, &q, rv, &filter)
    })
}

fn invalid(shared: &Shared, msg: &str) -> Response<Body> {
    error(shared, StatusCode::UNPROCESSABLE_ENTITY, "Invalid", msg)
}

fn list(shared: &Shared, q: &Query, rv: Option<u64>, filter: &Filter) -> Response<Body> {
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
                .pods
                .values()
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
        if !filter.selector.matches(&p.value) {
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
    let mut body = Vec::with_capacity(64 + page.iter().map(|j| j.len() + 1).sum::<usize>());
    body.extend_from_slice(br#"{"kind":"PodList","apiVersion":"v1","metadata":"#);
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

/// A watch's view: namespace and label selector.
struct Filter {
    ns: Option<String>,
    selector: LabelSelector,
}

impl Filter {
    fn in_ns(&self, ns: &str) -> bool {
        self.ns.as_deref().is_none_or(|want| want == ns)
    }

    fn matches_now(&self, obj: &Value) -> bool {
        self.in_ns(ns_of(obj)) && self.selector.matches(obj)
    }

    /// The event this watch sees for a logged mutation, like the API server's watch cache:
    /// matching before and after → MODIFIED; only after → ADDED; only before → DELETED
    /// (the previous object at the event's resourceVersion); neither → nothing.
    fn convert(&self, e: &LogEntry) -> Option<Bytes> {
        if !self.in_ns(&e.ns) {
            return None;
        }
        let cur = e.ty != EventType::Deleted && self.selector.matches(&e.obj.value);
        let old = e
            .prev
            .as_ref()
            .is_some_and(|p| self.selector.matches(&p.value));
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

fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta}),
    )
}

fn watch(shared: &Arc<Shared>, q: &Query, rv: Option<u64>, filter: Filter) -> Response<Body> {
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
    let (signals, start_rv) = {
        let mut st = shared.lock();
        st.counts.watches += 1;
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
                let added = st.pods.values().filter(|p| filter.matches_now(&p.value));
                initial.extend(added.map(|p| stored_event_line("ADDED", p)));
                if q.send_initial_events {
                    initial.push(bookmark_line(st.rv, true));
                }
            }
        }
        (signals, rv.unwrap_or(0).max(st.rv))
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
            let line = tokio::select! {
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                    if deadline.is_some() => return, // timeoutSeconds: a clean end of stream
                _ = self.tx.closed() => return,
                _ = ticks.tick(), if periodic => Some(bookmark_line(self.last_rv, false)),
                sig = self.signals.recv() => match sig {
                    Ok(Signal::Event(e)) => {
                        self.last_rv = self.last_rv.max(e.rv);
                        self.filter.convert(&e)
                    }
                    Ok(Signal::Bookmark) => self.bookmarks.then(|| bookmark_line(self.last_rv, false)),
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
