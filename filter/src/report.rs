//! Pushes this Envoy's activity to sandbox-extproc's ActivityService (`"activity_report"`).
//!
//! Runs on the module's own tokio runtime, never on an Envoy worker: the data path only touches
//! atomics in the route table's activity cells, and this task reads them once per interval.
//! One client-streaming `Report` call per connection: the first batch is a full snapshot, later
//! ones carry the sandboxes active since the previous batch. When sandbox-extproc is down nothing
//! queues up: the cells themselves are the (bounded: one per route) buffer, and the full snapshot
//! after the reconnect delivers everything that happened meanwhile.
//!
//! With `activity_report.token_file`, every stream carries `authorization: Bearer <token>`; a
//! refusal (UNAUTHENTICATED) is counted in `activity_report_unauthenticated` and logged as an
//! error, since that reporter's activity reaches nobody until the token is fixed.

use proto::v1::activity_service_client::ActivityServiceClient;
use proto::v1::{ReportRequest, SandboxActivity};
use routing::activity::{now_ms, REPORT_OVERLAP_MS};
use routing::bearer::AUTHORIZATION;
use routing::config::ActivityReportConfig;
use routing::RouteTable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Counters the reporter fills and the gateway publishes (as `activity_report_*`).
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Batches handed to a Report stream (client streaming has no per-batch answer: the first
    /// batch of a stream the server then refuses is counted too).
    pub batches: AtomicU64,
    /// Connect failures and streams that ended with an error status (including refusals).
    pub failures: AtomicU64,
    /// Streams the server refused with UNAUTHENTICATED (missing or wrong token).
    pub unauthenticated: AtomicU64,
}

/// How a Report stream ended.
enum Ended {
    /// Closed without an error status (server shutdown, our channel gone).
    Closed(&'static str),
    Status(tonic::Status),
}

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
pub async fn run(cfg: ActivityReportConfig, table: Arc<RouteTable>, stats: Arc<ReportStats>) {
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
    // Built once: the token file was validated as visible ASCII at config load, so this only
    // fails if that validation and tonic's ever disagree; then report nothing, loudly.
    let auth = match cfg
        .token
        .as_ref()
        .map(|t| t.authorization().parse::<AsciiMetadataValue>())
        .transpose()
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "activity_report: the token cannot be sent as gRPC metadata");
            return;
        }
    };
    let reporter = reporter_id();
    let mut healthy = true;
    // Logged at error once per run of refusals, not once per attempt.
    let mut refused = false;
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                if healthy && !refused {
                    tracing::info!(
                        endpoint = cfg.endpoint,
                        reporter,
                        "activity reporting connected"
                    );
                }
                healthy = true;
                match session(ch, &cfg, &table, &reporter, auth.as_ref(), &stats).await {
                    Ended::Status(s) if s.code() == tonic::Code::Unauthenticated => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
                        if !refused {
                            tracing::error!(
                                endpoint = cfg.endpoint,
                                token_sent = auth.is_some(),
                                message = s.message(),
                                "activity report refused: UNAUTHENTICATED (check activity_report.token_file); retrying every interval"
                            );
                        }
                        refused = true;
                    }
                    Ended::Status(s) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        refused = false;
                        tracing::warn!(
                            endpoint = cfg.endpoint,
                            code = %s.code(),
                            message = s.message(),
                            "activity report stream failed; reconnecting"
                        );
                    }
                    Ended::Closed(why) => {
                        refused = false;
                        tracing::warn!(
                            endpoint = cfg.endpoint,
                            reason = why,
                            "activity report stream ended; reconnecting"
                        );
                    }
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                if healthy {
                    healthy = false;
                    tracing::warn!(endpoint = cfg.endpoint, error = %e, "activity reporting: cannot connect; retrying every interval");
                } else {
                    tracing::debug!(error = %e, "activity reporting: still cannot connect");
                }
            }
        }
        tokio::time::sleep(cfg.interval).await;
    }
}

/// One Report stream. Returns how it ended.
async fn session(
    ch: Channel,
    cfg: &ActivityReportConfig,
    table: &RouteTable,
    reporter: &str,
    auth: Option<&AsciiMetadataValue>,
    stats: &ReportStats,
) -> Ended {
    // Two batches in flight at most; a slower server makes us skip ticks, never queue.
    let (tx, rx) = mpsc::channel::<ReportRequest>(2);
    let mut client = ActivityServiceClient::new(ch);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(v) = auth {
        req.metadata_mut().insert(AUTHORIZATION, v.clone());
    }
    let call = client.report(req);
    tokio::pin!(call);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since: Option<u64> = None;
    loop {
        tokio::select! {
            r = &mut call => {
                return match r {
                    Ok(_) => Ended::Closed("server closed the stream"),
                    Err(s) => Ended::Status(s),
                };
            }
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let full = since.is_none();
        let snap = table.activity().snapshot(since.unwrap_or(0), now);
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
            Ok(()) => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                since = Some(now.saturating_sub(REPORT_OVERLAP_MS));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!("activity report: server is slow; batch deferred");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ended::Closed("stream closed"),
        }
    }
}
