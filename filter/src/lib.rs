//! `libsandbox_gateway.so`: an Envoy 1.40 dynamic module that routes requests to sandbox pods.
//!
//! `ffi` is the binding to Envoy's C ABI and knows nothing of routing (all unsafe code lives
//! there); `gateway` is one loaded filter config; `http_filter` is the per-request logic on top
//! of the `routing` crate, written against `ffi`'s traits so it is unit-tested without Envoy.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[allow(unsafe_code)]
mod ffi;
mod gateway;
mod http_filter;
mod logging;
mod reply;
mod report;

ffi::hooks::export_http_filter!(
    config = crate::gateway::Gateway,
    init = crate::logging::init
);
