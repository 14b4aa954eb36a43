//! Counters the route sources fill from their background tasks and the hosts (the Envoy module,
//! sandbox-extproc) publish as metrics. Its own module so both sources and both hosts import it
//! without importing each other.

use std::sync::atomic::AtomicU64;

/// Counters a host (Envoy module, extproc) publishes as metrics. The file source fills the
/// reload counters, the Kubernetes source the watch ones.
#[derive(Debug, Default)]
pub struct SourceStats {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub routes: AtomicU64,
    pub watch_errors: AtomicU64,
    pub relists: AtomicU64,
    pub conflicts: AtomicU64,
    pub ip_fenced: AtomicU64,
    pub stale_ignored: AtomicU64,
}
