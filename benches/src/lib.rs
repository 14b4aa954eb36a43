//! sandbox-gateway-bench's library: the one module with unsafe code ([`sys`]: CPU pinning, clock
//! ticks, `SO_LINGER`, the counting allocator), shared by the `sandbox-bench` binary and the
//! `kube_routes` bench. Everything else in the crate denies unsafe code.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod sys;
