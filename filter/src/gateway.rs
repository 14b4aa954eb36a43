//! One loaded filter config: the parsed config, the route table and its source, the metrics,
//! and the small tokio runtime that runs background work (route file polling, miss holds).
//!
//! Created on Envoy's main thread in `config_new`, shared read-only by every worker's filters,
//! destroyed after the last filter that used it (usually on the main thread, but Envoy may
//! release its config object from a worker; see `Drop`).

use crate::ffi::{Commit, ConfigEnvoy, HttpFilterConfig, MetricId};
use crate::http_filter::SandboxFilter;
use crate::report::ReportStats;
use routing::holds::HoldBook;
use routing::stats::SourceStats;
use routing::wake::{WakeStats, Waker};
use routing::{GatewayConfig, RouteTable};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const EVENT_PUBLISH_STATS: u64 = 1;
const STATS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] routing::ConfigError),
    #[error(transparent)]
    Routes(#[from] routing::source::SourceError),
    #[error(transparent)]
    Metric(#[from] crate::ffi::MetricError),
    #[error("starting the background runtime: {0}")]
    Runtime(std::io::Error),
}

/// Metric handles. Names are as Envoy shows them under the module's stats prefix.
pub struct Metrics {
    pub routed: MetricId,
    pub local_replies: MetricId,
    pub miss_holds: MetricId,
    /// Holds ended early to make room for a miss from a lighter client (routing::holds).
    pub miss_holds_displaced: MetricId,
    pub miss_hold_ms: MetricId,
    /// Requests held for a paused sandbox to wake, and how long each hold lasted.
    pub wake_holds: MetricId,
    /// Wake holds ended early to make room for a lighter client's (`429 too_many_wakes`).
    pub wake_holds_displaced: MetricId,
    pub wake_hold_ms: MetricId,
    routes: MetricId,
    paused_sandboxes: MetricId,
    routes_synced: MetricId,
    /// Counters kept as cumulative atomics by background code, published as deltas.
    cumulative: [(MetricId, ReadStat); CUMULATIVE],
}

const CUMULATIVE: usize = 14;

type ReadStat = fn(&SourceStats, &ReportStats, Option<&WakeStats>) -> u64;

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    fn define<E: ConfigEnvoy>(h: &E) -> Result<Self, GatewayError> {
        Ok(Metrics {
            routed: h.define_counter("requests_routed", &[])?,
            local_replies: h.define_counter("local_replies", &["error"])?,
            miss_holds: h.define_counter("miss_holds", &[])?,
            miss_holds_displaced: h.define_counter("miss_holds_displaced", &[])?,
            miss_hold_ms: h.define_histogram("miss_hold_ms")?,
            wake_holds: h.define_counter("wake_holds", &[])?,
            wake_holds_displaced: h.define_counter("wake_holds_displaced", &[])?,
            wake_hold_ms: h.define_histogram("wake_hold_ms")?,
            routes: h.define_gauge("routes")?,
            paused_sandboxes: h.define_gauge("paused_sandboxes")?,
            routes_synced: h.define_gauge("routes_synced")?,
            cumulative: [
                (h.define_counter("route_reloads_ok", &[])?, |s, _, _| {
                    load(&s.reloads_ok)
                }),
                (h.define_counter("route_reloads_failed", &[])?, |s, _, _| {
                    load(&s.reloads_failed)
                }),
                (h.define_counter("route_watch_errors", &[])?, |s, _, _| {
                    load(&s.watch_errors)
                }),
                (h.define_counter("route_relists", &[])?, |s, _, _| {
                    load(&s.relists)
                }),
                (h.define_counter("route_conflicts", &[])?, |s, _, _| {
                    load(&s.conflicts)
                }),
                (h.define_counter("route_ip_fenced", &[])?, |s, _, _| {
                    load(&s.ip_fenced)
                }),
                (h.define_counter("route_stale_events", &[])?, |s, _, _| {
                    load(&s.stale_ignored)
                }),
                (h.define_counter("panics", &[])?, |_, _, _| {
                    crate::ffi::panics()
                }),
                (h.define_counter("hook_reentries", &[])?, |_, _, _| {
                    crate::ffi::reentries()
                }),
                // activity_report (report.rs): batches sent, failed connects/streams, and
                // streams refused for a missing or wrong token.
                (
                    h.define_counter("activity_report_batches", &[])?,
                    |_, r, _| load(&r.batches),
                ),
                (
                    h.define_counter("activity_report_failures", &[])?,
                    |_, r, _| load(&r.failures),
                ),
                (
                    h.define_counter("activity_report_unauthenticated", &[])?,
                    |_, r, _| load(&r.unauthenticated),
                ),
                // wake (routing::wake): single-flight wakes started, and wake rounds no
                // controller address answered.
                (h.define_counter("wake_flights", &[])?, |_, _, w| {
                    w.map_or(0, |w| load(&w.flights))
                }),
                (h.define_counter("wake_failures", &[])?, |_, _, w| {
                    w.map_or(0, |w| load(&w.failures))
                }),
            ],
        })
    }
}

pub struct Gateway {
    pub cfg: GatewayConfig,
    /// Requests held on a miss: at most `max_held_misses`, shared fairly (routing::holds).
    pub holds: Arc<HoldBook>,
    pub table: Arc<RouteTable>,
    /// Wakes paused sandboxes (`wake` configured), else None.
    pub waker: Option<Arc<Waker>>,
    pub metrics: Metrics,
    source_stats: Arc<SourceStats>,
    report_stats: Arc<ReportStats>,
    /// Values of `Metrics::cumulative` already published.
    published: Mutex<[u64; CUMULATIVE]>,
    runtime: Option<tokio::runtime::Runtime>,
    stats_scheduler: Option<Arc<dyn Commit + Sync>>,
}

impl Gateway {
    pub fn new<E: ConfigEnvoy>(envoy: &E, config: &[u8]) -> Result<Self, GatewayError> {
        let cfg = GatewayConfig::from_json(config)?;
        let metrics = Metrics::define(envoy)?;
        let table = Arc::new(RouteTable::new());
        let source_stats = Arc::new(SourceStats::default());
        let report_stats = Arc::new(ReportStats::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sandbox-gateway")
            .enable_all()
            .build()
            .map_err(GatewayError::Runtime)?;
        // What is already counted: the process-wide counters (panics, re-entries) keep their
        // history across config reloads, and a new config must not publish it again.
        let waker = cfg.wake.clone().map(|w| {
            Waker::new(
                w,
                Arc::clone(&table),
                cfg.miss_hold,
                runtime.handle().clone(),
                crate::report::reporter_id(),
            )
        });
        let published = metrics
            .cumulative
            .map(|(_, read)| read(&source_stats, &report_stats, None));
        routing::source::start(
            &cfg.routes,
            Arc::clone(&table),
            Arc::clone(&source_stats),
            runtime.handle(),
            cfg.wake.is_some(),
        )?;
        if let Some(r) = &cfg.activity_report {
            // Pushes activity to sandbox-extproc; see report.rs.
            runtime.spawn(crate::report::run(
                r.clone(),
                Arc::clone(&table),
                Arc::clone(&report_stats),
            ));
        }
        let stats_scheduler = envoy
            .scheduler()
            .map(|s| Arc::new(s) as Arc<dyn Commit + Sync>);
        if let Some(s) = &stats_scheduler {
            let s = Arc::clone(s);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(STATS_INTERVAL);
                loop {
                    tick.tick().await;
                    s.commit(EVENT_PUBLISH_STATS);
                }
            });
        }
        tracing::info!(routes = table.len(), "sandbox_gateway config loaded");
        Ok(Gateway {
            holds: HoldBook::new(cfg.max_held_misses),
            cfg,
            table,
            waker,
            metrics,
            source_stats,
            report_stats,
            published: Mutex::new(published),
            runtime: Some(runtime),
            stats_scheduler,
        })
    }

    /// Runs `fut` on the module's runtime (never on an Envoy worker). The runtime lives until
    /// the gateway is dropped, which Envoy does only after the last filter that could call this.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.runtime {
            rt.spawn(fut);
        }
    }

    /// Main thread: publish gauges and counter deltas that background threads collected.
    fn publish_stats<E: ConfigEnvoy>(&self, envoy: &E) {
        envoy.set_gauge(self.metrics.routes, self.table.len());
        envoy.set_gauge(
            self.metrics.routes_synced,
            u64::from(self.table.is_synced()),
        );
        envoy.set_gauge(self.metrics.paused_sandboxes, self.table.paused_len());
        let wake_stats = self.waker.as_ref().map(|w| &w.stats);
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        for ((id, read), last) in self.metrics.cumulative.iter().zip(published.iter_mut()) {
            let now = read(&self.source_stats, &self.report_stats, wake_stats);
            if now > *last {
                envoy.increment_counter(*id, now - *last);
            }
            *last = now;
        }
    }
}

// SAFETY: `new_filter` hands `&'static self` only to `SandboxFilter`, which keeps it in its own
// field; the tasks the filter spawns (`hold`, `wake`) capture an `Arc<RouteTable>` or an
// `Arc<Waker>`, never the gateway.
#[allow(unsafe_code)]
unsafe impl HttpFilterConfig for Gateway {
    type Filter = SandboxFilter;
    type Error = GatewayError;

    fn new<E: ConfigEnvoy>(envoy: &E, _name: &str, config: &[u8]) -> Result<Self, GatewayError> {
        Gateway::new(envoy, config)
    }

    fn new_filter(&'static self) -> SandboxFilter {
        SandboxFilter::new(self)
    }

    fn on_scheduled<E: ConfigEnvoy>(&self, envoy: &E, event_id: u64) {
        if event_id == EVENT_PUBLISH_STATS {
            self.publish_stats(envoy);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Stop every thread that could commit to a scheduler before the schedulers are freed.
        // Envoy's filters share its config object, so the last release (and this drop) can
        // happen off the main thread, even on this runtime's own thread (a scheduler commit
        // holds the config while it runs): blocking there would panic, so let the runtime wind
        // down in the background. The stats scheduler is an `Arc`: whoever drops last frees it.
        if let Some(rt) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
        self.stats_scheduler.take();
    }
}
