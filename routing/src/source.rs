//! Route sources behind one entry point, so the Envoy module and sandbox-extproc start them the
//! same way: `start` validates what can be validated up front (fail closed at config load) and
//! runs the rest on the caller's tokio runtime.

use crate::config::RouteSourceConfig;
use crate::file_source::{FileSource, RouteFileError};
use crate::stats::SourceStats;
use crate::table::RouteTable;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    File(#[from] RouteFileError),
    #[error(transparent)]
    Kube(#[from] crate::kube_source::KubeSourceError),
}

/// Starts the configured source feeding `table`. A file source loads synchronously (a missing or
/// invalid file is an error); a Kubernetes source checks its config and watches in the
/// background (with `watch_paused`, the paused-sandbox markers too). The table is marked synced
/// once the first full view is applied.
pub fn start(
    cfg: &RouteSourceConfig,
    table: Arc<RouteTable>,
    stats: Arc<SourceStats>,
    rt: &tokio::runtime::Handle,
    watch_paused: bool,
) -> Result<(), SourceError> {
    match cfg {
        RouteSourceConfig::File {
            path,
            poll_interval,
        } => {
            let source = FileSource::open(path.clone(), Arc::clone(&table), stats)?;
            table.mark_synced();
            rt.spawn(source.run(*poll_interval, std::future::pending()));
        }
        RouteSourceConfig::Kubernetes(kcfg) => {
            // Only the config is checked now; an unreachable API server must not stop Envoy
            // from starting (requests get 503 routes_not_synced until the first list lands).
            let access = crate::kube_source::access(kcfg)?;
            rt.spawn(crate::kube_source::run_with(
                kcfg.clone(),
                access,
                table,
                stats,
                watch_paused,
            ));
        }
    }
    Ok(())
}
