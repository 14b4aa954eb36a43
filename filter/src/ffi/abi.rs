//! Raw declarations of the Envoy 1.40 dynamic-module C ABI (ABI version string `v0.2.0`).
//!
//! Written from the ABI's documented C prototypes; only the parts this module uses. Every
//! callback declared here must be exported by the Envoy binary: `tests/tests/abi_symbols.rs`
//! checks both binaries' dynamic symbol tables. Nothing outside `ffi/` (and the hooks
//! `export_http_filter!` emits) uses these directly.

#![allow(non_camel_case_types, dead_code)]

use std::ffi::{c_char, c_void};

pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// Bytes owned by Envoy, valid for the current hook (or until a setter is called).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct envoy_buffer {
    pub ptr: *const c_char,
    pub length: usize,
}

/// Bytes owned by the module; Envoy copies them during the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct module_buffer {
    pub ptr: *const c_char,
    pub length: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct module_http_header {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

pub type filter_config_envoy_ptr = *mut c_void;
pub type filter_config_module_ptr = *const c_void;
pub type filter_envoy_ptr = *mut c_void;
pub type filter_module_ptr = *const c_void;
pub type filter_scheduler_ptr = *mut c_void;
pub type filter_config_scheduler_ptr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
pub type header_type = u32;
pub const HEADER_TYPE_REQUEST: header_type = 0;
pub const HEADER_TYPE_RESPONSE: header_type = 2;

/// `envoy_dynamic_module_type_attribute_id` (a C enum: the position in its list).
pub type attribute_id = u32;
/// `source.address`: the downstream remote address, `ip:port` (after Envoy's XFF handling).
pub const ATTRIBUTE_SOURCE_ADDRESS: attribute_id = 24;

/// `envoy_dynamic_module_type_metrics_result`.
pub type metrics_result = u32;
pub const METRICS_SUCCESS: metrics_result = 0;

/// `..._on_http_filter_{request,response}_headers_status` (mirrors Http::FilterHeadersStatus).
pub type headers_status = u32;
pub const HEADERS_CONTINUE: headers_status = 0;
pub const HEADERS_STOP_ITERATION: headers_status = 1;
pub const HEADERS_STOP_ALL_ITERATION_AND_WATERMARK: headers_status = 4;

/// `..._on_http_filter_{request,response}_body_status` (mirrors Http::FilterDataStatus).
pub type body_status = u32;
pub const BODY_CONTINUE: body_status = 0;

/// `..._on_http_filter_{request,response}_trailers_status`.
pub type trailers_status = u32;
pub const TRAILERS_CONTINUE: trailers_status = 0;

/// `envoy_dynamic_module_type_http_callout_result` / `http_stream_reset_reason`: passed to hooks
/// this module does not act on.
pub type callout_result = u32;
pub type stream_reset_reason = u32;

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct envoy_http_header {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

extern "C" {
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: filter_envoy_ptr,
        header_type: header_type,
        key: module_buffer,
        result: *mut envoy_buffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: filter_envoy_ptr,
        header_type: header_type,
    ) -> usize;

    /// Fills `result` (sized by get_headers_size) with every header, pseudo-headers included.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter: filter_envoy_ptr,
        header_type: header_type,
        result: *mut envoy_http_header,
    ) -> bool;

    /// A `{NULL, 0}` value removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: filter_envoy_ptr,
        header_type: header_type,
        key: module_buffer,
        value: module_buffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: filter_envoy_ptr,
        status_code: u32,
        headers: *mut module_http_header,
        headers_size: usize,
        body: module_buffer,
        details: module_buffer,
    );

    /// Builds the value with the object factory registered under `key`.
    pub fn envoy_dynamic_module_callback_http_set_filter_state_typed(
        filter: filter_envoy_ptr,
        key: module_buffer,
        value: module_buffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_clear_route_cache(filter: filter_envoy_ptr);

    /// A string attribute of the stream; `result` points into Envoy, valid for the hook.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: filter_envoy_ptr,
        id: attribute_id,
        result: *mut envoy_buffer,
    ) -> bool;

    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: filter_envoy_ptr);

    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: filter_envoy_ptr,
    ) -> filter_scheduler_ptr;
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: filter_scheduler_ptr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
        scheduler: filter_scheduler_ptr,
    );

    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: filter_config_envoy_ptr,
    ) -> filter_config_scheduler_ptr;
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: filter_config_scheduler_ptr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: filter_config_scheduler_ptr,
    );

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: filter_config_envoy_ptr,
        name: module_buffer,
        label_names: *mut module_buffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: filter_config_envoy_ptr,
        name: module_buffer,
        label_names: *mut module_buffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: filter_config_envoy_ptr,
        name: module_buffer,
        label_names: *mut module_buffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> metrics_result;

    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: filter_envoy_ptr,
        id: usize,
        label_values: *mut module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: filter_envoy_ptr,
        id: usize,
        label_values: *mut module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: filter_config_envoy_ptr,
        id: usize,
        label_values: *mut module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> metrics_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: filter_config_envoy_ptr,
        id: usize,
        label_values: *mut module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> metrics_result;
}
