//! Prometheus metrics, served as text on `GET /metrics` from a small HTTP/1 listener.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct Metrics {
    pub registry: Registry,
    /// ext_proc requests by outcome: `routed`, `ready` (readiness probes answered 200), or the
    /// local reply's error code.
    pub requests: IntCounterVec,
    pub miss_holds: IntCounter,
    pub miss_holds_displaced: IntCounter,
    /// Requests held for a paused sandbox to wake, and how their holds ended.
    pub wake_holds: IntCounterVec,
    /// Time from request headers received to the answer sent, seconds.
    pub decision_seconds: Histogram,
    pub report_streams: IntGauge,
    pub report_batches: IntCounter,
    pub report_entries: IntCounter,
    pub last_active_queries: IntCounter,
    /// ActivityService calls refused for a missing or wrong bearer token, by `rpc`.
    pub auth_failures: IntCounterVec,
    pub sandboxes: IntGauge,
    pub evicted: IntGauge,
    pub forgotten: IntGauge,
    pub routes: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new_custom(Some("sandbox_extproc".into()), None)?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "ext_proc requests by outcome"),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let decision_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "decision_seconds",
                "time to answer one ext_proc request-headers message",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.05, 0.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(decision_seconds.clone()))?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "activity_auth_failures_total",
                "ActivityService calls refused: missing or wrong bearer token",
            ),
            &["rpc"],
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        // Both series exist from the start (at 0), so an alert on their rate needs no `absent()`.
        for rpc in ["Report", "GetLastActive"] {
            auth_failures.with_label_values(&[rpc]);
        }
        let wake_holds = IntCounterVec::new(
            Opts::new(
                "wake_holds_total",
                "requests held for a paused sandbox, by how the hold ended",
            ),
            &["end"],
        )?;
        registry.register(Box::new(wake_holds.clone()))?;
        Ok(Arc::new(Metrics {
            wake_holds,
            requests,
            miss_holds: counter("miss_holds_total", "requests held for a missing route")?,
            miss_holds_displaced: counter(
                "miss_holds_displaced_total",
                "holds ended early to make room for a lighter client's miss",
            )?,
            decision_seconds,
            report_streams: gauge("report_streams", "open ActivityService.Report streams")?,
            report_batches: counter("report_batches_total", "activity batches merged")?,
            report_entries: counter("report_entries_total", "activity entries merged")?,
            last_active_queries: counter("last_active_queries_total", "GetLastActive calls")?,
            auth_failures,
            sandboxes: gauge("sandboxes", "sandboxes with a last-active value")?,
            evicted: gauge(
                "sandboxes_evicted",
                "entries evicted because the table was full (since start)",
            )?,
            forgotten: gauge(
                "sandboxes_forgotten",
                "entries dropped after their route was gone for the grace period (since start)",
            )?,
            routes: gauge("routes", "routes in this replica's route table")?,
            registry,
        }))
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Serves `/metrics` (and `/healthz`) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let m = Arc::clone(&m);
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (200, "text/plain; version=0.0.4", m.render()),
                        "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
                        _ => (404, "text/plain", b"not found\n".to_vec()),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
