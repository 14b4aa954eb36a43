//! Pushes this Envoy's activity to sandbox-extproc's ActivityService (`"activity_report"`).
//!
//! Runs on the module's own tokio runtime, never on an Envoy worker: the data path only touches
//! atomics in the route table's activity cells, and this task reads them once per interval.
//! One client-streaming `Report` call per connection: the first batch is a full snapshot, later
//! ones carry the sandboxes active since the previous batch. When sandbox-extproc is down nothing
//! queues up: the cells themselves are the (bounded: one per route) buffer, and the full snapshot
//! after the reconnect delivers everything that happened meanwhile.

use proto::v1::activity_service_client::ActivityServiceClient;
use proto::v1::{ReportRequest, SandboxActivity};
use routing::activity::{now_ms, REPORT_OVERLAP_MS};
use routing::config::ActivityReportConfig;
use routing::RouteTable;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Reporter name sent with every batch: host name and pid identify one Envoy process.
pub fn reporter_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "envoy".into());
    format!("{host}-{}", std::process::id())
}

/// Reports until the runtime shuts down. Never returns early: a bad or absent server is retried
/// every interval (failures are logged once per outage, not once per attempt).
pub async fn run(cfg: ActivityReportConfig, table: Arc<RouteTable>) {
    let endpoint = match Endpoint::from_shared(cfg.endpoint.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // Notice a peer that vanished without closing (node loss) within seconds.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5)),
        Err(e) => {
            tracing::error!(endpoint = cfg.endpoint, error = %e, "activity_report: bad endpoint");
            return;
        }
    };
    let reporter = reporter_id();
    let mut healthy = true;
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                tracing::info!(
                    endpoint = cfg.endpoint,
                    reporter,
                    "activity reporting connected"
                );
                healthy = true;
                let why = session(ch, &cfg, &table, &reporter).await;
                tracing::warn!(
                    endpoint = cfg.endpoint,
                    reason = why,
                    "activity report stream ended; reconnecting"
                );
            }
            Err(e) if healthy => {
                healthy = false;
                tracing::warn!(endpoint = cfg.endpoint, error = %e, "activity reporting: cannot connect; retrying every interval");
            }
            Err(e) => tracing::debug!(error = %e, "activity reporting: still cannot connect"),
        }
        tokio::time::sleep(cfg.interval).await;
    }
}

/// One Report stream. Returns why it ended.
async fn session(
    ch: Channel,
    cfg: &ActivityReportConfig,
    table: &RouteTable,
    reporter: &str,
) -> String {
    // Two batches in flight at most; a slower server makes us skip ticks, never queue.
    let (tx, rx) = mpsc::channel::<ReportRequest>(2);
    let mut client = ActivityServiceClient::new(ch);
    let call = client.report(ReceiverStream::new(rx));
    tokio::pin!(call);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since: Option<u64> = None;
    loop {
        tokio::select! {
            r = &mut call => {
                return match r {
                    Ok(_) => "server closed the stream".into(),
                    Err(s) => format!("{}: {}", s.code(), s.message()),
                };
            }
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let full = since.is_none();
        let snap = table.activity().snapshot(since.unwrap_or(0));
        if !full && snap.is_empty() {
            since = Some(now.saturating_sub(REPORT_OVERLAP_MS));
            continue;
        }
        let batch = ReportRequest {
            reporter: reporter.to_string(),
            full_snapshot: full,
            entries: snap
                .iter()
                .map(|(id, t)| SandboxActivity {
                    sandbox_id: id.to_string(),
                    last_active_ms: *t,
                })
                .collect(),
        };
        match tx.try_send(batch) {
            // Only a batch handed to the stream advances the window.
            Ok(()) => since = Some(now.saturating_sub(REPORT_OVERLAP_MS)),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("activity report: server is slow; batch deferred");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return "stream closed".into(),
        }
    }
}
