//! The per-request HTTP filter: find the sandbox a request is for and send it there, or answer
//! with a JSON error. Only safe handles here; the request-path rules are DESIGN.md's.

use crate::ffi::{Header, RequestHeaders, Stream};
use crate::gateway::Gateway;
use crate::reply::Reply;
use routing::activity::{now_ms, StreamThrottle};
use routing::decide::ORIGINAL_DST_HEADER;
use routing::decide::{decide, Decision, ErrorReply, Forward, SandboxId};
use routing::key::KeyError;
use routing::{RequestView, Route, TargetBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Envoy's ORIGINAL_DST filter-state key; its factory parses `ip:port`.
const ORIGINAL_DST_KEY: &str = "envoy.network.transport_socket.original_dst_address";
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

impl RequestView for RequestHeaders<'_> {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
        match self.get(name) {
            Header::Absent => Ok(None),
            Header::One(v) => Ok(Some(v)),
            Header::Many => Err(KeyError::DuplicateHeader),
        }
    }
    fn authority(&self) -> Option<&[u8]> {
        match self.get(":authority") {
            Header::One(v) => Some(v),
            _ => None,
        }
    }
    fn path(&self) -> Option<&[u8]> {
        match self.get(":path") {
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
        self.route(s, false)
    }

    /// Data in either direction: throttled activity.
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
        // The request-path rules live in `routing::decide`, shared with sandbox-extproc.
        match decide(&gw.cfg, &gw.table, &s.request_headers(), after_hold) {
            Decision::Reply(ErrorReply {
                status,
                code,
                message,
                id,
                retry_after_secs,
            }) => self.send(
                s,
                Reply {
                    status,
                    code,
                    message: &message,
                    sandbox_id: id.as_deref(),
                    retry_after_secs,
                },
            ),
            Decision::Hold(id) => self.hold(s, id),
            Decision::Forward(f) => self.forward(s, f),
        }
    }

    fn forward(&mut self, s: &mut Stream<'_>, f: Forward) -> HeadersStatus {
        let gw = self.gw;
        let Forward {
            route,
            port,
            new_path,
            strip_original_dst,
            strip_token,
        } = f;
        if strip_original_dst {
            s.remove_request_header(ORIGINAL_DST_HEADER);
        }
        if strip_token {
            // The token is for the gateway; a sandbox never sees it (nor one meant for another).
            s.remove_request_header(&gw.cfg.access_token_header);
        }
        if let Some(p) = new_path {
            s.set_request_header(":path", &p);
            s.clear_route_cache();
        }
        let mut buf = TargetBuf::new();
        if !s.set_filter_state_typed(ORIGINAL_DST_KEY, route.target(port, &mut buf)) {
            let r = Reply {
                status: 500,
                code: "routing_failed",
                message: "Envoy rejected the upstream address",
                sandbox_id: Some(&route.spec.id),
                retry_after_secs: None,
            };
            return self.send(s, r);
        }
        let now = now_ms();
        route.activity.touch(now);
        self.throttle = StreamThrottle::new(now, gw.cfg.activity_stream_throttle);
        self.route = Some(route);
        s.increment_counter(gw.metrics.routed, None, 1);
        HeadersStatus::Continue
    }

    fn hold(&mut self, s: &mut Stream<'_>, id: SandboxId) -> HeadersStatus {
        let gw = self.gw;
        // Past the cap (a flood of unknown IDs), answer now as if the hold had expired.
        let Some(permit) = gw.holds.try_acquire() else {
            return self.route(s, true);
        };
        let Some(scheduler) = s.scheduler() else {
            return self.route(s, true);
        };
        s.increment_counter(gw.metrics.miss_holds, None, 1);
        self.hold_started = Some(Instant::now());
        let table = Arc::clone(&gw.table);
        let hold = gw.cfg.miss_hold;
        // The task owns the scheduler: it makes the only commit, then frees it.
        gw.spawn(async move {
            table.wait_for(&id, hold).await;
            drop(permit);
            scheduler.commit(EVENT_HOLD_DONE);
        });
        HeadersStatus::Stop
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
