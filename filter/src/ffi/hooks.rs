//! The symbols Envoy looks up in the module: every mandatory `envoy_dynamic_module_on_*` hook of
//! the 1.40 ABI, generic over the application's [`HttpFilterConfig`]. `export_http_filter!`
//! emits the `#[no_mangle]` functions; each calls the generic hook of the same name here.
//!
//! Every hook runs under one panic guard: unwinding into Envoy's C++ frames is undefined
//! behaviour, so a panic is caught and counted ([`panics`]); in `request_headers` or `scheduled`
//! it becomes a 500 for that request, in `config_new` a rejected config, elsewhere a default.
//!
//! Hooks only ever form `&Filter`. Envoy re-enters a stream's hooks: a local reply can run other
//! hooks of the same filter before `send_response` returns (measured on 1.40: `stream_complete`
//! inside a reply sent from `scheduled`; Envoy skips a module's response hooks after the
//! module's own local reply), so a
//! `&mut` formed per hook would alias. Each filter sits in a [`Slot`] that counts its hooks on
//! the stack: re-entries are counted ([`reentries`]; an end-to-end test drives one), and the one
//! exclusive access, [`take`] in `filter_destroy`, is refused with a counted panic (the filter is
//! leaked, never freed under a running hook) if it ever overlaps another hook.

use super::abi;
use super::envoy::{EnvoyConfig, EnvoyStream};
use super::filter::{HeadersStatus, HttpFilter, HttpFilterConfig};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);
static REENTRIES: AtomicU64 = AtomicU64::new(0);

/// Panics caught at the Envoy boundary since the module was loaded.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Hooks entered while another hook of the same filter was on the stack.
pub fn reentries() -> u64 {
    REENTRIES.load(Ordering::Relaxed)
}

fn guard<T>(hook: &'static str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            note_panic(hook, payload);
            on_panic
        }
    }
}

/// Counts and logs a caught panic. Nothing here may unwind into Envoy: the payload is leaked
/// rather than dropped (its `Drop` could panic again), and the log line runs under its own
/// `catch_unwind` (a subscriber could panic).
fn note_panic(hook: &'static str, payload: Box<dyn std::any::Any + Send>) {
    PANICS.fetch_add(1, Ordering::Relaxed);
    std::mem::forget(payload);
    if let Err(again) = catch_unwind(|| tracing::error!(hook, "panic caught at the Envoy boundary"))
    {
        std::mem::forget(again);
    }
}

/// After a panic in a stream hook (or with no filter to ask): answer without trusting the
/// filter's state. A panic while answering is caught and counted too.
fn answer_panic<F: HttpFilter>(stream: &mut EnvoyStream<'_>) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| F::on_panic(stream))) {
        note_panic("on_panic", payload);
    }
}

/// A stream's filter as Envoy holds it (`filter_module_ptr`).
pub struct Slot<F> {
    filter: F,
    /// This filter's hooks now on the stack (all on the stream's worker thread).
    depth: Cell<u32>,
}

/// One hook's shared access to a filter; leaving the hook (or unwinding) ends it.
struct Entered<'a, F> {
    slot: &'a Slot<F>,
}

impl<F> Entered<'_, F> {
    fn filter(&self) -> &F {
        &self.slot.filter
    }
}

impl<F> Drop for Entered<'_, F> {
    fn drop(&mut self) {
        self.slot.depth.set(self.slot.depth.get().saturating_sub(1));
    }
}

/// `None` when `ptr` is null: `filter_new` returns null when making the filter failed, and
/// Envoy passes the module's pointer to later hooks without checking it.
///
/// # Safety
/// `ptr` must be null or a pointer returned by [`filter_new`] for this `F` and not yet
/// destroyed, and the call must be on the stream's worker thread (where Envoy runs all of a
/// stream's hooks).
unsafe fn enter<'a, F>(hook: &'static str, ptr: abi::filter_module_ptr) -> Option<Entered<'a, F>> {
    // SAFETY: per the contract a non-null slot is live; only shared references to it are ever
    // formed while it lives (its changing state is in `Cell`s), so nested hooks may hold them
    // at once.
    let slot = unsafe { (ptr as *const Slot<F>).as_ref() }?;
    let depth = slot.depth.get();
    if depth > 0 {
        REENTRIES.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(hook, depth, "Envoy re-entered the filter");
    }
    slot.depth.set(depth + 1);
    Some(Entered { slot })
}

/// # Safety
/// `buf` must be an Envoy buffer valid for the running hook; the slice must not outlive it.
unsafe fn envoy_bytes<'a>(buf: abi::envoy_buffer) -> &'a [u8] {
    if buf.ptr.is_null() || buf.length == 0 {
        &[]
    } else {
        // SAFETY: per the contract, ptr/length describe live memory for this hook.
        unsafe { std::slice::from_raw_parts(buf.ptr as *const u8, buf.length) }
    }
}

/// `envoy_dynamic_module_on_program_init`: runs `init`, returns the ABI version string.
pub fn program_init(init: fn()) -> *const std::ffi::c_char {
    guard("program_init", std::ptr::null(), || {
        init();
        abi::ABI_VERSION.as_ptr()
    })
}

/// # Safety
/// The arguments are those Envoy passed to `envoy_dynamic_module_on_http_filter_config_new`.
pub unsafe fn config_new<C: HttpFilterConfig>(
    config_envoy: abi::filter_config_envoy_ptr,
    name: abi::envoy_buffer,
    config: abi::envoy_buffer,
) -> abi::filter_config_module_ptr {
    guard("config_new", std::ptr::null(), || {
        // SAFETY: Envoy passes both buffers, and the config pointer, valid for this call.
        let (name, config, envoy) = unsafe {
            (
                envoy_bytes(name),
                envoy_bytes(config),
                EnvoyConfig::from_hook(config_envoy),
            )
        };
        let name = String::from_utf8_lossy(name);
        match C::new(&envoy, &name, config) {
            Ok(c) => Box::into_raw(Box::new(c)) as abi::filter_config_module_ptr,
            Err(e) => {
                // Envoy only says the config failed; this line says why.
                tracing::error!(filter = %name, error = %e, "filter config rejected");
                eprintln!("{name}: filter config rejected: {e:#}");
                std::ptr::null()
            }
        }
    })
}

/// # Safety
/// `config` came from [`config_new`] for this `C`; Envoy destroys it once, after every filter
/// made from it.
pub unsafe fn config_destroy<C: HttpFilterConfig>(config: abi::filter_config_module_ptr) {
    guard("config_destroy", (), || {
        // SAFETY: per the contract: made by Box::into_raw in config_new, freed exactly once.
        drop(unsafe { Box::from_raw(config as *mut C) });
    })
}

/// # Safety
/// The arguments are those Envoy passed to `..._on_http_filter_config_scheduled` (main thread).
pub unsafe fn config_scheduled<C: HttpFilterConfig>(
    config_envoy: abi::filter_config_envoy_ptr,
    config: abi::filter_config_module_ptr,
    event_id: u64,
) {
    guard("config_scheduled", (), || {
        // SAFETY: Envoy holds a reference to its config object while it runs this event, so
        // config_destroy cannot run during it; `config_envoy` is valid for this call.
        let (c, envoy) = unsafe { (&*(config as *const C), EnvoyConfig::from_hook(config_envoy)) };
        c.on_scheduled(&envoy, event_id);
    })
}

/// # Safety
/// `config` came from [`config_new`] for this `C` and is live.
pub unsafe fn filter_new<C: HttpFilterConfig>(
    config: abi::filter_config_module_ptr,
) -> abi::filter_module_ptr {
    guard("filter_new", std::ptr::null(), || {
        // SAFETY: Envoy keeps the config alive for as long as any filter made from it exists,
        // and `HttpFilterConfig`'s contract keeps the reference inside the filter, so extending
        // the borrow to the filter's life is sound.
        let c: &'static C = unsafe { &*(config as *const C) };
        let slot = Slot {
            filter: c.new_filter(),
            depth: Cell::new(0),
        };
        Box::into_raw(Box::new(slot)) as abi::filter_module_ptr
    })
}

/// The one exclusive access to a filter: taking it back to free it. Refused (a counted panic;
/// the filter is leaked, never freed) while any hook of it is on the stack, since that hook's
/// shared reference would dangle.
///
/// # Safety
/// As for [`enter`], and `ptr` is not used again after this returns.
unsafe fn take<F>(ptr: abi::filter_module_ptr) -> Option<Box<Slot<F>>> {
    // SAFETY: a non-null slot is live (contract); this shared look only reads its depth.
    let depth = unsafe { (ptr as *const Slot<F>).as_ref() }?.depth.get();
    assert_eq!(
        depth, 0,
        "filter taken exclusively while one of its hooks is running"
    );
    // SAFETY: made by Box::into_raw in filter_new, taken exactly once, and no hook holds it.
    Some(unsafe { Box::from_raw(ptr as *mut Slot<F>) })
}

/// # Safety
/// `filter` is null or came from [`filter_new`] for this `C`; Envoy destroys it once, on its
/// worker.
pub unsafe fn filter_destroy<C: HttpFilterConfig>(filter: abi::filter_module_ptr) {
    guard("filter_destroy", (), || {
        // SAFETY: per the contract.
        drop(unsafe { take::<C::Filter>(filter) });
    })
}

/// # Safety
/// The arguments are those Envoy passed to `..._on_http_filter_request_headers`.
pub unsafe fn request_headers<C: HttpFilterConfig>(
    envoy: abi::filter_envoy_ptr,
    filter: abi::filter_module_ptr,
    end_of_stream: bool,
) -> abi::headers_status {
    // SAFETY: `envoy` is the live stream of this hook, used only during it.
    let mut stream = unsafe { EnvoyStream::from_hook(envoy) };
    let status = guard("request_headers", None, || {
        // SAFETY: `filter` is this stream's filter (or null), on its worker thread.
        let f = unsafe { enter::<C::Filter>("request_headers", filter) }?;
        Some(f.filter().on_request_headers(&mut stream, end_of_stream))
    });
    match status {
        Some(HeadersStatus::Continue) => abi::HEADERS_CONTINUE,
        Some(HeadersStatus::Stop) => abi::HEADERS_STOP_ALL_ITERATION_AND_WATERMARK,
        Some(HeadersStatus::Replied) => abi::HEADERS_STOP_ITERATION,
        None => {
            // Fail closed: nothing is routed after a panic, or without a filter.
            answer_panic::<C::Filter>(&mut stream);
            abi::HEADERS_STOP_ITERATION
        }
    }
}

/// # Safety
/// The arguments are those Envoy passed to `..._on_http_filter_request_body`.
pub unsafe fn request_body<C: HttpFilterConfig>(
    envoy: abi::filter_envoy_ptr,
    filter: abi::filter_module_ptr,
    end_of_stream: bool,
) -> abi::body_status {
    guard("request_body", abi::BODY_CONTINUE, || {
        // SAFETY: `envoy` is the live stream of this hook; `filter` its filter (or null).
        let (mut stream, f) = unsafe {
            (
                EnvoyStream::from_hook(envoy),
                enter::<C::Filter>("request_body", filter),
            )
        };
        if let Some(f) = f {
            f.filter().on_request_body(&mut stream, end_of_stream);
        }
        abi::BODY_CONTINUE
    })
}

/// # Safety
/// The arguments are those Envoy passed to `..._on_http_filter_response_body`.
pub unsafe fn response_body<C: HttpFilterConfig>(
    envoy: abi::filter_envoy_ptr,
    filter: abi::filter_module_ptr,
    end_of_stream: bool,
) -> abi::body_status {
    guard("response_body", abi::BODY_CONTINUE, || {
        // SAFETY: `envoy` is the live stream of this hook; `filter` its filter (or null).
        let (mut stream, f) = unsafe {
            (
                EnvoyStream::from_hook(envoy),
                enter::<C::Filter>("response_body", filter),
            )
        };
        if let Some(f) = f {
            f.filter().on_response_body(&mut stream, end_of_stream);
        }
        abi::BODY_CONTINUE
    })
}

/// # Safety
/// The arguments are those Envoy passed to `..._on_http_filter_scheduled`.
pub unsafe fn scheduled<C: HttpFilterConfig>(
    envoy: abi::filter_envoy_ptr,
    filter: abi::filter_module_ptr,
    event_id: u64,
) {
    // SAFETY: `envoy` is the live stream of this hook (Envoy only runs it while the filter lives).
    let mut stream = unsafe { EnvoyStream::from_hook(envoy) };
    let ok = guard("scheduled", false, || {
        // SAFETY: `filter` is this stream's filter (or null), on its worker thread.
        if let Some(f) = unsafe { enter::<C::Filter>("scheduled", filter) } {
            f.filter().on_scheduled(&mut stream, event_id);
        }
        true
    });
    if !ok {
        answer_panic::<C::Filter>(&mut stream);
    }
}

/// A hook the filter does not act on, entered only so re-entries are seen.
///
/// # Safety
/// `filter` is null or a live filter from [`filter_new`] for this `C`, on its worker thread.
pub unsafe fn pass<C: HttpFilterConfig>(hook: &'static str, filter: abi::filter_module_ptr) {
    guard(hook, (), || {
        // SAFETY: per the contract.
        drop(unsafe { enter::<C::Filter>(hook, filter) });
    })
}

/// Emits every hook Envoy 1.40 requires, for the config type `$config`; `$init` runs once when
/// the module is loaded. Stream completion only enters the slot, so its re-entries (measured:
/// inside a reply sent from `scheduled`) are counted; the hooks this filter has no use for
/// (response headers, callouts, side streams, trailers, watermarks) are no-ops that touch
/// nothing.
macro_rules! export_http_filter {
    (config = $config:ty, init = $init:path) => {
        /// Envoy's entry points into the module (see `ffi::hooks`).
        #[allow(unsafe_code)]
        mod envoy_hooks {
            use $crate::ffi::abi;
            use $crate::ffi::hooks;

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
                hooks::program_init($init)
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
                config_envoy: abi::filter_config_envoy_ptr,
                name: abi::envoy_buffer,
                config: abi::envoy_buffer,
            ) -> abi::filter_config_module_ptr {
                // SAFETY: Envoy calls this symbol with the arguments its ABI documents for it.
                unsafe { hooks::config_new::<$config>(config_envoy, name, config) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
                config: abi::filter_config_module_ptr,
            ) {
                // SAFETY: as above.
                unsafe { hooks::config_destroy::<$config>(config) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
                config_envoy: abi::filter_config_envoy_ptr,
                config: abi::filter_config_module_ptr,
                event_id: u64,
            ) {
                // SAFETY: as above.
                unsafe { hooks::config_scheduled::<$config>(config_envoy, config, event_id) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
                config: abi::filter_config_module_ptr,
                _filter_envoy: abi::filter_envoy_ptr,
            ) -> abi::filter_module_ptr {
                // SAFETY: as above.
                unsafe { hooks::filter_new::<$config>(config) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
                filter: abi::filter_module_ptr,
            ) {
                // SAFETY: as above.
                unsafe { hooks::filter_destroy::<$config>(filter) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
                envoy: abi::filter_envoy_ptr,
                filter: abi::filter_module_ptr,
                end_of_stream: bool,
            ) -> abi::headers_status {
                // SAFETY: as above.
                unsafe { hooks::request_headers::<$config>(envoy, filter, end_of_stream) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
                envoy: abi::filter_envoy_ptr,
                filter: abi::filter_module_ptr,
                end_of_stream: bool,
            ) -> abi::body_status {
                // SAFETY: as above.
                unsafe { hooks::request_body::<$config>(envoy, filter, end_of_stream) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
                envoy: abi::filter_envoy_ptr,
                filter: abi::filter_module_ptr,
                end_of_stream: bool,
            ) -> abi::body_status {
                // SAFETY: as above.
                unsafe { hooks::response_body::<$config>(envoy, filter, end_of_stream) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
                envoy: abi::filter_envoy_ptr,
                filter: abi::filter_module_ptr,
                event_id: u64,
            ) {
                // SAFETY: as above.
                unsafe { hooks::scheduled::<$config>(envoy, filter, event_id) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
            ) -> abi::trailers_status {
                abi::TRAILERS_CONTINUE
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _end_of_stream: bool,
            ) -> abi::headers_status {
                abi::HEADERS_CONTINUE
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
            ) -> abi::trailers_status {
                abi::TRAILERS_CONTINUE
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
                _envoy: abi::filter_envoy_ptr,
                filter: abi::filter_module_ptr,
            ) {
                // SAFETY: as above.
                unsafe { hooks::pass::<$config>("stream_complete", filter) }
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _callout_id: u64,
                _result: abi::callout_result,
                _headers: *mut abi::envoy_http_header,
                _headers_size: usize,
                _body_chunks: *mut abi::envoy_buffer,
                _body_chunks_size: usize,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _stream_id: u64,
                _headers: *mut abi::envoy_http_header,
                _headers_size: usize,
                _end_stream: bool,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _stream_id: u64,
                _data: *const abi::envoy_buffer,
                _data_count: usize,
                _end_stream: bool,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _stream_id: u64,
                _trailers: *mut abi::envoy_http_header,
                _trailers_size: usize,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _stream_id: u64,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
                _stream_id: u64,
                _reason: abi::stream_reset_reason,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
            ) {
            }

            #[no_mangle]
            pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
                _envoy: abi::filter_envoy_ptr,
                _filter: abi::filter_module_ptr,
            ) {
            }
        }
    };
}
pub(crate) use export_http_filter;

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_ptr(slot: Slot<u32>) -> abi::filter_module_ptr {
        Box::into_raw(Box::new(slot)) as abi::filter_module_ptr
    }

    #[test]
    fn a_null_filter_is_never_entered_or_freed() {
        // SAFETY: null is allowed by both contracts.
        unsafe {
            assert!(enter::<u32>("test", std::ptr::null()).is_none());
            assert!(take::<u32>(std::ptr::null()).is_none());
        }
    }

    #[test]
    fn nested_hooks_are_counted_and_freeing_under_one_is_refused() {
        let ptr = slot_ptr(Slot {
            filter: 7,
            depth: Cell::new(0),
        });
        let before = reentries();
        // SAFETY: `ptr` is a live slot on this thread until `take` below frees it.
        unsafe {
            let outer = enter::<u32>("outer", ptr).unwrap();
            let inner = enter::<u32>("inner", ptr).unwrap();
            assert_eq!((*outer.filter(), *inner.filter()), (7, 7));
            assert!(reentries() > before);
            // Freeing while hooks hold the filter: a counted panic, and the slot stays.
            let panics_before = panics();
            guard("test_destroy", (), || drop(take::<u32>(ptr)));
            assert_eq!(panics(), panics_before + 1);
            drop(inner);
            drop(outer);
            assert!(take::<u32>(ptr).is_some());
        }
    }
}
