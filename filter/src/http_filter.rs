//! The per-request HTTP filter: find the sandbox a request is for and send it there, or answer
//! with a JSON error. The rules are `routing::decide`'s (docs/design.md#request-path-rules);
//! this file applies them through the `ffi::Stream` trait, so it is unit-tested against a fake.
//!
//! Envoy re-enters a stream's hooks (a local reply sent from the scheduled hook runs
//! `stream_complete` before `send_response` returns), so every hook takes `&self` and the state
//! that changes is in `Cell`/`OnceCell`, never borrowed across a call into Envoy.

use crate::ffi::{Header, HeaderMap, HeadersStatus, HttpFilter, Stream};
use crate::gateway::Gateway;
use routing::activity::{now_ms, StreamSlot, StreamThrottle};
use routing::decide::{
    decide, decide_after_hold, decide_after_wake, open_stream, AfterHold, Decision, ErrorReply,
    FinalDecision, Forward, HeaderChange, ReplyCode, SandboxId, TokenHash, FORWARDED_HOST_HEADER,
    FORWARDED_PREFIX_HEADER, ORIGINAL_DST_HEADER,
};
use routing::holds::ClientKey;
use routing::key::KeyError;
use routing::wake::WakeEnd;
use routing::{RequestView, Route, TargetBuf};
use std::cell::{Cell, OnceCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Envoy's ORIGINAL_DST filter-state key; its factory parses `ip:port`.
pub const ORIGINAL_DST_KEY: &str = "envoy.network.transport_socket.original_dst_address";
/// The scheduler event that ends a miss hold.
pub const EVENT_HOLD_DONE: u64 = 1;
/// The scheduler event that ends a wake hold.
pub const EVENT_WAKE_DONE: u64 = 2;

/// Envoy's request headers as the routing core reads them. Borrowed, so the ~1 KiB snapshot
/// (32 inline entries) is never moved (callgrind showed no difference either way today: the
/// compiler builds it in place, but nothing then depends on that).
struct View<'a, H>(&'a H);

impl<H: HeaderMap> RequestView for View<'_, H> {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
        match self.0.get(name) {
            Header::Absent => Ok(None),
            Header::One(v) => Ok(Some(v)),
            Header::Many => Err(KeyError::DuplicateHeader),
        }
    }
    fn authority(&self) -> Option<&[u8]> {
        match self.0.get(":authority") {
            Header::One(v) => Some(v),
            _ => None,
        }
    }
    fn path(&self) -> Option<&[u8]> {
        match self.0.get(":path") {
            Header::One(v) => Some(v),
            _ => None,
        }
    }
}

pub struct SandboxFilter {
    gw: &'static Gateway,
    /// The route this stream was sent to (set once); long streams mark it active as data flows.
    route: OnceCell<Arc<Route>>,
    /// This stream's place in its sandbox's `max_streams_per_sandbox`, given back when Envoy
    /// destroys the filter (the stream is over: answered, closed or reset).
    slot: OnceCell<StreamSlot>,
    throttle: Cell<StreamThrottle>,
    /// Set while a miss hold is pending; taken by the scheduled event that ends it.
    hold_started: Cell<Option<Instant>>,
    /// Set while a wake hold is pending; taken by the scheduled event that ends it.
    wake_started: Cell<Option<Instant>>,
    /// Dropped with the filter (the stream is over, the client may have left): the wake hold's
    /// task then ends at once and gives its place among the held wakes back.
    wake_cancel: Cell<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Set by the wake hold's task when a lighter client's request took its place.
    wake_displaced: Cell<Option<Arc<AtomicBool>>>,
}

impl SandboxFilter {
    pub fn new(gw: &'static Gateway) -> Self {
        SandboxFilter {
            gw,
            route: OnceCell::new(),
            slot: OnceCell::new(),
            throttle: Cell::new(StreamThrottle::new(0, Duration::ZERO)),
            hold_started: Cell::new(None),
            wake_started: Cell::new(None),
            wake_cancel: Cell::new(None),
            wake_displaced: Cell::new(None),
        }
    }

    /// Data in either direction: throttled activity.
    #[inline]
    fn on_data(&self) {
        if let Some(route) = self.route.get() {
            let now = now_ms();
            let mut throttle = self.throttle.get();
            if throttle.ready(now, self.gw.cfg.activity_stream_throttle) {
                route.activity.touch(now);
            }
            self.throttle.set(throttle);
        }
    }

    fn after_hold<S: Stream>(&self, s: &mut S) -> HeadersStatus {
        let gw = self.gw;
        let d = decide_after_hold(&gw.cfg, &gw.table, &View(&s.request_headers()));
        match d {
            AfterHold::Reply(r) => self.send(s, &r),
            AfterHold::Forward(f) => self.forward(s, f),
            AfterHold::Wake(id, hash) => self.wake(s, id, hash),
        }
    }

    /// A wake hold that gave its place to a lighter client's: `429 too_many_wakes`.
    fn too_many_wakes<S: Stream>(&self, s: &mut S) -> HeadersStatus {
        let gw = self.gw;
        let d = decide_after_wake(&gw.cfg, &gw.table, &View(&s.request_headers()));
        match d {
            // Woken meanwhile: serve it after all.
            FinalDecision::Forward(f) => self.forward(s, f),
            FinalDecision::Reply(r) => {
                let busy = match r.id {
                    Some(id) => ErrorReply::about(ReplyCode::TooManyWakes, id, &gw.cfg),
                    None => r,
                };
                self.send(s, &busy)
            }
        }
    }

    fn after_wake<S: Stream>(&self, s: &mut S) -> HeadersStatus {
        let gw = self.gw;
        let d = decide_after_wake(&gw.cfg, &gw.table, &View(&s.request_headers()));
        match d {
            FinalDecision::Reply(r) => self.send(s, &r),
            FinalDecision::Forward(f) => self.forward(s, f),
        }
    }

    /// Holds a request for a paused sandbox (its token checked) while the controller wakes it,
    /// on the gateway's runtime; the scheduled `EVENT_WAKE_DONE` decides it then.
    fn wake<S: Stream>(&self, s: &mut S, id: SandboxId, hash: TokenHash) -> HeadersStatus {
        let gw = self.gw;
        let Some(waker) = &gw.waker else {
            // No waker, no paused set: unreachable, answered as a wake that did not finish.
            return self.send(s, &ErrorReply::about(ReplyCode::SandboxWaking, id, &gw.cfg));
        };
        let Some(scheduler) = s.scheduler() else {
            return self.after_wake(s);
        };
        // Always admitted; when `max_held` are held, the heaviest client's oldest gives way.
        let client = s
            .source_address()
            .map_or(ClientKey::Unknown, ClientKey::from_source);
        let (place, displaced) = waker.admit(client);
        if displaced {
            s.increment_counter(gw.metrics.wake_holds_displaced, None, 1);
        }
        self.wake_started.set(Some(Instant::now()));
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        self.wake_cancel.set(Some(cancel));
        let gave_way = Arc::new(AtomicBool::new(false));
        self.wake_displaced.set(Some(Arc::clone(&gave_way)));
        let waker = Arc::clone(waker);
        // The task owns the scheduler: it makes the only commit, then frees it.
        gw.spawn(async move {
            tokio::select! {
                end = waker.hold(&place, &id, hash) => {
                    gave_way.store(end == WakeEnd::Displaced, Ordering::Release);
                }
                // The filter is gone: the commit below reaches no stream.
                _ = cancelled => {}
            }
            drop(place);
            crate::ffi::Commit::commit(&scheduler, EVENT_WAKE_DONE);
        });
        s.increment_counter(gw.metrics.wake_holds, None, 1);
        HeadersStatus::Stop
    }

    fn forward<S: Stream>(&self, s: &mut S, f: Forward) -> HeadersStatus {
        let gw = self.gw;
        let slot = match open_stream(&gw.cfg, &f) {
            Ok(slot) => slot,
            Err(busy) => return self.send(s, &busy),
        };
        let Forward {
            route,
            port,
            new_path,
            forwarded_prefix,
            host,
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
        apply(s, FORWARDED_PREFIX_HEADER, forwarded_prefix);
        if let Some(h) = host {
            // No route-cache clear for the Host: Envoy's route stays the one chosen on the
            // client's Host (a loopback Host must not select another virtual host). After a path
            // rewrite the cache is cleared anyway and the new match sees both.
            s.set_request_header(":authority", h.authority.as_bytes());
            apply(s, FORWARDED_HOST_HEADER, h.forwarded_host);
        }
        if let Some(p) = new_path {
            s.set_request_header(":path", &p);
            s.clear_route_cache();
        }
        let mut buf = TargetBuf::new();
        if !s.set_filter_state_typed(ORIGINAL_DST_KEY, route.target(port, &mut buf)) {
            let r = ErrorReply {
                // Table keys are validated IDs, so this always fits.
                id: SandboxId::from(route.spec.id.as_str()).ok(),
                ..ErrorReply::new(ReplyCode::RoutingFailed)
            };
            return self.send(s, &r);
        }
        let now = now_ms();
        route.activity.touch(now);
        self.throttle
            .set(StreamThrottle::new(now, gw.cfg.activity_stream_throttle));
        // A stream is routed once; a second route (impossible: Continue ends the decision) is
        // ignored rather than replacing the one whose upstream Envoy already has.
        let _ = self.route.set(route);
        let _ = self.slot.set(slot);
        s.increment_counter(gw.metrics.routed, None, 1);
        HeadersStatus::Continue
    }

    fn hold<S: Stream>(&self, s: &mut S, id: SandboxId) -> HeadersStatus {
        let gw = self.gw;
        let Some(scheduler) = s.scheduler() else {
            return self.after_hold(s);
        };
        // Always admitted; when the book is full the heaviest client's oldest hold gives way.
        let client = s
            .source_address()
            .map_or(ClientKey::Unknown, ClientKey::from_source);
        let (hold, displaced) = gw.holds.admit(client);
        if displaced {
            s.increment_counter(gw.metrics.miss_holds_displaced, None, 1);
        }
        self.hold_started.set(Some(Instant::now()));
        let table = Arc::clone(&gw.table);
        let wait = gw.cfg.miss_hold;
        // The task owns the scheduler: it makes the only commit, then frees it.
        gw.spawn(async move {
            hold.wait(&table, &id, wait).await;
            drop(hold);
            crate::ffi::Commit::commit(&scheduler, EVENT_HOLD_DONE);
        });
        s.increment_counter(gw.metrics.miss_holds, None, 1);
        HeadersStatus::Stop
    }

    fn send<S: Stream>(&self, s: &mut S, r: &ErrorReply) -> HeadersStatus {
        s.increment_counter(self.gw.metrics.local_replies, Some(r.code.code()), 1);
        tracing::debug!(
            status = r.status(),
            code = r.code.code(),
            sandbox_id = r.id.as_deref(),
            "local reply"
        );
        // Envoy may run other hooks of this filter inside this call: no state is borrowed here.
        crate::reply::send(s, r);
        HeadersStatus::Replied
    }
}

/// One header change from `decide`; `Set` replaces every value the client sent.
fn apply<S: Stream>(s: &mut S, name: &str, change: HeaderChange) {
    match change {
        HeaderChange::Unchanged => {}
        HeaderChange::Remove => s.remove_request_header(name),
        // If Envoy ever refused the value, the client's copies must still not pass as ours.
        HeaderChange::Set(v) if !s.set_request_header(name, &v) => s.remove_request_header(name),
        HeaderChange::Set(_) => {}
    }
}

impl HttpFilter for SandboxFilter {
    fn on_request_headers<S: Stream>(&self, s: &mut S, _end_of_stream: bool) -> HeadersStatus {
        let gw = self.gw;
        let d = decide(&gw.cfg, &gw.table, &View(&s.request_headers()));
        match d {
            Decision::Reply(r) => self.send(s, &r),
            Decision::Ready(r) => {
                tracing::trace!(routes = r.routes, "readiness probe: ready");
                crate::reply::send_ready(s, &r);
                HeadersStatus::Replied
            }
            Decision::Hold(id) => self.hold(s, id),
            Decision::Wake(id, hash) => self.wake(s, id, hash),
            Decision::Forward(f) => self.forward(s, f),
        }
    }

    fn on_request_body<S: Stream>(&self, _s: &mut S, _end_of_stream: bool) {
        self.on_data();
    }

    fn on_response_body<S: Stream>(&self, _s: &mut S, _end_of_stream: bool) {
        self.on_data();
    }

    fn on_scheduled<S: Stream>(&self, s: &mut S, event_id: u64) {
        // No hold of that kind pending: a stale or repeated event changes nothing.
        let (pending, metric) = match event_id {
            EVENT_HOLD_DONE => (&self.hold_started, self.gw.metrics.miss_hold_ms),
            EVENT_WAKE_DONE => (&self.wake_started, self.gw.metrics.wake_hold_ms),
            _ => return,
        };
        let Some(started) = pending.take() else {
            return;
        };
        s.record_histogram(metric, started.elapsed().as_millis() as u64);
        let gave_way = self
            .wake_displaced
            .take()
            .is_some_and(|d| d.load(Ordering::Acquire));
        let next = if event_id == EVENT_HOLD_DONE {
            self.after_hold(s)
        } else if gave_way {
            self.too_many_wakes(s)
        } else {
            self.after_wake(s)
        };
        if next == HeadersStatus::Continue {
            s.continue_decoding();
        }
    }

    fn on_panic<S: Stream>(s: &mut S) {
        crate::reply::send(s, &ErrorReply::new(ReplyCode::InternalError));
    }
}

#[cfg(test)]
#[path = "http_filter_tests.rs"]
mod tests;
