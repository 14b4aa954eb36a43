//! sandbox-gateway-bench's library, shared by the `sandbox-bench` binary and the bench targets:
//! the one module with unsafe code ([`sys`]: CPU pinning, clock ticks, `SO_LINGER`, the counting
//! allocator `kube_routes` uses) and what they read from /proc ([`procfs`]: CPU time, RSS). Everything
//! else in the crate denies unsafe code.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod sys;

pub mod procfs;
