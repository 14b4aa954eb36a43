//! `SandboxFilter` against a fake Envoy: the paths the end-to-end tests cannot force (a hold cap
//! that is full, a scheduler Envoy cannot make, a filter state Envoy rejects, stale scheduled
//! events, data after a local reply, and Envoy re-entering the filter from inside a reply).

use super::*;
use crate::ffi::{Commit, ConfigEnvoy, MetricError, MetricId};
use crate::gateway::Gateway;
use routing::holds::ClientKey;
use routing::RouteSpec;
use std::sync::mpsc;

/// Config-time Envoy: numbers metrics, has no config scheduler (no stats task in tests).
struct FakeConfig {
    next: Cell<usize>,
}

impl FakeConfig {
    fn id(&self) -> MetricId {
        self.next.set(self.next.get() + 1);
        MetricId::for_test(self.next.get())
    }
}

impl ConfigEnvoy for FakeConfig {
    type Scheduler = FakeScheduler;
    fn define_counter(&self, _: &'static str, _: &[&str]) -> Result<MetricId, MetricError> {
        Ok(self.id())
    }
    fn define_gauge(&self, _: &'static str) -> Result<MetricId, MetricError> {
        Ok(self.id())
    }
    fn define_histogram(&self, _: &'static str) -> Result<MetricId, MetricError> {
        Ok(self.id())
    }
    fn set_gauge(&self, _: MetricId, _: u64) {}
    fn increment_counter(&self, _: MetricId, _: u64) {}
    fn scheduler(&self) -> Option<FakeScheduler> {
        None
    }
}

/// Commits go to a channel the test reads, as Envoy would queue them for the worker.
struct FakeScheduler(mpsc::Sender<u64>);

impl Commit for FakeScheduler {
    fn commit(&self, event_id: u64) {
        let _ = self.0.send(event_id);
    }
}

#[derive(Debug, Clone, PartialEq)]
struct SentReply {
    status: u32,
    body: serde_json::Value,
    retry_after: Option<String>,
    details: String,
}

struct FakeStream<'f> {
    headers: Vec<(String, Vec<u8>)>,
    accept_filter_state: bool,
    /// Header names whose set Envoy refuses (returns false).
    refuse_set: Vec<&'static str>,
    filter_state: Option<(String, String)>,
    scheduler: Option<mpsc::Sender<u64>>,
    replies: Vec<SentReply>,
    removed: Vec<String>,
    continued: u32,
    counters: Vec<(MetricId, Option<String>)>,
    /// Envoy runs the response path inside `send_response`: replay that re-entry.
    reenter: Option<&'f SandboxFilter>,
    /// `source.address`.
    source: Option<Vec<u8>>,
}

impl<'f> FakeStream<'f> {
    fn new(headers: &[(&str, &str)]) -> Self {
        FakeStream {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            accept_filter_state: true,
            refuse_set: Vec::new(),
            filter_state: None,
            scheduler: None,
            replies: Vec::new(),
            removed: Vec::new(),
            continued: 0,
            counters: Vec::new(),
            reenter: None,
            source: Some(b"10.1.1.1:40000".to_vec()),
        }
    }

    /// Every value of request header `name`, in order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
            .collect()
    }

    fn only_reply(&self) -> &SentReply {
        assert_eq!(self.replies.len(), 1, "replies: {:?}", self.replies);
        &self.replies[0]
    }
}

struct FakeHeaders<'a>(&'a [(String, Vec<u8>)]);

impl HeaderMap for FakeHeaders<'_> {
    fn get(&self, name: &str) -> Header<'_> {
        let mut found = self.0.iter().filter(|(k, _)| k == name);
        match (found.next(), found.next()) {
            (None, _) => Header::Absent,
            (Some((_, v)), None) => Header::One(v),
            _ => Header::Many,
        }
    }
}

impl Stream for FakeStream<'_> {
    type Headers<'a>
        = FakeHeaders<'a>
    where
        Self: 'a;
    type Scheduler = FakeScheduler;

    fn request_headers(&self) -> FakeHeaders<'_> {
        FakeHeaders(&self.headers)
    }
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> bool {
        if self.refuse_set.contains(&name) {
            return false;
        }
        // Envoy's set replaces every value of the name.
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.into(), value.to_vec()));
        true
    }
    fn remove_request_header(&mut self, name: &str) {
        self.headers.retain(|(k, _)| k != name);
        self.removed.push(name.into());
    }
    fn source_address(&self) -> Option<&[u8]> {
        self.source.as_deref()
    }
    fn send_response(
        &mut self,
        status: u32,
        headers: &[(&str, &[u8])],
        body: &[u8],
        details: &str,
    ) {
        if let Some(f) = self.reenter {
            // What Envoy does for a local reply with a body, while the request is still open:
            // the encode path runs this filter's response hooks, then the request body may go on.
            let mut inner = FakeStream::new(&[]);
            f.on_response_body(&mut inner, true);
            f.on_request_body(&mut inner, false);
        }
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        self.replies.push(SentReply {
            status,
            body: serde_json::from_slice(body).expect("reply body is JSON"),
            retry_after: header("retry-after"),
            details: details.into(),
        });
    }
    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool {
        if self.accept_filter_state {
            self.filter_state = Some((key.into(), value.into()));
        }
        self.accept_filter_state
    }
    fn clear_route_cache(&mut self) {}
    fn continue_decoding(&mut self) {
        self.continued += 1;
    }
    fn scheduler(&mut self) -> Option<FakeScheduler> {
        self.scheduler.clone().map(FakeScheduler)
    }
    fn increment_counter(&mut self, id: MetricId, label: Option<&str>, _by: u64) {
        self.counters.push((id, label.map(str::to_string)));
    }
    fn record_histogram(&mut self, _id: MetricId, _value: u64) {}
}

/// A gateway on a routes file with sandbox `a` (ready, 10.0.0.1:8080) and `n` (not ready).
fn gateway(miss_hold_ms: u64) -> &'static Gateway {
    gateway_with(miss_hold_ms, serde_json::json!({}))
}

/// [`gateway`] with config fields `extra` merged in.
fn gateway_with(miss_hold_ms: u64, extra: serde_json::Value) -> &'static Gateway {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"sandboxes": [{"id": "a", "ip": "10.0.0.1", "port": 8080},
                          {"id": "n", "ip": "10.0.0.2", "port": 8080, "ready": false}]}"#,
    )
    .unwrap();
    let mut cfg = serde_json::json!({
        "route_source": {"type": "file", "path": routes, "poll_interval_ms": 60000},
        "miss_hold_ms": miss_hold_ms,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let fake = FakeConfig { next: Cell::new(0) };
    let gw = Gateway::new(&fake, cfg.to_string().as_bytes()).unwrap();
    // The file is read at load; the directory may go.
    drop(dir);
    // Filters borrow their config for 'static, as they do from Envoy's config_new.
    Box::leak(Box::new(gw))
}

fn code(r: &SentReply) -> &str {
    r.body["error"].as_str().unwrap()
}

#[test]
fn routes_a_known_sandbox_and_strips_what_the_client_may_not_send() {
    let gw = gateway(0);
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[
        ("x-sandbox-id", "a"),
        (ORIGINAL_DST_HEADER, "1.2.3.4:80"),
        ("x-access-token", "t"),
    ]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert_eq!(
        s.filter_state,
        Some((ORIGINAL_DST_KEY.to_string(), "10.0.0.1:8080".to_string()))
    );
    assert_eq!(s.removed, [ORIGINAL_DST_HEADER, "x-access-token"]);
    assert!(s.replies.is_empty());
    assert_eq!(s.counters, [(gw.metrics.routed, None)]);
}

#[test]
fn strip_mode_sets_our_prefix_over_the_clients() {
    let gw = gateway_with(0, serde_json::json!({"path_prefix": "/sandboxes"}));
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[
        (":path", "/sandboxes/a/8080/api/kernels?x=1"),
        (":authority", "gw.test"),
        (FORWARDED_PREFIX_HEADER, "/evil"),
        (FORWARDED_PREFIX_HEADER, "/evil2"),
    ]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert_eq!(s.values(":path"), ["/api/kernels?x=1"]);
    assert_eq!(s.values(FORWARDED_PREFIX_HEADER), ["/sandboxes/a/8080"]);
    // The Host is the client's by default.
    assert_eq!(s.values(":authority"), ["gw.test"]);
    assert!(s.values(FORWARDED_HOST_HEADER).is_empty());
    // Routed another way, a client's prefix is removed, not forwarded.
    let mut s = FakeStream::new(&[("x-sandbox-id", "a"), (FORWARDED_PREFIX_HEADER, "/evil")]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert!(s.values(FORWARDED_PREFIX_HEADER).is_empty());
    assert_eq!(s.removed, [FORWARDED_PREFIX_HEADER]);
}

#[test]
fn keep_mode_leaves_the_path_alone() {
    let gw = gateway_with(
        0,
        serde_json::json!({"path_prefix": "/sandboxes", "path_prefix_mode": "keep"}),
    );
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[
        (":path", "/sandboxes/a/9000/lab?x"),
        (FORWARDED_PREFIX_HEADER, "/evil"),
    ]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert_eq!(s.values(":path"), ["/sandboxes/a/9000/lab?x"]);
    assert!(s.values(FORWARDED_PREFIX_HEADER).is_empty());
    assert_eq!(s.filter_state.unwrap().1, "10.0.0.1:9000");
}

#[test]
fn localhost_host_mode_rewrites_the_authority() {
    let gw = gateway_with(
        0,
        serde_json::json!({"host_domains": ["sb.test"], "upstream_host": "localhost"}),
    );
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[
        (":authority", "3000-a.sb.test"),
        (FORWARDED_HOST_HEADER, "evil.example"),
    ]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert_eq!(s.values(":authority"), ["localhost:3000"]);
    assert_eq!(s.values(FORWARDED_HOST_HEADER), ["3000-a.sb.test"]);
    assert_eq!(s.filter_state.unwrap().1, "10.0.0.1:3000");
    // Should Envoy refuse our value, the client's is removed rather than left to pass as ours.
    let mut s = FakeStream::new(&[
        ("x-sandbox-id", "a"),
        (":authority", "gw.test"),
        (FORWARDED_HOST_HEADER, "evil.example"),
    ]);
    s.refuse_set = vec![FORWARDED_HOST_HEADER];
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    assert_eq!(s.values(":authority"), ["localhost:8080"]);
    assert!(s.values(FORWARDED_HOST_HEADER).is_empty());
}

#[test]
fn a_rejected_upstream_address_is_routing_failed() {
    let f = SandboxFilter::new(gateway(0));
    let mut s = FakeStream::new(&[("x-sandbox-id", "a")]);
    s.accept_filter_state = false;
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Replied);
    let r = s.only_reply();
    assert_eq!((r.status, code(r)), (500, "routing_failed"));
    assert_eq!(r.body["sandbox_id"], "a");
    assert_eq!(r.details, "routing_failed");
}

#[test]
fn not_ready_gets_retry_after() {
    let f = SandboxFilter::new(gateway(0));
    let mut s = FakeStream::new(&[("x-sandbox-id", "n")]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Replied);
    let r = s.only_reply();
    assert_eq!((r.status, code(r)), (503, "sandbox_not_ready"));
    assert_eq!(r.retry_after.as_deref(), Some("1"));
}

#[test]
fn a_sandbox_at_its_stream_bound_gets_429_until_a_stream_ends() {
    let gw = gateway_with(0, serde_json::json!({"max_streams_per_sandbox": 2}));
    let open: Vec<_> = (0..2)
        .map(|_| {
            let f = SandboxFilter::new(gw);
            let mut s = FakeStream::new(&[("x-sandbox-id", "a")]);
            assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
            f
        })
        .collect();
    let busy = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[("x-sandbox-id", "a")]);
    assert_eq!(
        busy.on_request_headers(&mut s, true),
        HeadersStatus::Replied
    );
    let r = s.only_reply();
    assert_eq!((r.status, code(r)), (429, "sandbox_busy"));
    assert!(r.retry_after.is_some());
    assert!(s.filter_state.is_none(), "a refused stream is not routed");
    // Envoy destroys a finished stream's filter: its place is given back.
    drop(open);
    drop(busy);
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[("x-sandbox-id", "a")]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
}

#[test]
fn a_miss_without_a_scheduler_is_answered_at_once() {
    let f = SandboxFilter::new(gateway(10_000));
    // `scheduler: None`: Envoy could not make one; the request must not hang.
    let mut s = FakeStream::new(&[("x-sandbox-id", "nope")]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Replied);
    assert_eq!(code(s.only_reply()), "sandbox_not_found");
    assert!(f.hold_started.get().is_none());
}

#[test]
fn a_full_hold_book_makes_the_flooding_client_give_way() {
    let gw = gateway_with(30_000, serde_json::json!({"max_held_misses": 3}));
    let flood = ClientKey::from_source(b"10.9.9.9:1");
    let junk: Vec<_> = (0..3).map(|_| gw.holds.admit(flood).0).collect();
    let f = SandboxFilter::new(gw);
    let (tx, _rx) = mpsc::channel();
    let mut s = FakeStream::new(&[("x-sandbox-id", "claimed-just-now")]);
    s.scheduler = Some(tx);
    // Held, not answered: the flood's oldest hold gave its place (and that was counted).
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Stop);
    assert!(s.replies.is_empty());
    assert_eq!(gw.holds.held_by(flood), 2);
    assert_eq!(gw.holds.held_by(ClientKey::from_source(b"10.1.1.1:0")), 1);
    assert!(s
        .counters
        .iter()
        .any(|(id, _)| *id == gw.metrics.miss_holds_displaced));
    drop(junk);
}

#[test]
fn a_hold_ends_in_404_when_no_route_comes() {
    let f = SandboxFilter::new(gateway(30));
    let (tx, rx) = mpsc::channel();
    let mut s = FakeStream::new(&[("x-sandbox-id", "late")]);
    s.scheduler = Some(tx);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Stop);
    assert!(s.replies.is_empty());
    let event = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    f.on_scheduled(&mut s, event);
    assert_eq!(code(s.only_reply()), "sandbox_not_found");
    assert_eq!(s.continued, 0);
}

#[test]
fn a_route_that_appears_during_the_hold_is_routed() {
    let gw = gateway(10_000);
    let f = SandboxFilter::new(gw);
    let (tx, rx) = mpsc::channel();
    let mut s = FakeStream::new(&[("x-sandbox-id", "fresh")]);
    s.scheduler = Some(tx);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Stop);
    gw.table.upsert(RouteSpec {
        id: "fresh".into(),
        ip: "10.0.0.9".parse().unwrap(),
        port: 3000,
        ready: true,
        token_sha256: None,
        pod_uid: None,
        resource_version: 0,
    });
    let event = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    f.on_scheduled(&mut s, event);
    assert!(s.replies.is_empty());
    assert_eq!(s.continued, 1);
    assert_eq!(s.filter_state.unwrap().1, "10.0.0.9:3000");
}

#[test]
fn stale_and_unknown_scheduled_events_change_nothing() {
    let f = SandboxFilter::new(gateway(30));
    let (tx, rx) = mpsc::channel();
    let mut s = FakeStream::new(&[("x-sandbox-id", "late")]);
    s.scheduler = Some(tx);
    // No hold pending: nothing happens.
    f.on_scheduled(&mut s, EVENT_HOLD_DONE);
    assert!(s.replies.is_empty() && s.continued == 0);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Stop);
    // An event this filter never asks for is ignored, and the hold stays pending.
    f.on_scheduled(&mut s, 99);
    assert!(s.replies.is_empty());
    assert!(f.hold_started.get().is_some());
    let event = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    f.on_scheduled(&mut s, event);
    // A repeat of the event that ended the hold finds nothing to end.
    f.on_scheduled(&mut s, event);
    assert_eq!(s.replies.len(), 1);
    assert_eq!(s.continued, 0);
}

#[test]
fn envoy_reentering_the_filter_from_a_local_reply_is_sound() {
    let f = SandboxFilter::new(gateway(0));
    let mut s = FakeStream::new(&[("x-sandbox-id", "BAD_ID")]);
    s.reenter = Some(&f);
    assert_eq!(f.on_request_headers(&mut s, false), HeadersStatus::Replied);
    assert_eq!(code(s.only_reply()), "invalid_sandbox_id");
    // Data after the reply: the stream was never routed, so nothing is marked or answered.
    let mut later = FakeStream::new(&[]);
    f.on_request_body(&mut later, true);
    f.on_response_body(&mut later, true);
    assert!(later.replies.is_empty() && later.counters.is_empty());
}

#[test]
fn data_on_a_routed_stream_marks_its_sandbox_active() {
    let gw = gateway(0);
    let f = SandboxFilter::new(gw);
    let mut s = FakeStream::new(&[("x-sandbox-id", "a")]);
    assert_eq!(f.on_request_headers(&mut s, true), HeadersStatus::Continue);
    let route = gw.table.get("a").unwrap();
    let first = route.activity.last_ms();
    assert!(first > 0, "the request start marks the sandbox");
    f.on_response_body(&mut s, false);
    assert!(route.activity.last_ms() >= first);
}

#[test]
fn a_panic_answers_500_internal_error() {
    let mut s = FakeStream::new(&[]);
    SandboxFilter::on_panic(&mut s);
    let r = s.only_reply();
    assert_eq!((r.status, code(r)), (500, "internal_error"));
}

#[test]
fn reply_body_shape() {
    let mut s = FakeStream::new(&[]);
    let mut id = SandboxId::new();
    id.push_str("abc");
    crate::reply::send(
        &mut s,
        &ErrorReply {
            code: ReplyCode::SandboxNotReady,
            id: Some(id),
            retry_after_secs: Some(3),
        },
    );
    crate::reply::send(&mut s, &ErrorReply::new(ReplyCode::MissingSandboxId));
    assert_eq!(
        s.replies[0].body,
        serde_json::json!({"error": "sandbox_not_ready",
            "message": "the sandbox is not ready yet", "sandbox_id": "abc"})
    );
    assert_eq!(s.replies[0].retry_after.as_deref(), Some("3"));
    assert_eq!(
        (s.replies[1].status, s.replies[1].retry_after.as_deref()),
        (400, None)
    );
    assert!(s.replies[1].body.get("sandbox_id").is_none());
}
