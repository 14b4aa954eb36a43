//! Prometheus metrics (prefix `sandboxgateway_`) and the ops listener: `GET /metrics`,
//! `/healthz` (the process runs) and `/readyz` (its caches have synced).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

/// Every metric the controller exports.
pub struct Metrics {
    pub registry: Registry,
    /// Claims by `pool`, `launch` (warm, cold, none) and `result` (bound, conflict, empty, failed).
    pub claims: IntCounterVec,
    /// Seconds from a `Sandbox`'s creation to its pod bound and Ready, by `launch`.
    pub claim_seconds: HistogramVec,
    /// Pool pods by `pool` and `phase` (warm, starting, claimed, failed, outdated).
    pub pool_pods: IntGaugeVec,
    /// Releases by `reason` (Deleted, Idle, Expired, PodFailed, PoolDeleted).
    pub releases: IntCounterVec,
    /// Idle passes by `result` (sighted, no_replicas, replica_unreachable, replica_evicted).
    pub idle_passes: IntCounterVec,
    /// Reconcile errors by `controller` and `error` (the [`crate::error::Error`] variant).
    pub reconcile_errors: IntCounterVec,
    /// Phase transitions of sandboxes, `from_phase` → `to_phase`.
    pub transitions: IntCounterVec,
    /// Pods created and deleted by pools, by `op`.
    pub pool_writes: IntCounterVec,
    /// 1 while this replica leads.
    pub leader: IntGauge,
    /// Wake requests by `result` (accepted, running, not_found, paused_by_spec, not_leader,
    /// not_ready, unauthenticated, invalid, error; `requested`: a resume asked for through the
    /// Sandbox itself).
    pub wakes: IntCounterVec,
    /// Seconds from a wake accepted to the sandbox Ready again.
    pub wake_seconds: prometheus::Histogram,
    /// Sandboxes in phase Paused (as of the last count, every few seconds).
    pub paused: IntGauge,
    /// Resumes that failed and paused the sandbox again, by `reason` (PodFailed,
    /// StartupTimeout).
    pub resume_failures: IntCounterVec,
    /// Caches synced: `/readyz` answers 200.
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new_custom(Some("sandboxgateway".into()), None)?;
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let claims = counters(
            "claims_total",
            "claims by pool, launch and result",
            &["pool", "launch", "result"],
        )?;
        let releases = counters(
            "releases_total",
            "sandboxes released, by reason",
            &["reason"],
        )?;
        let idle_passes = counters("idle_passes_total", "idle passes by result", &["result"])?;
        let reconcile_errors = counters(
            "reconcile_errors_total",
            "reconcile errors by controller and error",
            &["controller", "error"],
        )?;
        let transitions = counters(
            "sandbox_phase_transitions_total",
            "sandbox phase transitions",
            &["from_phase", "to_phase"],
        )?;
        let pool_writes = counters(
            "pool_pod_writes_total",
            "pool pod creates and deletes",
            &["op"],
        )?;
        let claim_seconds = HistogramVec::new(
            HistogramOpts::new(
                "claim_duration_seconds",
                "Sandbox created to bound and Ready (startup duration), by launch",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["launch"],
        )?;
        registry.register(Box::new(claim_seconds.clone()))?;
        let pool_pods = IntGaugeVec::new(
            Opts::new("pool_pods", "pool pods by phase"),
            &["pool", "phase"],
        )?;
        registry.register(Box::new(pool_pods.clone()))?;
        let leader = IntGauge::new("leader", "1 while this replica is the leader")?;
        registry.register(Box::new(leader.clone()))?;
        let wakes = counters("wakes_total", "wake requests by result", &["result"])?;
        let wake_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "wake_duration_seconds",
                "wake accepted to the sandbox Ready again",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(wake_seconds.clone()))?;
        let paused = IntGauge::new("paused_sandboxes", "sandboxes in phase Paused")?;
        registry.register(Box::new(paused.clone()))?;
        let resume_failures = counters(
            "resume_failures_total",
            "resumes that failed and paused the sandbox again, by reason",
            &["reason"],
        )?;
        Ok(Arc::new(Metrics {
            registry,
            claims,
            claim_seconds,
            pool_pods,
            releases,
            idle_passes,
            reconcile_errors,
            transitions,
            pool_writes,
            leader,
            wakes,
            wake_seconds,
            paused,
            resume_failures,
            ready: AtomicBool::new(false),
        }))
    }

    /// Marks the caches synced.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the caches have synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Serves the ops endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let m = metrics.clone();
                async move {
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/metrics" => reply(StatusCode::OK, m.render()),
                        "/healthz" => reply(StatusCode::OK, "ok\n"),
                        "/readyz" if m.ready.load(Ordering::Acquire) => {
                            reply(StatusCode::OK, "ok\n")
                        }
                        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n"),
                        _ => reply(StatusCode::NOT_FOUND, "not found\n"),
                    })
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// Binds the ops listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
