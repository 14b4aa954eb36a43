//! `sandbox-extproc`: `serve` runs a replica; `last-active` asks replicas when each sandbox was
//! last used.

#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use routing::bearer::BearerToken;
use sandbox_extproc::{cli, server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sandbox-extproc", version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve ext_proc and the ActivityService.
    Serve(ServeArgs),
    /// Print last-active per sandbox (max over every --endpoint).
    LastActive(LastActiveArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The gateway config: the same JSON as the Envoy module's filter config.
    #[arg(long)]
    config: PathBuf,
    /// ext_proc gRPC listener (Envoy's ext_proc filter connects here).
    #[arg(long, default_value = "0.0.0.0:18080")]
    listen: SocketAddr,
    /// ActivityService gRPC listener (Envoy modules report here; the controller queries here).
    #[arg(long, default_value = "0.0.0.0:18090")]
    activity_listen: SocketAddr,
    /// Prometheus metrics listener (GET /metrics).
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Name in GetLastActive answers; default: $HOSTNAME (the pod name), else "sandbox-extproc".
    #[arg(long)]
    replica_id: Option<String>,
    /// Forget a sandbox this many seconds after its route disappeared.
    #[arg(long, default_value_t = 600)]
    forget_after_s: u64,
    /// Most sandboxes kept in memory; the least recently active are evicted beyond this.
    #[arg(long, default_value_t = 1_000_000)]
    max_sandboxes: usize,
    /// Write the bound addresses here as JSON once listening (for tests and scripts).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds in-flight calls may take after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_s: u64,
    /// Log as JSON lines (default: human-readable). Level from RUST_LOG (default info).
    #[arg(long)]
    log_json: bool,
    /// File holding the ActivityService bearer token (read once at start, whitespace trimmed).
    /// When set, Report and GetLastActive require `authorization: Bearer <token>`; when unset
    /// the ActivityService is open (a warning is logged). ext_proc is not gated by it.
    #[arg(long, env = "SANDBOX_EXTPROC_ACTIVITY_TOKEN_FILE")]
    activity_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct LastActiveArgs {
    /// A replica's ActivityService, e.g. http://127.0.0.1:18090 (repeat for every replica).
    #[arg(long, required = true)]
    endpoint: Vec<String>,
    /// Only these sandboxes (repeatable); default: all.
    #[arg(long)]
    id: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Per-replica timeout, seconds.
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
    /// File holding the ActivityService bearer token, sent to every --endpoint.
    #[arg(long, env = "SANDBOX_EXTPROC_ACTIVITY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

fn read_token(path: Option<&PathBuf>) -> Result<Option<BearerToken>> {
    path.map(|p| BearerToken::from_file(p).context("--activity-token-file / --token-file"))
        .transpose()
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match args.cmd {
        Cmd::Serve(a) => {
            init_logs(a.log_json);
            let activity_token = read_token(a.activity_token_file.as_ref())?;
            let json = std::fs::read(&a.config)
                .with_context(|| format!("reading {}", a.config.display()))?;
            let config = routing::GatewayConfig::from_json(&json)
                .with_context(|| format!("in {}", a.config.display()))?;
            let replica = a
                .replica_id
                .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
                .unwrap_or_else(|| "sandbox-extproc".into());
            let opts = server::ServeOptions {
                config,
                extproc_listen: a.listen,
                activity_listen: a.activity_listen,
                metrics_listen: a.metrics_listen,
                replica,
                forget_after: Duration::from_secs(a.forget_after_s),
                max_sandboxes: a.max_sandboxes,
                ready_file: a.ready_file,
                shutdown_grace: Duration::from_secs(a.shutdown_grace_s),
                activity_token,
            };
            rt.block_on(server::serve(opts, server::signal()))?;
            // Report streams and ext_proc streams may still hold tasks: don't wait for them.
            rt.shutdown_timeout(Duration::from_millis(100));
            Ok(())
        }
        Cmd::LastActive(a) => {
            let token = read_token(a.token_file.as_ref())?;
            let la = rt.block_on(cli::last_active(
                &a.endpoint,
                &a.id,
                Duration::from_secs(a.timeout_s),
                token.as_ref(),
            ))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&cli::to_json(&la))?);
            } else {
                print!("{}", cli::to_table(&la));
            }
            Ok(())
        }
    }
}
