//! The real Envoy behind the `filter.rs` traits: safe wrappers over the raw ABI calls.
//!
//! An `EnvoyStream` exists only inside a hook, borrowed for that hook, so buffers Envoy lends us
//! (header values) cannot outlive it; getters borrow `&self` and setters need `&mut self`, so a
//! value read from a header map can't be used after the map changes.

use super::abi;
use super::filter::{Commit, ConfigEnvoy, Header, HeaderMap, MetricError, MetricId, Stream};
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

const INLINE_HEADERS: usize = 32;
const EMPTY_HEADER: abi::envoy_http_header = abi::envoy_http_header {
    key_ptr: std::ptr::null(),
    key_length: 0,
    value_ptr: std::ptr::null(),
    value_length: 0,
};

/// A snapshot of the request headers, borrowed from the stream: the values are Envoy's buffers,
/// valid until the header map changes, which needs `&mut Stream` and so ends this borrow.
pub struct EnvoyHeaders<'s> {
    inline: [abi::envoy_http_header; INLINE_HEADERS],
    spill: Vec<abi::envoy_http_header>,
    len: usize,
    _stream: PhantomData<&'s EnvoyStream<'s>>,
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

impl EnvoyHeaders<'_> {
    fn entries(&self) -> &[abi::envoy_http_header] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill[..self.len]
        }
    }
}

impl HeaderMap for EnvoyHeaders<'_> {
    fn get(&self, name: &str) -> Header<'_> {
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
pub struct EnvoyStream<'h> {
    raw: abi::filter_envoy_ptr,
    _hook: PhantomData<&'h mut ()>,
}

impl EnvoyStream<'_> {
    /// # Safety
    /// `raw` must be the stream pointer Envoy passed to the running hook; the value must not
    /// outlive that hook.
    pub(super) unsafe fn from_hook(raw: abi::filter_envoy_ptr) -> Self {
        EnvoyStream {
            raw,
            _hook: PhantomData,
        }
    }
}

impl Stream for EnvoyStream<'_> {
    type Headers<'a>
        = EnvoyHeaders<'a>
    where
        Self: 'a;
    type Scheduler = EnvoyScheduler;

    fn set_request_header(&mut self, name: &str, value: &[u8]) -> bool {
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
    fn request_headers(&self) -> EnvoyHeaders<'_> {
        // SAFETY: `raw` is live for this hook.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(
                self.raw,
                abi::HEADER_TYPE_REQUEST,
            )
        };
        let mut snap = EnvoyHeaders {
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
        let filled = n > 0 && {
            // SAFETY: `dst` has room for the `n` entries Envoy reported for this same map, and
            // nothing changes the map between the two calls (we hold `&self` on the worker).
            unsafe {
                abi::envoy_dynamic_module_callback_http_get_headers(
                    self.raw,
                    abi::HEADER_TYPE_REQUEST,
                    dst,
                )
            }
        };
        if filled {
            snap.len = n;
        }
        snap
    }

    fn remove_request_header(&mut self, name: &str) {
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
    fn send_response(
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
    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool {
        // SAFETY: `raw` is live for this hook; Envoy copies both buffers during the call.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_filter_state_typed(
                self.raw,
                mbuf(key.as_bytes()),
                mbuf(value.as_bytes()),
            )
        }
    }

    fn source_address(&self) -> Option<&[u8]> {
        let mut out = abi::envoy_buffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `raw` is live for this hook; Envoy writes a pointer into its own stream info,
        // which lives as long as the stream, and `&self` keeps this borrow inside the hook.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.raw,
                abi::ATTRIBUTE_SOURCE_ADDRESS,
                &mut out,
            )
        };
        // SAFETY: on success `out` describes Envoy's bytes, alive for the hook (see above).
        let b = ok.then(|| unsafe { bytes(out.ptr, out.length) })?;
        (!b.is_empty()).then_some(b)
    }

    fn clear_route_cache(&mut self) {
        // SAFETY: `raw` is live for this hook.
        unsafe { abi::envoy_dynamic_module_callback_http_clear_route_cache(self.raw) }
    }

    /// Resumes a request stopped in `on_request_headers`.
    fn continue_decoding(&mut self) {
        // SAFETY: `raw` is live for this hook, which runs on the stream's worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.raw) }
    }

    fn scheduler(&mut self) -> Option<EnvoyScheduler> {
        // SAFETY: `raw` is live for this hook, which runs on the stream's worker thread.
        let raw = unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.raw) };
        (!raw.is_null()).then_some(EnvoyScheduler { raw })
    }

    fn increment_counter(&mut self, id: MetricId, label: Option<&str>, by: u64) {
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

    fn record_histogram(&mut self, id: MetricId, value: u64) {
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

/// A stream's scheduler (see [`Commit`]). Not `Clone`: its one owner makes the last commit and
/// then frees Envoy's object by dropping it.
///
/// Envoy's object refers to the worker's dispatcher: a commit after Envoy has torn its workers
/// down (server shutdown, before the config is destroyed) is Envoy's to survive, and nothing here
/// can prevent it; the window is at most one hold (a miss hold, `miss_hold_ms`, or a wake hold,
/// `wake.timeout_ms`), and closes when the config's runtime shuts down (its tasks are dropped).
pub struct EnvoyScheduler {
    raw: abi::filter_scheduler_ptr,
}

// SAFETY: Envoy documents scheduler_commit as callable from any thread; the pointer is only
// freed in Drop, which takes ownership, so no commit can race with it.
unsafe impl Send for EnvoyScheduler {}

impl Commit for EnvoyScheduler {
    fn commit(&self, event_id: u64) {
        // SAFETY: `raw` is live until Drop; commit is thread-safe per the ABI.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.raw, event_id)
        }
    }
}

impl Drop for EnvoyScheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from scheduler_new and is deleted exactly once, here.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(self.raw) }
    }
}

/// The filter config as Envoy sees it. Metric definitions are only accepted during config load.
pub struct EnvoyConfig {
    raw: abi::filter_config_envoy_ptr,
}

#[derive(Clone, Copy)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl EnvoyConfig {
    /// # Safety
    /// `raw` must be the config pointer Envoy passed to the running config hook.
    pub(super) unsafe fn from_hook(raw: abi::filter_config_envoy_ptr) -> Self {
        EnvoyConfig { raw }
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
        // SAFETY: `raw` is the config of the running config hook (`from_hook`); outside
        // config_new Envoy refuses the definition with an error code (Frozen), nothing worse;
        // buffers outlive the call; `id` is a valid out-pointer.
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
}

impl ConfigEnvoy for EnvoyConfig {
    type Scheduler = EnvoyConfigScheduler;

    fn define_counter(&self, name: &'static str, labels: &[&str]) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Counter, name, labels)
    }
    fn define_gauge(&self, name: &'static str) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Gauge, name, &[])
    }
    fn define_histogram(&self, name: &'static str) -> Result<MetricId, MetricError> {
        self.define(MetricKind::Histogram, name, &[])
    }

    /// Config-level updates; called on the main thread from `on_config_scheduled`.
    fn set_gauge(&self, id: MetricId, value: u64) {
        // SAFETY: `raw` is the config of the running config hook (`from_hook`); `id` came from
        // define_gauge on it.
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
    fn increment_counter(&self, id: MetricId, by: u64) {
        // SAFETY: `raw` is the config of the running config hook (`from_hook`); `id` came from
        // define_counter on it.
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
    fn scheduler(&self) -> Option<EnvoyConfigScheduler> {
        // SAFETY: `raw` is the config of the running config hook (`from_hook`), on the main
        // thread.
        let raw = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.raw)
        };
        (!raw.is_null()).then_some(EnvoyConfigScheduler { raw })
    }
}

/// The config's scheduler (events run on the main thread).
pub struct EnvoyConfigScheduler {
    raw: abi::filter_config_scheduler_ptr,
}

// SAFETY: commit is documented as callable from any thread; delete happens once, in Drop, which
// takes the value, so no commit through it can race the delete (shared holders use an `Arc`,
// and the last one to drop it deletes).
unsafe impl Send for EnvoyConfigScheduler {}
// SAFETY: as for Send: commit is thread-safe, and `&self` gives access to nothing else.
unsafe impl Sync for EnvoyConfigScheduler {}

impl Commit for EnvoyConfigScheduler {
    fn commit(&self, event_id: u64) {
        // SAFETY: `raw` is live until Drop.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.raw, event_id,
            )
        }
    }
}

impl Drop for EnvoyConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: `raw` came from config_scheduler_new and is deleted exactly once, here.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.raw) }
    }
}
