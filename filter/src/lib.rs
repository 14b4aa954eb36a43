//! `libsandbox_gateway.so`: an Envoy 1.40 dynamic module that routes requests to sandbox pods.
//!
//! `ffi` is the binding to Envoy's C ABI (all unsafe code lives there); `gateway` is one loaded
//! filter config; `http_filter` is the per-request logic on top of the `routing` crate.

mod ffi;
mod gateway;
mod http_filter;
mod logging;
mod reply;
mod report;
