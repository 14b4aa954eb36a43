//! The per-request HTTP filter: find the sandbox a request is for and send it there, or answer
//! with a JSON error. Only safe handles here; the request-path rules are DESIGN.md's.

use crate::ffi::{Header, Stream};
use crate::gateway::Gateway;
use crate::reply::Reply;
use arrayvec::ArrayString;
use routing::activity::{now_ms, StreamThrottle};
use routing::key::{KeyError, MAX_ID_LEN};
use routing::token::token_matches;
use routing::{extract, RequestView, Route, TargetBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Envoy's ORIGINAL_DST filter-state key; its factory parses `ip:port`.
const ORIGINAL_DST_KEY: &str = "envoy.network.transport_socket.original_dst_address";
/// The header an ORIGINAL_DST cluster with `use_http_header: true` would obey. Ours does not,
/// and we drop it anyway so no later hop can be steered by a client-sent value.
const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";
const EVENT_HOLD_DONE: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Routed; let the request through.
    Continue,
    /// Waiting for a route; a scheduler event resumes the request.
    Stop,
    /// A local reply was sent.
    Replied,
}

impl RequestView for Stream<'_> {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
        match self.request_header(name) {
            Header::Absent => Ok(None),
            Header::One(v) => Ok(Some(v)),
            Header::Many => Err(KeyError::DuplicateHeader),
        }
    }
    fn authority(&self) -> Option<&[u8]> {
        match self.request_header(":authority") {
            Header::One(v) => Some(v),
            _ => None,
        }
    }
    fn path(&self) -> Option<&[u8]> {
        match self.request_header(":path") {
            Header::One(v) => Some(v),
            _ => None,
        }
    }
}

pub struct SandboxFilter {
    gw: &'static Gateway,
    /// The route this stream was sent to; long streams mark it active as data flows.
    route: Option<Arc<Route>>,
    throttle: StreamThrottle,
    hold_started: Option<Instant>,
}

impl SandboxFilter {
    pub fn new(gw: &'static Gateway) -> Self {
        SandboxFilter {
            gw,
            route: None,
            throttle: StreamThrottle::new(0, Duration::ZERO),
            hold_started: None,
        }
    }

    pub fn on_request_headers(&mut self, s: &mut Stream<'_>) -> HeadersStatus {
        s.remove_request_header(ORIGINAL_DST_HEADER);
        self.route(s, false)
    }

    /// Data in either direction (and response headers): throttled activity.
    #[inline]
    pub fn on_data(&mut self) {
        if let Some(route) = &self.route {
            let now = now_ms();
            if self
                .throttle
                .ready(now, self.gw.cfg.activity_stream_throttle)
            {
                route.activity.touch(now);
            }
        }
    }

    pub fn on_scheduled(&mut self, s: &mut Stream<'_>, event_id: u64) {
        if event_id != EVENT_HOLD_DONE {
            return;
        }
        let Some(started) = self.hold_started.take() else {
            return;
        };
        s.record_histogram(
            self.gw.metrics.miss_hold_ms,
            started.elapsed().as_millis() as u64,
        );
        if self.route(s, true) == HeadersStatus::Continue {
            s.continue_decoding();
        }
    }

    fn route(&mut self, s: &mut Stream<'_>, after_hold: bool) -> HeadersStatus {
        let gw = self.gw;
        // Copy what we need out of Envoy's buffers before changing any header.
        let (id, port, new_path) = match extract(&gw.cfg.keys, &*s) {
            Ok(k) => {
                let mut id = ArrayString::<MAX_ID_LEN>::new();
                if id.try_push_str(k.id).is_err() {
                    return self.key_error(s, KeyError::InvalidId);
                }
                (id, k.port, k.rewritten_path.map(|p| p.to_path()))
            }
            Err(e) => return self.key_error(s, e),
        };
        let Some(route) = gw.table.get(&id) else {
            if !after_hold && !gw.cfg.miss_hold.is_zero() {
                if let Some(scheduler) = s.scheduler() {
                    s.increment_counter(gw.metrics.miss_holds, None, 1);
                    self.hold_started = Some(Instant::now());
                    let table = Arc::clone(&gw.table);
                    let (hold, id) = (gw.cfg.miss_hold, id.to_string());
                    // The task owns the scheduler: it makes the only commit, then frees it.
                    gw.spawn(async move {
                        table.wait_for(&id, hold).await;
                        scheduler.commit(EVENT_HOLD_DONE);
                    });
                    return HeadersStatus::Stop;
                }
            }
            return self.reply(
                s,
                404,
                "sandbox_not_found",
                "no sandbox with this id is routable",
                &id,
                None,
            );
        };
        if !route.spec.ready {
            let retry = Some(gw.cfg.retry_after_secs);
            return self.reply(
                s,
                503,
                "sandbox_not_ready",
                "the sandbox is not ready yet",
                &id,
                retry,
            );
        }
        if let Some(expected) = &route.spec.token_sha256 {
            let verdict = match s.request_header(&gw.cfg.access_token_header) {
                Header::One(t) if token_matches(t, expected) => None,
                Header::Absent => {
                    Some(("missing_access_token", "this sandbox needs an access token"))
                }
                _ => Some((
                    "invalid_access_token",
                    "the access token is not valid for this sandbox",
                )),
            };
            if let Some((code, msg)) = verdict {
                return self.reply(s, 401, code, msg, &id, None);
            }
        }
        // The token is for the gateway; a sandbox never sees it (nor one meant for another).
        s.remove_request_header(&gw.cfg.access_token_header);
        if let Some(p) = new_path {
            s.set_request_header(":path", &p);
            s.clear_route_cache();
        }
        let mut buf = TargetBuf::new();
        if !s.set_filter_state_typed(ORIGINAL_DST_KEY, route.target(port, &mut buf)) {
            return self.reply(
                s,
                500,
                "routing_failed",
                "Envoy rejected the upstream address",
                &id,
                None,
            );
        }
        let now = now_ms();
        route.activity.touch(now);
        self.throttle = StreamThrottle::new(now, gw.cfg.activity_stream_throttle);
        self.route = Some(route);
        s.increment_counter(gw.metrics.routed, None, 1);
        HeadersStatus::Continue
    }

    fn key_error(&mut self, s: &mut Stream<'_>, e: KeyError) -> HeadersStatus {
        let msg = e.to_string();
        self.send(
            s,
            Reply {
                status: 400,
                code: e.code(),
                message: &msg,
                sandbox_id: None,
                retry_after_secs: None,
            },
        )
    }

    fn reply(
        &mut self,
        s: &mut Stream<'_>,
        status: u32,
        code: &'static str,
        message: &str,
        id: &str,
        retry_after_secs: Option<u32>,
    ) -> HeadersStatus {
        self.send(
            s,
            Reply {
                status,
                code,
                message,
                sandbox_id: Some(id),
                retry_after_secs,
            },
        )
    }

    fn send(&mut self, s: &mut Stream<'_>, r: Reply<'_>) -> HeadersStatus {
        s.increment_counter(self.gw.metrics.local_replies, Some(r.code), 1);
        tracing::debug!(
            status = r.status,
            code = r.code,
            sandbox_id = r.sandbox_id,
            "local reply"
        );
        r.send(s);
        HeadersStatus::Replied
    }
}
