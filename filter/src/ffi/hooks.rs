//! The symbols Envoy looks up in `libsandbox_gateway.so`: every mandatory
//! `envoy_dynamic_module_on_*` hook of the 1.40 ABI.
//!
//! Each hook turns raw pointers into the safe handles of `handle.rs`, calls the filter logic, and
//! catches panics: unwinding into Envoy's C++ frames is undefined behaviour, so a panic becomes a
//! 500 for that request (or a rejected config) and a counter increment.

use super::abi;
use super::handle::{FilterConfigHandle, Stream};
use crate::gateway::Gateway;
use crate::http_filter::{HeadersStatus, SandboxFilter};
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn guard<T>(hook: &'static str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            crate::gateway::note_panic(hook);
            on_panic
        }
    }
}

/// # Safety
/// `b` must be an Envoy buffer valid for the running hook.
unsafe fn envoy_bytes<'a>(b: abi::envoy_buffer) -> &'a [u8] {
    if b.ptr.is_null() || b.length == 0 {
        &[]
    } else {
        // SAFETY: per the caller's contract, ptr/length describe live memory for this hook.
        unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.length) }
    }
}

/// # Safety
/// `ptr` must be a pointer returned by `on_http_filter_new` and not yet destroyed; Envoy runs a
/// stream's hooks one at a time on its worker thread, so the `&mut` is unique.
unsafe fn filter<'a>(ptr: abi::filter_module_ptr) -> &'a mut SandboxFilter {
    // SAFETY: see the function contract.
    unsafe { &mut *(ptr as *mut SandboxFilter) }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard("program_init", std::ptr::null(), || {
        crate::logging::init();
        abi::ABI_VERSION.as_ptr()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: abi::filter_config_envoy_ptr,
    name: abi::envoy_buffer,
    config: abi::envoy_buffer,
) -> abi::filter_config_module_ptr {
    guard("config_new", std::ptr::null(), || {
        // SAFETY: Envoy passes both buffers valid for the duration of this call.
        let (name, config) = unsafe { (envoy_bytes(name), envoy_bytes(config)) };
        match Gateway::new(FilterConfigHandle::new(config_envoy), config) {
            Ok(g) => Box::into_raw(Box::new(g)) as abi::filter_config_module_ptr,
            Err(e) => {
                // Envoy only says the config failed; this line says why.
                tracing::error!(filter = %String::from_utf8_lossy(name), error = %e,
                    "sandbox_gateway config rejected");
                eprintln!("sandbox_gateway config rejected: {e:#}");
                std::ptr::null()
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config: abi::filter_config_module_ptr,
) {
    guard("config_destroy", (), || {
        // SAFETY: `config` came from Box::into_raw in config_new; Envoy destroys it once, after
        // every filter that used it.
        drop(unsafe { Box::from_raw(config as *mut Gateway) });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: abi::filter_config_envoy_ptr,
    config: abi::filter_config_module_ptr,
    event_id: u64,
) {
    guard("config_scheduled", (), || {
        // SAFETY: `config` is live until config_destroy, which runs on this same (main) thread.
        let gw = unsafe { &*(config as *const Gateway) };
        gw.on_config_scheduled(event_id);
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: abi::filter_config_module_ptr,
    _filter_envoy: abi::filter_envoy_ptr,
) -> abi::filter_module_ptr {
    guard("filter_new", std::ptr::null(), || {
        // SAFETY: Envoy keeps the config alive for as long as any filter created from it exists,
        // so extending the borrow to the filter's life is sound.
        let gw: &'static Gateway = unsafe { &*(config as *const Gateway) };
        Box::into_raw(Box::new(SandboxFilter::new(gw))) as abi::filter_module_ptr
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_ptr: abi::filter_module_ptr) {
    guard("filter_destroy", (), || {
        // SAFETY: `filter_ptr` came from Box::into_raw in filter_new; Envoy destroys it once.
        drop(unsafe { Box::from_raw(filter_ptr as *mut SandboxFilter) });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: abi::filter_envoy_ptr,
    filter_ptr: abi::filter_module_ptr,
    _end_of_stream: bool,
) -> abi::headers_status {
    // SAFETY: `envoy` is the live stream of this hook.
    let mut stream = unsafe { Stream::from_hook(envoy) };
    let status = guard("request_headers", None, || {
        // SAFETY: `filter_ptr` is this stream's filter (see `filter`).
        Some(unsafe { filter(filter_ptr) }.on_request_headers(&mut stream))
    });
    match status {
        Some(HeadersStatus::Continue) => abi::HEADERS_CONTINUE,
        Some(HeadersStatus::Stop) => abi::HEADERS_STOP_ALL_ITERATION_AND_WATERMARK,
        Some(HeadersStatus::Replied) => abi::HEADERS_STOP_ITERATION,
        None => {
            // Fail closed: nothing is routed after a panic.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                crate::reply::internal_error(&mut stream)
            }));
            abi::HEADERS_STOP_ITERATION
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: abi::filter_envoy_ptr,
    filter_ptr: abi::filter_module_ptr,
    _end_of_stream: bool,
) -> abi::body_status {
    guard("request_body", abi::BODY_CONTINUE, || {
        // SAFETY: `filter_ptr` is this stream's filter.
        unsafe { filter(filter_ptr) }.on_data();
        abi::BODY_CONTINUE
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
) -> abi::trailers_status {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
    _end_of_stream: bool,
) -> abi::headers_status {
    // The request start already marked the sandbox active; response data is tracked below.
    abi::HEADERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: abi::filter_envoy_ptr,
    filter_ptr: abi::filter_module_ptr,
    _end_of_stream: bool,
) -> abi::body_status {
    guard("response_body", abi::BODY_CONTINUE, || {
        // SAFETY: `filter_ptr` is this stream's filter.
        unsafe { filter(filter_ptr) }.on_data();
        abi::BODY_CONTINUE
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
) -> abi::trailers_status {
    abi::TRAILERS_CONTINUE
}

/// Deliberately touches nothing: Envoy may call it while another hook of the same filter is on
/// the stack (e.g. inside send_response), so taking `&mut` to the filter here would alias.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: abi::filter_envoy_ptr,
    filter_ptr: abi::filter_module_ptr,
    event_id: u64,
) {
    // SAFETY: `envoy` is the live stream of this hook (Envoy only runs it while the filter lives).
    let mut stream = unsafe { Stream::from_hook(envoy) };
    let ok = guard("scheduled", false, || {
        // SAFETY: `filter_ptr` is this stream's filter.
        unsafe { filter(filter_ptr) }.on_scheduled(&mut stream, event_id);
        true
    });
    if !ok {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            crate::reply::internal_error(&mut stream)
        }));
    }
}

// Hooks the ABI requires but this filter has no use for: it makes no callouts or side streams
// and is not a terminal filter.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
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
    _filter_ptr: abi::filter_module_ptr,
    _stream_id: u64,
    _headers: *mut abi::envoy_http_header,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
    _stream_id: u64,
    _data: *const abi::envoy_buffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
    _stream_id: u64,
    _trailers: *mut abi::envoy_http_header,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
    _stream_id: u64,
    _reason: abi::stream_reset_reason,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: abi::filter_envoy_ptr,
    _filter_ptr: abi::filter_module_ptr,
) {
}
