//! `sandbox-controller`: `run` the controller, print the `crd`s, `claim`, `release`, `pause` and
//! `resume` sandboxes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use sandbox_controller::context::{Config, Replicas};
use sandbox_controller::leader::{Leadership, LeaseConfig};
use sandbox_controller::{cli, metrics, run};

#[derive(Parser)]
#[command(
    name = "sandbox-controller",
    version,
    about = "sandbox-gateway's control plane"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller (kubeconfig or in-cluster credentials, as kubectl finds them).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions (YAML) to stdout.
    Crd,
    /// Create a Sandbox from a pool, wait until it is Ready, print its ID, URL and token.
    Claim(cli::ClaimArgs),
    /// Release a sandbox: delete the Sandbox whose ID (or name) is given.
    Release(cli::ReleaseArgs),
    /// Pause a sandbox (`spec.paused: true`): no pod, ID, token and volumes kept; traffic does
    /// not wake it until `resume`.
    Pause(cli::PauseArgs),
    /// Resume a paused sandbox (explicitly paused or paused for idleness).
    Resume(cli::PauseArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Manage only this namespace (default: all).
    #[arg(long, env = "SANDBOX_CONTROLLER_NAMESPACE")]
    namespace: Option<String>,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(
        long,
        env = "SANDBOX_CONTROLLER_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    metrics_bind_address: SocketAddr,
    /// Elect a leader on a Lease (run two replicas); off: this replica always leads.
    #[arg(long, env = "SANDBOX_CONTROLLER_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// The Lease's namespace (default: the pod's, from POD_NAMESPACE).
    #[arg(long, env = "SANDBOX_CONTROLLER_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(
        long,
        env = "SANDBOX_CONTROLLER_LEASE_NAME",
        default_value = "sandbox-controller"
    )]
    lease_name: String,
    /// Lease duration, e.g. `15s`.
    #[arg(long, env = "SANDBOX_CONTROLLER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// This replica's identity in the Lease (default: POD_NAME, else the host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// sandbox-extproc replicas as a headless Service `namespace/name:port` (every endpoint
    /// of its EndpointSlices is asked).
    #[arg(long, env = "SANDBOX_CONTROLLER_ACTIVITY_SERVICE")]
    activity_service: Option<String>,
    /// sandbox-extproc replicas as a fixed list of `http://host:port` (comma-separated).
    #[arg(
        long,
        env = "SANDBOX_CONTROLLER_ACTIVITY_ENDPOINTS",
        value_delimiter = ','
    )]
    activity_endpoints: Vec<String>,
    /// File holding the ActivityService bearer token.
    #[arg(long, env = "SANDBOX_CONTROLLER_ACTIVITY_TOKEN_FILE")]
    activity_token_file: Option<PathBuf>,
    /// How often the idle pass runs.
    #[arg(long, env = "SANDBOX_CONTROLLER_IDLE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    idle_interval: Duration,
    /// A sandbox's gateway URL, with `{id}` and `{port}`
    /// (e.g. `https://{port}-{id}.sandboxes.example.com`).
    #[arg(long, env = "SANDBOX_CONTROLLER_URL_TEMPLATE")]
    url_template: Option<String>,
    /// Pool pod creations per second, per pool.
    #[arg(long, env = "SANDBOX_CONTROLLER_REFILL_RATE", default_value_t = 50.0)]
    refill_rate: f64,
    /// Pool pod creations allowed at once, per pool.
    #[arg(long, env = "SANDBOX_CONTROLLER_REFILL_BURST", default_value_t = 100)]
    refill_burst: usize,
    /// Where the WakeService (gRPC, h2c) listens: gateways ask it to resume paused sandboxes.
    /// It runs only with --wake-token-file: nothing unauthenticated may wake sandboxes.
    #[arg(
        long,
        env = "SANDBOX_CONTROLLER_WAKE_BIND_ADDRESS",
        default_value = "0.0.0.0:9090"
    )]
    wake_bind_address: String,
    /// File holding the WakeService bearer token (callers send `authorization: Bearer <token>`).
    #[arg(long, env = "SANDBOX_CONTROLLER_WAKE_TOKEN_FILE")]
    wake_token_file: Option<PathBuf>,
}

fn parse_service(s: &str) -> Result<Replicas> {
    let (ns, rest) = s
        .split_once('/')
        .context("--activity-service is namespace/name:port")?;
    let (name, port) = rest
        .rsplit_once(':')
        .context("--activity-service is namespace/name:port")?;
    Ok(Replicas::Service {
        namespace: ns.to_string(),
        name: name.to_string(),
        port: port.parse().context("--activity-service port")?,
    })
}

async fn run_controller(a: RunArgs) -> Result<()> {
    let replicas = match (&a.activity_service, a.activity_endpoints.is_empty()) {
        (Some(_), false) => bail!("give --activity-service or --activity-endpoints, not both"),
        (Some(s), true) => Some(parse_service(s)?),
        (None, false) => Some(Replicas::Static(a.activity_endpoints.clone())),
        (None, true) => None,
    };
    let activity_token = match &a.activity_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string();
            if t.is_empty() {
                bail!("{} is empty", p.display());
            }
            Some(t)
        }
        None => None,
    };
    if replicas.is_some() && activity_token.is_none() {
        tracing::warn!("no --activity-token-file: GetLastActive is sent unauthenticated");
    }
    let wake = match &a.wake_token_file {
        None => {
            tracing::info!(
                "no --wake-token-file: the WakeService is off (paused sandboxes wake only by \
                 spec or annotation)"
            );
            None
        }
        Some(p) => {
            let token = routing::bearer::BearerToken::from_file(p)?;
            let addr: SocketAddr = a
                .wake_bind_address
                .parse()
                .context("--wake-bind-address is host:port")?;
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the WakeService on {addr}"))?;
            listener.set_nonblocking(true)?;
            Some(sandbox_controller::context::WakeEndpoint::new(
                listener,
                Some(token),
            ))
        }
    };
    let cfg = Config {
        wake,
        namespace: a.namespace.clone(),
        url_template: a.url_template.clone(),
        idle_interval: a.idle_interval,
        replicas,
        activity_token,
        refill_rate: a.refill_rate,
        refill_burst: a.refill_burst,
        ..Config::default()
    };
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes credentials (kubeconfig or in-cluster)")?;
    let metrics = metrics::Metrics::new()?;
    let listener = metrics::bind(a.metrics_bind_address)
        .await
        .with_context(|| format!("binding {}", a.metrics_bind_address))?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    let identity = a.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    if !a.leader_elect {
        metrics.leader.set(1);
        return run::run(client, cfg, metrics, Arc::new(Leadership::always())).await;
    }
    let lease = LeaseConfig {
        namespace: a
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into()),
        name: a.lease_name.clone(),
        identity,
        duration: a.lease_duration,
    };
    let leader = Arc::new(Leadership::standby());
    let l2 = leader.clone();
    let m2 = metrics.clone();
    let elector = {
        let client = client.clone();
        async move {
            let mut rx = l2.subscribe();
            let watch_gauge = async move {
                while rx.changed().await.is_ok() {
                    m2.leader.set(i64::from(*rx.borrow()));
                }
            };
            tokio::select! {
                r = sandbox_controller::leader::run(client, lease, &l2) => r,
                _ = watch_gauge => Ok(()),
            }
        }
    };
    tokio::select! {
        r = run::run(client, cfg, metrics, leader) => r,
        r = elector => {
            r?;
            // Lost the Lease: exit, so a restart comes back as a clean standby.
            bail!("lost leadership")
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::Crd => {
            print!("{}", sandbox_controller::crds_yaml()?);
            Ok(())
        }
        Cmd::Run(a) => rt.block_on(run_controller(*a)),
        Cmd::Claim(a) => rt.block_on(cli::claim(a)),
        Cmd::Release(a) => rt.block_on(cli::release(a)),
        Cmd::Pause(a) => rt.block_on(cli::pause(a)),
        Cmd::Resume(a) => rt.block_on(cli::resume(a)),
    }
}
