//! Command-line flags. Defaults give a run of ~5 minutes on a 2-core machine (after the build);
//! `--quick` is the smoke test `make test` runs (tiny workloads, correctness only, never timing).

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(
    name = "sandbox-bench",
    about = "What does the sandbox gateway cost? Direct vs static-route Envoy vs Envoy + module \
             (vs ext_proc), measured side by side, interleaved."
)]
pub struct Args {
    /// Smoke test: 1 round, ~1 s per variant and workload, small ID sets; fails unless every
    /// variant served every workload with zero errors.
    #[arg(long)]
    pub quick: bool,

    /// Interleaved rounds (A B C A B C ...); the report shows the median over rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,

    /// Measured seconds per (round, workload, variant). Many short rounds beat a few long ones
    /// on a noisy machine: ratios are paired per round and their median is reported.
    #[arg(long, default_value = "1.2", value_parser = parse_secs)]
    pub duration: Duration,

    /// Unmeasured warm-up per (workload, variant), once before the first round.
    #[arg(long, default_value = "0.5", value_parser = parse_secs)]
    pub warmup: Duration,

    /// Concurrent connections for the HTTP workloads (closed loop: one request in flight each).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,

    /// Concurrent connections for the new-connection-per-request workload.
    #[arg(long, default_value_t = 8)]
    pub newconn_connections: usize,

    /// WebSocket connections held open; each does back-to-back message round trips.
    #[arg(long, default_value_t = 16)]
    pub ws_connections: usize,

    /// Concurrent SSE streams.
    #[arg(long, default_value_t = 8)]
    pub sse_streams: usize,

    /// Events per SSE stream (sent back to back by the upstream).
    #[arg(long, default_value_t = 32)]
    pub sse_events: u64,

    /// Body size of the POST workload, bytes.
    #[arg(long, default_value_t = 4096)]
    pub post_bytes: usize,

    /// Sandbox-ID counts for the spread workloads (each uniform and Zipf). 1 is the plain GET.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000, 100_000])]
    pub id_counts: Vec<usize>,

    /// Zipf exponent for the skewed ID spread.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_s: f64,

    /// Upstream sandbox servers (in this process); the IDs are spread over them.
    #[arg(long, default_value_t = 4)]
    pub upstreams: usize,

    /// Only these workloads (comma-separated names; see the report for the list).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,

    /// Only these variants (direct, static, module, extproc).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,

    /// Envoy worker threads (--concurrency).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,

    /// CPUs Envoy (and sandbox-extproc) are pinned to.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0])]
    pub envoy_cpus: Vec<usize>,

    /// CPUs the load generator and the upstream sandboxes are pinned to.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1])]
    pub load_cpus: Vec<usize>,

    /// Don't pin anything (e.g. on a 1-CPU machine).
    #[arg(long)]
    pub no_pin: bool,

    /// Directory with libsandbox_gateway.so (default: $SANDBOX_GATEWAY_MODULE_DIR, else
    /// target/release if built there, else target/debug).
    #[arg(long)]
    pub module_dir: Option<PathBuf>,

    /// Where report.json and latency.svg go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,

    /// No progress bar (CI logs).
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.0..=600.0).contains(&secs) {
        return Err(format!("{secs} s is outside 0..=600"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Args {
    /// Applies `--quick`: every workload and variant still runs, but briefly and small, so the
    /// smoke test covers the same code paths as a full run.
    pub fn resolve(mut self) -> Self {
        if self.quick {
            self.rounds = 1;
            self.duration = Duration::from_millis(700);
            self.warmup = Duration::from_millis(100);
            self.connections = self.connections.min(4);
            self.newconn_connections = self.newconn_connections.min(2);
            self.ws_connections = self.ws_connections.min(2);
            self.sse_streams = self.sse_streams.min(2);
            self.sse_events = self.sse_events.min(8);
            self.id_counts = vec![1000];
        }
        self.rounds = self.rounds.max(1);
        self
    }
}
