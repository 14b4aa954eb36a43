//! `sandboxgateway.v1.ActivityService`: Envoy modules stream their activity in, the control plane
//! asks for last-active. All times are Unix milliseconds.

use crate::aggregate::Aggregator;
use crate::metrics::Metrics;
use proto::v1::activity_service_server::ActivityService;
use proto::v1::{
    GetLastActiveRequest, GetLastActiveResponse, ReportRequest, ReportResponse, SandboxActivity,
};
use routing::activity::now_ms;
use routing::bearer::BearerToken;
use routing::RouteTable;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// Shared by the ActivityService and the ext_proc server of one replica.
pub struct Activity {
    pub agg: Aggregator,
    /// This replica's own route table; ext_proc traffic marks its cells.
    pub table: Arc<RouteTable>,
    pub metrics: Arc<Metrics>,
    pub replica: String,
    pub started_ms: u64,
    last_flush_ms: AtomicU64,
}

impl Activity {
    pub fn new(
        agg: Aggregator,
        table: Arc<RouteTable>,
        metrics: Arc<Metrics>,
        replica: String,
    ) -> Self {
        Activity {
            agg,
            table,
            metrics,
            replica,
            started_ms: now_ms(),
            last_flush_ms: AtomicU64::new(0),
        }
    }

    /// Merges activity that ext_proc traffic recorded in the route table into the aggregate.
    pub fn flush_local(&self) {
        let now = now_ms();
        let since = self
            .last_flush_ms
            .swap(now, Ordering::Relaxed)
            .saturating_sub(routing::activity::REPORT_OVERLAP_MS);
        let snap = self.table.activity().snapshot(since, now);
        self.agg.merge(snap.iter().map(|(id, t)| (&**id, *t)));
    }

    /// Periodic upkeep: local flush, forgetting removed sandboxes, gauges.
    pub fn tick(&self) {
        self.flush_local();
        let table = &self.table;
        let forgotten = self.agg.sweep(now_ms(), |id| table.get(id).is_some());
        if forgotten > 0 {
            tracing::info!(forgotten, "forgot sandboxes whose routes are gone");
        }
        let m = &self.metrics;
        m.sandboxes.set(self.agg.len() as i64);
        m.evicted.set(self.agg.evicted() as i64);
        m.forgotten.set(self.agg.forgotten() as i64);
        m.routes.set(table.len() as i64);
    }

    pub fn last_active(&self, ids: &[String]) -> GetLastActiveResponse {
        self.flush_local();
        let mut resp = GetLastActiveResponse {
            replica: self.replica.clone(),
            collecting_since_ms: self.started_ms,
            evicted_total: self.agg.evicted(),
            last_eviction_ms: self.agg.last_eviction_ms(),
            ..Default::default()
        };
        if ids.is_empty() {
            resp.entries = self
                .agg
                .all()
                .into_iter()
                .map(|(sandbox_id, last_active_ms)| SandboxActivity {
                    sandbox_id,
                    last_active_ms,
                })
                .collect();
            return resp;
        }
        let mut seen = HashSet::new();
        for id in ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            match self.agg.get(id) {
                Some(t) => resp.entries.push(SandboxActivity {
                    sandbox_id: id.clone(),
                    last_active_ms: t,
                }),
                None => resp.unknown_ids.push(id.clone()),
            }
        }
        resp
    }
}

pub struct ActivitySvc {
    pub activity: Arc<Activity>,
    /// Flips to true on shutdown: open Report streams end so reporters move to another replica.
    pub shutdown: watch::Receiver<bool>,
    /// Required on every call when set (`--activity-token-file`; see auth.rs).
    pub token: Option<BearerToken>,
}

/// Largest ID list one GetLastActive may ask for.
const MAX_QUERY_IDS: usize = 100_000;

#[tonic::async_trait]
impl ActivityService for ActivitySvc {
    async fn report(
        &self,
        request: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<ReportResponse>, Status> {
        // Before the first message is read: a refused stream records nothing.
        crate::auth::authorize(
            self.token.as_ref(),
            &self.activity.metrics,
            "Report",
            &request,
        )?;
        let peer = request.remote_addr();
        let mut stream = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        let a = &self.activity;
        a.metrics.report_streams.inc();
        let mut out = ReportResponse::default();
        let mut reporter = String::new();
        let result = loop {
            let msg = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(batch)) => {
                    if reporter.is_empty() {
                        reporter = batch.reporter.clone();
                        tracing::info!(reporter, ?peer, "activity reporter connected");
                    }
                    let n = a.agg.merge(
                        batch
                            .entries
                            .iter()
                            .map(|e| (e.sandbox_id.as_str(), e.last_active_ms)),
                    );
                    tracing::debug!(
                        reporter = batch.reporter,
                        full = batch.full_snapshot,
                        entries = n,
                        "activity batch"
                    );
                    out.batches += 1;
                    out.entries += n as u64;
                    a.metrics.report_batches.inc();
                    a.metrics.report_entries.inc_by(n as u64);
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        a.metrics.report_streams.dec();
        tracing::info!(
            reporter,
            batches = out.batches,
            "activity reporter stream ended"
        );
        result.map(|()| Response::new(out))
    }

    async fn get_last_active(
        &self,
        request: Request<GetLastActiveRequest>,
    ) -> Result<Response<GetLastActiveResponse>, Status> {
        crate::auth::authorize(
            self.token.as_ref(),
            &self.activity.metrics,
            "GetLastActive",
            &request,
        )?;
        let ids = request.into_inner().sandbox_ids;
        if ids.len() > MAX_QUERY_IDS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_QUERY_IDS} sandbox_ids per call"
            )));
        }
        self.activity.metrics.last_active_queries.inc();
        Ok(Response::new(self.activity.last_active(&ids)))
    }
}
