//! Safe handles over the raw ABI: what the filter logic is allowed to do to Envoy.
//!
//! A `Stream` exists only inside a hook, borrowed for that hook, so buffers Envoy lends us
//! (header values) cannot outlive it; getters borrow `&self` and setters need `&mut self`, so a
//! value read from a header map can't be used after the map changes.

use super::abi;
use std::ffi::c_char;
use std::marker::PhantomData;

fn mbuf(b: &[u8]) -> abi::module_buffer {
    abi::module_buffer {
        ptr: b.as_ptr() as *const c_char,
        length: b.len(),
    }
}

const NULL_BUF: abi::module_buffer = abi::module_buffer {
    ptr: std::ptr::null(),
    length: 0,
};

/// What a header lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header<'a> {
    Absent,
    One(&'a [u8]),
    /// Sent more than once.
    Many,
}

const INLINE_HEADERS: usize = 32;
const EMPTY_HEADER: abi::envoy_http_header = abi::envoy_http_header {
    key_ptr: std::ptr::null(),
    key_length: 0,
    value_ptr: std::ptr::null(),
    value_length: 0,
};

/// A snapshot of the request headers, borrowed from the stream: the values are Envoy's buffers,
/// valid until the header map changes, which needs `&mut Stream` and so ends this borrow.
pub struct RequestHeaders<'s> {
    inline: [abi::envoy_http_header; INLINE_HEADERS],
    spill: Vec<abi::envoy_http_header>,
    len: usize,
    _stream: PhantomData<&'s Stream<'s>>,
}

/// # Safety
/// `ptr`/`len` must describe memory that lives for `'a`.
unsafe fn bytes<'a>(ptr: *const c_char, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
    }
}

impl RequestHeaders<'_> {
    fn entries(&self) -> &[abi::envoy_http_header] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill[..self.len]
        }
    }

    /// The value of `name` (lowercase, as Envoy stores names), or `Many` if sent repeatedly.
    pub fn get(&self, name: &str) -> Header<'_> {
        let mut found = Header::Absent;
        for h in self.entries() {
            // SAFETY: Envoy's header buffers live until the map changes, which cannot happen
            // while this snapshot borrows the stream.
            let key = unsafe { bytes(h.key_ptr, h.key_length) };
            if key == name.as_bytes() {
                if found != Header::Absent {
                    return Header::Many;
                }
                // SAFETY: as above.
                found = Header::One(unsafe { bytes(h.value_ptr, h.value_length) });
            }
        }
        found
    }
}

/// One HTTP stream, for the duration of one hook.
pub struct Stream<'h> {
    raw: abi::filter_envoy_ptr,
    _hook: PhantomData<&'h mut ()>,
}

impl Stream<'_> {
    /// # Safety
    /// `raw` must be the filter pointer Envoy passed to the running hook.
    pub(super) unsafe fn from_hook(raw: abi::filter_envoy_ptr) -> Self {
        Stream {
            raw,
            _hook: PhantomData,
        }
    }

    pub fn set_request_header(&mut self, name: &str, value: &[u8]) -> bool {
        if value.is_empty() {
            // An empty value means "remove" to Envoy; never do that by accident.
            return false;
        }
        // SAFETY: `raw` is live for this hook; Envoy copies both buffers during the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST,
                mbuf(name.as_bytes()),
                mbuf(value),
            )
        }
    }

    /// All request headers in one call. Envoy's per-name lookup costs ~540 instructions for a
    /// present header and ~1,900 for an absent one (callgrind); the request path asks about
    /// several mostly-absent headers, so one snapshot scanned in Rust is far cheaper.
    pub fn request_headers(&self) -> RequestHeaders<'_> {
        // SAFETY: `raw` is live for this hook.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(
                self.raw,
                abi::HEADER_TYPE_REQUEST,
            )
        };
        let mut snap = RequestHeaders {
            inline: [EMPTY_HEADER; INLINE_HEADERS],
            spill: Vec::new(),
            len: 0,
            _stream: PhantomData,
        };
        let dst = if n <= INLINE_HEADERS {
            snap.inline.as_mut_ptr()
        } else {
            // Rare (more than 32 headers): one allocation rather than a wrong answer.
            snap.spill = vec![EMPTY_HEADER; n];
            snap.spill.as_mut_ptr()
        };
        // SAFETY: `dst` has room for the `n` entries Envoy reported for this same map, and nothing
        // changes the map between the two calls (we hold `&self` on the worker thread).
        if n > 0
            && unsafe {
                abi::envoy_dynamic_module_callback_http_get_headers(
                    self.raw,
                    abi::HEADER_TYPE_REQUEST,
                    dst,
                )
            }
        {
            snap.len = n;
        }
        snap
    }

    pub fn remove_request_header(&mut self, name: &str) {
        // SAFETY: `raw` is live for this hook; a null value is the ABI's "remove".
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST,
                mbuf(name.as_bytes()),
                NULL_BUF,
            );
        }
    }

    /// Sends a local reply; Envoy ends the stream with it.
    pub fn send_response(
        &mut self,
        status: u32,
        headers: &[(&str, &[u8])],
        body: &[u8],
        details: &str,
    ) {
        let mut hs: Vec<abi::module_http_header> = headers
            .iter()
            .map(|(k, v)| abi::module_http_header {
                key_ptr: k.as_ptr() as *const c_char,
                key_length: k.len(),
                value_ptr: v.as_ptr() as *const c_char,
                value_length: v.len(),
            })
            .collect();
        // SAFETY: `raw` is live for this hook; the header array and buffers outlive the call
        // and Envoy copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.raw,
                status,
                hs.as_mut_ptr(),
                hs.len(),
                mbuf(body),
                mbuf(details.as_bytes()),
            );
        }
    }

    /// Sets a typed filter-state object built by Envoy's factory for `key` from `value`.
    /// Returns false when Envoy rejects the value.
    pub fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool {
        // SAFETY: `raw` is live for this hook; Envoy copies both buffers during the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_filter_state_typed(
                self.raw,
                mbuf(key.as_bytes()),
                mbuf(value.as_bytes()),
            )
        }
    }

    pub fn clear_route_cache(&mut self) {
        // SAFETY: `raw` is live for this hook.
        unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(self.raw) }
    }

    /// Resumes a request stopped in `on_request_headers`.
    pub fn continue_decoding(&mut self) {
        // SAFETY: `raw` is live for this hook, which runs on the stream's worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.raw) }
    }

    /// A handle another thread can use to wake this stream (see `Scheduler`).
    pub fn scheduler(&mut self) -> Option<Scheduler> {
        // SAFETY: `raw` is live for this hook, which runs on the stream's worker thread.
        let raw = unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.raw) };
        (!raw.is_null()).then_some(Scheduler { raw })
    }

    pub fn increment_counter(&mut self, id: MetricId, label: Option<&str>, by: u64) {
        let mut labels = label.map(|l| [mbuf(l.as_bytes())]);
        let (ptr, len) = match labels.as_mut() {
            Some(l) => (l.as_mut_ptr(), 1),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: `raw` is live for this hook; `id` came from define_* on this config; the label
        // array outlives the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.raw, id.0, ptr, len, by,
            );
        }
    }

    pub fn record_histogram(&mut self, id: MetricId, value: u64) {
        // SAFETY: `raw` is live for this hook; `id` came from define_histogram on this config.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_record_histogram_value(
                self.raw,
                id.0,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }
}

/// Wakes a stream from any thread: `commit(event)` runs `on_scheduled(event)` on the stream's
/// worker, or nothing if the stream is already gone. Dropping it frees Envoy's object, so the
/// owner of the last commit must be the one that drops it (it is not `Clone`).
pub struct Scheduler {
    raw: abi::filter_scheduler_ptr,
}

// SAFETY: Envoy documents scheduler_commit as callable from any thread; the pointer is only
// freed in Drop, which takes ownership, so no commit can race with it.
unsafe impl Send for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event_id: u64) {
        // SAFETY: `raw` is live until Drop; commit is thread-safe per the ABI.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.raw, event_id)
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from scheduler_new and is deleted exactly once, here.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(self.raw) }
    }
}

/// A metric defined at config load.
#[derive(Debug, Clone, Copy)]
pub struct MetricId(usize);

#[derive(Debug, thiserror::Error)]
#[error("defining metric {name}: Envoy returned {code}")]
pub struct MetricError {
    name: &'static str,
    code: u32,
}

/// The filter config as Envoy sees it. Metric definitions are only accepted during config load.
pub struct FilterConfigHandle {
    raw: abi::filter_config_envoy_ptr,
}

// SAFETY: the config pointer stays valid until config_destroy (which stops every thread that
// holds this first); the calls made through it (config-level metrics, scheduler creation) are the
// ones Envoy documents as usable outside a stream.
unsafe impl Send for FilterConfigHandle {}
unsafe impl Sync for FilterConfigHandle {}

#[derive(Clone, Copy)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl FilterConfigHandle {
    pub(super) fn new(raw: abi::filter_config_envoy_ptr) -> Self {
        FilterConfigHandle { raw }
    }

    fn define(
        &self,
        kind: MetricKind,
        name: &'static str,
        labels: &[&str],
    ) -> Result<MetricId, MetricError> {
        let mut names: Vec<abi::module_buffer> =
            labels.iter().map(|l| mbuf(l.as_bytes())).collect();
        let names_ptr = if names.is_empty() {
            std::ptr::null_mut()
        } else {
            names.as_mut_ptr()
        };
        let mut id = 0usize;
        let f = match kind {
            MetricKind::Counter => {
                abi::envoy_dynamic_module_callback_http_filter_config_define_counter
            }
            MetricKind::Gauge => abi::envoy_dynamic_module_callback_http_filter_config_define_gauge,
            MetricKind::Histogram => {
                abi::envoy_dynamic_module_callback_http_filter_config_define_histogram
            }
        };
        // SAFETY: `raw` is the config being created (define_* is only valid during config_new,
        // which is where this is called); buffers outlive the call; `id` is a valid out-pointer.
        let code = unsafe {
            f(
                self.raw,
                mbuf(name.as_bytes()),
                names_ptr,
                names.len(),
                &mut id,
            )
        };
        if code == abi::METRICS_SUCCESS {
            Ok(MetricId(id))
        } else {
            Err(MetricError { name, code })
        }
    }

    pub fn define_counter(
        &self,
        name: &'static str,
        labels: &[&str],
    ) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Counter, name, labels)
    }
    pub fn define_gauge(&self, name: &'static str) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Gauge, name, &[])
    }
    pub fn define_histogram(&self, name: &'static str) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Histogram, name, &[])
    }

    /// Config-level updates; called on the main thread from `on_config_scheduled`.
    pub fn set_gauge(&self, id: MetricId, value: u64) {
        // SAFETY: `raw` is live (see the Send/Sync note); `id` came from define_gauge.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(
                self.raw,
                id.0,
                std::ptr::null_mut(),
                0,
                value,
            );
        }
    }
    pub fn increment_counter(&self, id: MetricId, by: u64) {
        // SAFETY: `raw` is live (see the Send/Sync note); `id` came from define_counter.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.raw,
                id.0,
                std::ptr::null_mut(),
                0,
                by,
            );
        }
    }

    /// A scheduler whose events run `on_config_scheduled` on Envoy's main thread.
    pub fn scheduler(&self) -> Option<ConfigScheduler> {
        // SAFETY: `raw` is the live config; called from config_new on the main thread.
        let raw = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.raw)
        };
        (!raw.is_null()).then_some(ConfigScheduler { raw })
    }
}

/// Like `Scheduler`, for the config (events run on the main thread).
pub struct ConfigScheduler {
    raw: abi::filter_config_scheduler_ptr,
}

// SAFETY: commit is documented as callable from any thread; delete happens once, in Drop, after
// its owner (the config) has stopped the threads that commit.
unsafe impl Send for ConfigScheduler {}
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    pub fn commit(&self, event_id: u64) {
        // SAFETY: `raw` is live until Drop.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.raw, event_id,
            )
        }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from config_scheduler_new and is deleted exactly once, here.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.raw) }
    }
}
