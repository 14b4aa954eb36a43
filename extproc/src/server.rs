//! Runs one sandbox-extproc replica: the route source, the ext_proc server, the ActivityService
//! (each with gRPC health and reflection), the metrics listener, and a graceful shutdown.

use crate::activity::{Activity, ActivitySvc};
use crate::aggregate::Aggregator;
use crate::metrics::{self, Metrics};
use crate::processor::Processor;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use proto::v1::activity_service_server::ActivityServiceServer;
use routing::holds::HoldBook;
use routing::stats::SourceStats;
use routing::wake::Waker;
use routing::{GatewayConfig, RouteTable};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Routes(#[from] routing::source::SourceError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("writing the ready file {path}: {source}")]
    ReadyFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: GatewayConfig,
    pub extproc_listen: SocketAddr,
    pub activity_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Reported in GetLastActive answers.
    pub replica: String,
    /// Forget a sandbox this long after its route disappeared.
    pub forget_after: Duration,
    /// Most sandboxes kept; the oldest are evicted beyond this.
    pub max_sandboxes: usize,
    /// Written once all listeners are bound: `{"extproc": "ip:port", "activity": ..., "metrics": ...}`.
    pub ready_file: Option<PathBuf>,
    /// After a shutdown signal, how long in-flight calls may take before the process exits anyway.
    pub shutdown_grace: Duration,
    /// Required as `authorization: Bearer <token>` on every ActivityService call; None leaves
    /// the service open (warned at start). The ext_proc service is never gated by it.
    pub activity_token: Option<routing::bearer::BearerToken>,
}

/// How often aggregation upkeep runs (local flush, forgetting, gauges).
const TICK: Duration = Duration::from_secs(1);

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

fn local(what: &'static str, l: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
    l.local_addr()
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Serves until `shutdown` resolves, then drains for up to `shutdown_grace`.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let metrics = Metrics::new()?;
    let table = Arc::new(RouteTable::new());
    routing::source::start(
        &opts.config.routes,
        Arc::clone(&table),
        Arc::new(SourceStats::default()),
        &tokio::runtime::Handle::current(),
        opts.config.wake.is_some(),
    )?;
    let activity = Arc::new(Activity::new(
        Aggregator::new(opts.max_sandboxes, opts.forget_after),
        Arc::clone(&table),
        Arc::clone(&metrics),
        opts.replica.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    if opts.activity_token.is_none() {
        tracing::warn!(
            "the ActivityService is unauthenticated: anyone who reaches its port can report \
             activity and read last-active; set --activity-token-file"
        );
    }

    let ext_l = bind("ext_proc", opts.extproc_listen).await?;
    let act_l = bind("activity", opts.activity_listen).await?;
    let met_l = bind("metrics", opts.metrics_listen).await?;
    let ext_addr = local("ext_proc", &ext_l, opts.extproc_listen)?;
    let act_addr = local("activity", &act_l, opts.activity_listen)?;
    let met_addr = local("metrics", &met_l, opts.metrics_listen)?;

    let processor = Processor {
        cfg: Arc::new(opts.config.clone()),
        activity: Arc::clone(&activity),
        holds: HoldBook::new(opts.config.max_held_misses),
        waker: opts.config.wake.clone().map(|w| {
            Waker::new(
                w,
                Arc::clone(&table),
                opts.config.miss_hold,
                tokio::runtime::Handle::current(),
                format!("sandbox-extproc-{}", std::process::id()),
            )
        }),
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExternalProcessorServer<Processor>>()
        .await;
    health
        .set_serving::<ActivityServiceServer<ActivitySvc>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
    };
    let until_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Nagle off: every ext_proc answer is one small message on the request's critical path.
    let ext_server = Server::builder()
        .add_service(ExternalProcessorServer::new(processor))
        .add_service(health_svc.clone())
        .add_service(reflection()?)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(ext_l).with_nodelay(Some(true)),
            until_stop(stop_rx.clone()),
        );
    let act_server = Server::builder()
        .add_service(ActivityServiceServer::new(ActivitySvc {
            activity: Arc::clone(&activity),
            shutdown: stop_rx.clone(),
            token: opts.activity_token.clone(),
        }))
        .add_service(health_svc)
        .add_service(reflection()?)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(act_l).with_nodelay(Some(true)),
            until_stop(stop_rx.clone()),
        );
    let ext_task = tokio::spawn(ext_server);
    let act_task = tokio::spawn(act_server);
    let met_task = tokio::spawn(metrics::serve(
        met_l,
        Arc::clone(&metrics),
        until_stop(stop_rx.clone()),
    ));
    let upkeep = {
        let activity = Arc::clone(&activity);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(TICK);
            loop {
                t.tick().await;
                activity.tick();
            }
        })
    };

    if let Some(path) = &opts.ready_file {
        let body = serde_json::json!({
            "extproc": ext_addr.to_string(),
            "activity": act_addr.to_string(),
            "metrics": met_addr.to_string(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| ServeError::ReadyFile {
                path: path.clone(),
                source,
            })?;
    }
    tracing::info!(
        extproc = %ext_addr,
        activity = %act_addr,
        metrics = %met_addr,
        replica = opts.replica,
        activity_auth = opts.activity_token.is_some(),
        routes = table.len(),
        "sandbox-extproc serving"
    );

    shutdown.await;
    tracing::info!(grace = ?opts.shutdown_grace, "shutting down");
    health
        .set_not_serving::<ExternalProcessorServer<Processor>>()
        .await;
    let _ = stop_tx.send(true);
    upkeep.abort();
    let drained = tokio::time::timeout(opts.shutdown_grace, async {
        let (a, b, _) = tokio::join!(ext_task, act_task, met_task);
        (a, b)
    })
    .await;
    match drained {
        Ok((a, b)) => {
            for r in [a, b] {
                if let Ok(Err(e)) = r {
                    return Err(e.into());
                }
            }
            tracing::info!("drained");
        }
        Err(_) => tracing::warn!("shutdown grace elapsed; exiting with calls in flight"),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
