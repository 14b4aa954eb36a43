//! What a module implements, and what it may ask of Envoy: the traits between the generic hooks
//! (`hooks.rs`) and the application. Nothing here knows what the filter does.
//!
//! A filter only ever gets `&self`: Envoy re-enters a stream's hooks (measured on 1.40: a local
//! reply sent from the scheduled hook runs `stream_complete` before it returns), so per-stream
//! state that changes must live in `Cell`/`OnceCell`/`RefCell`, never borrowed across a call
//! into Envoy. `Stream` and
//! `ConfigEnvoy` are traits so the filter's logic runs against fakes in unit tests.

use std::fmt::Display;

/// What a request-headers hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Let the request through.
    Continue,
    /// Pause the request (buffering its body under watermarks); a scheduled event resumes it with
    /// [`Stream::continue_decoding`].
    Stop,
    /// A local reply was sent; stop here.
    Replied,
}

/// One configured filter (one `config_new`): shared by every worker's streams, so `Sync`.
///
/// # Safety
/// [`HttpFilterConfig::new_filter`] is handed `&'static self`, but the config lives only until
/// Envoy destroys it, after the last filter made from it. An implementation must keep that
/// reference inside the filter it returns: never move it (or anything borrowing it) into another
/// thread, a spawned task or a global, which could outlive the config.
pub unsafe trait HttpFilterConfig: Sized + Send + Sync + 'static {
    type Filter: HttpFilter;
    type Error: Display;

    /// Parses and starts the config; an error makes Envoy reject the config (fail closed).
    fn new<E: ConfigEnvoy>(envoy: &E, name: &str, config: &[u8]) -> Result<Self, Self::Error>;

    /// A filter for a new stream. The config outlives every filter made from it (and nothing
    /// else: see the trait's safety contract).
    fn new_filter(&'static self) -> Self::Filter;

    /// An event committed to the config's scheduler, on Envoy's main thread.
    fn on_scheduled<E: ConfigEnvoy>(&self, _envoy: &E, _event_id: u64) {}
}

/// One HTTP stream's filter. Every hook takes `&self` (see the module docs).
pub trait HttpFilter {
    fn on_request_headers<S: Stream>(&self, stream: &mut S, end_of_stream: bool) -> HeadersStatus;

    fn on_request_body<S: Stream>(&self, _stream: &mut S, _end_of_stream: bool) {}

    fn on_response_body<S: Stream>(&self, _stream: &mut S, _end_of_stream: bool) {}

    /// An event committed to a scheduler made by [`Stream::scheduler`]; may arrive after the
    /// reason for it is gone (the filter must ignore events it no longer expects).
    fn on_scheduled<S: Stream>(&self, _stream: &mut S, _event_id: u64) {}

    /// A hook panicked (caught, counted): answer the request without trusting the filter's state.
    fn on_panic<S: Stream>(stream: &mut S);
}

/// What a header lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header<'a> {
    Absent,
    One(&'a [u8]),
    /// Sent more than once.
    Many,
}

/// A read-only view of the request headers, valid while the stream is not changed.
pub trait HeaderMap {
    /// The value of `name` (lowercase, as Envoy stores names), or `Many` if sent repeatedly.
    fn get(&self, name: &str) -> Header<'_>;
}

/// Wakes a stream (or the config) from any thread: the event runs the `on_scheduled` hook on the
/// owner's thread, or nothing if the owner is gone. Dropping it frees Envoy's object, so the
/// holder of the last commit drops it.
pub trait Commit: Send + 'static {
    fn commit(&self, event_id: u64);
}

/// One HTTP stream, for the duration of one hook. Getters borrow `&self`, setters `&mut self`, so
/// a header value read from the map cannot be used after the map changes.
pub trait Stream {
    type Headers<'a>: HeaderMap
    where
        Self: 'a;
    type Scheduler: Commit;

    fn request_headers(&self) -> Self::Headers<'_>;
    /// Sets a request header; an empty value is refused (Envoy would read it as "remove").
    fn set_request_header(&mut self, name: &str, value: &[u8]) -> bool;
    fn remove_request_header(&mut self, name: &str);
    /// Sends a local reply; Envoy ends the stream with it (and may run other hooks of this
    /// filter, e.g. `stream_complete`, before the call returns).
    fn send_response(&mut self, status: u32, headers: &[(&str, &[u8])], body: &[u8], details: &str);
    /// Sets a typed filter-state object built by Envoy's factory for `key`; false if rejected.
    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool;
    fn clear_route_cache(&mut self);
    /// The downstream client's address as Envoy reports it (`ip:port`); `None` if unknown.
    fn source_address(&self) -> Option<&[u8]>;
    /// Resumes a request stopped with [`HeadersStatus::Stop`].
    fn continue_decoding(&mut self);
    /// A scheduler for this stream; `None` if Envoy could not make one.
    fn scheduler(&mut self) -> Option<Self::Scheduler>;
    fn increment_counter(&mut self, id: MetricId, label: Option<&str>, by: u64);
    fn record_histogram(&mut self, id: MetricId, value: u64);
}

/// The filter config as Envoy sees it, during `config_new` and on the main thread afterwards.
pub trait ConfigEnvoy {
    type Scheduler: Commit + Sync;

    /// Metrics can only be defined while the config is being created.
    fn define_counter(&self, name: &'static str, labels: &[&str]) -> Result<MetricId, MetricError>;
    fn define_gauge(&self, name: &'static str) -> Result<MetricId, MetricError>;
    fn define_histogram(&self, name: &'static str) -> Result<MetricId, MetricError>;
    fn set_gauge(&self, id: MetricId, value: u64);
    fn increment_counter(&self, id: MetricId, by: u64);
    /// A scheduler whose events run [`HttpFilterConfig::on_scheduled`] on the main thread.
    fn scheduler(&self) -> Option<Self::Scheduler>;
}

/// A metric defined at config load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricId(pub(super) usize);

impl MetricId {
    /// For fakes of [`ConfigEnvoy`] in tests.
    #[cfg(test)]
    pub fn for_test(n: usize) -> Self {
        MetricId(n)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("defining metric {name}: Envoy returned {code}")]
pub struct MetricError {
    pub(super) name: &'static str,
    pub(super) code: u32,
}
