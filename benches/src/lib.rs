//! sandbox-gateway-bench's library, shared by the `sandbox-bench` binary and the bench targets:
//! the one module with unsafe code ([`sys`]: CPU pinning, clock ticks, `SO_LINGER`, the counting
//! allocator `kube_routes` uses) and what they read from /proc ([`procfs`]: CPU time, RSS). Everything
//! else in the crate denies unsafe code.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod sys;

pub mod procfs;

/// The `p` quantile (0..=1) of `v`, nearest rank (sorts `v`); NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}
