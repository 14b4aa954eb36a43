//! Abuse next to a healthy sandbox: a timed run with bounded counts, not a test. The e2e load
//! cases (`tests/tests/cases/load.rs`) assert what must happen; this measures what it costs.
//!
//! `make bench-abuse` (release builds), i.e.
//! `cargo bench -p sandbox-gateway-bench --bench abuse [-- --rounds 3 --requests 500]`.
//!
//! In each mode (the module, ext_proc), one gateway with `miss_hold_ms: 3000` and
//! `max_held_misses: 200` (the flood's config; it changes nothing for the other conditions):
//!
//! 1. Memory per idle WebSocket: Envoy's VmRSS (and sandbox-extproc's) with 0, 1,000 and 3,000
//!    WebSockets open through the gateway, spread over sandbox IDs so no ID reaches
//!    `max_streams_per_sandbox`.
//! 2. A healthy sandbox's latency: sequential GETs on one keep-alive connection, under four
//!    conditions run in turn each round (the order rotates), so the machine's drift shows as
//!    spread across rounds: quiet; a hung sandbox with 1,100 requests on it (1,000 wait, 100 get
//!    429); a junk-ID flood from 127.0.0.2; 1,100 open WebSockets. During the flood, 100 claims
//!    (their route appears 100 ms after their first request) from 127.0.0.1 and 100 from
//!    127.0.0.2, the flooding client itself.
//!
//! The gateway (Envoy, and sandbox-extproc in ext_proc mode) runs on CPU 0; this process (load,
//! sandboxes, probe) on CPU 1. The probe has its own thread and runtime, so it does not queue
//! behind the flood's tasks, but it still shares CPU 1 with them. Writes
//! `benches/results/abuse.md` (also printed).

#![deny(unsafe_code)]

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sandbox_gateway_bench::{procfs, sys};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{repo_root, Envoy};
use sandbox_gateway_harness::extproc::ExtProcGateway;
use sandbox_gateway_harness::gateway::{FilterGateway, GatewayUnderTest, RouteEntry};
use sandbox_gateway_harness::hung::HungSandbox;
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{block_in_place, JoinHandle};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The default `max_streams_per_sandbox`: the hung sandbox takes this many requests.
const PER_SANDBOX: usize = 1000;
/// Requests sent to the hung sandbox: 100 past its bound.
const HUNG_REQUESTS: usize = PER_SANDBOX + 100;
/// Junk clients (connections) of the flood, all from one address.
const FLOOD_CLIENTS: usize = 300;
const MISS_HOLD_MS: u64 = 3000;
/// `max_held_misses`: the flood alone has more clients than places.
const MAX_HELD: usize = 200;
/// 100 claims per client address and round, 10 at a time (as the e2e case makes them).
const CLAIM_BATCHES: usize = 10;
const CLAIM_BATCH: usize = 10;
/// How long after a claim's first request its route is written (the claim completing).
const CLAIM_DELAY: Duration = Duration::from_millis(100);
/// WebSockets open during condition (d): past Envoy's default circuit breakers (1,024).
const OPEN_WS: usize = 1100;
/// WebSockets per sandbox ID at most, well under `PER_SANDBOX`.
const WS_PER_ID: usize = 500;
/// Unmeasured requests before each probe: the connection and Envoy's upstream pool are warm.
const WARMUP: usize = 50;
const GATEWAY_CPU: usize = 0;
const LOAD_CPU: usize = 1;
/// Upper bounds, so a broken gateway fails the run instead of stalling it.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const RUN_LIMIT: Duration = Duration::from_secs(900);
const JUNK_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Memory per idle WebSocket and a healthy sandbox's latency under abuse, module and ext_proc.
#[derive(Parser, Debug)]
#[command(name = "abuse")]
struct Args {
    /// Modes to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "filter,extproc"
    )]
    modes: Vec<Mode>,
    /// Rounds of the four latency conditions.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured GETs per condition and round.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Idle WebSocket counts for the memory measurement (0 is always measured), ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,3000")]
    ws_counts: Vec<usize>,
    /// The markdown report; default `benches/results/abuse.md` in the repo.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run unpinned (the default pins the gateway to CPU 0 and the load to CPU 1).
    #[arg(long)]
    no_pin: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Envoy + libsandbox_gateway.so.
    Filter,
    /// Envoy's ext_proc filter + sandbox-extproc.
    Extproc,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Filter => "module",
            Mode::Extproc => "ext_proc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    Quiet,
    Hung,
    Flood,
    WebSockets,
}

impl Condition {
    const ALL: [Condition; 4] = [
        Condition::Quiet,
        Condition::Hung,
        Condition::Flood,
        Condition::WebSockets,
    ];

    fn label(self) -> &'static str {
        match self {
            Condition::Quiet => "(a) quiet",
            Condition::Hung => "(b) hung sandbox, 1,100 requests on it",
            Condition::Flood => "(c) junk-ID flood, 300 clients",
            Condition::WebSockets => "(d) 1,100 open WebSockets",
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    ensure!(
        args.rounds > 0 && args.requests > 0,
        "--rounds and --requests must be positive"
    );
    ensure!(
        !args.ws_counts.is_empty() && args.ws_counts.windows(2).all(|w| w[0] < w[1]),
        "--ws-counts must be ascending"
    );
    // Set before any thread exists: the harness reads them when it starts each process. Release
    // builds unless told otherwise: a debug module's costs say nothing about the product.
    let release = repo_root().join("target/release");
    if std::env::var_os("SANDBOX_GATEWAY_MODULE_DIR").is_none() {
        std::env::set_var("SANDBOX_GATEWAY_MODULE_DIR", &release);
    }
    if std::env::var_os("SANDBOX_EXTPROC_BIN").is_none() {
        std::env::set_var("SANDBOX_EXTPROC_BIN", release.join("sandbox-extproc"));
    }
    // Quiet processes: per-request logging would be measured as gateway cost.
    for var in ["SANDBOX_EXTPROC_LOG", "SANDBOX_GATEWAY_LOG"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "warn");
        }
    }
    sandbox_gateway_harness::envoy::module_dir()
        .context("build the release module first: `make bench-abuse` does")?;
    if args.modes.contains(&Mode::Extproc) {
        sandbox_gateway_harness::extproc::extproc_bin()
            .context("build the release sandbox-extproc first: `make bench-abuse` does")?;
    }

    // Counted before pinning: afterwards this thread's mask says 1.
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    // LOAD_CPU is the higher of the two CPUs.
    let pin = !args.no_pin && ncpu > LOAD_CPU;
    if pin {
        // The runtime's threads, and the probe's, inherit this mask.
        sys::pin_current_thread(&[LOAD_CPU]).context("pinning the load")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let cpu_at_start = procfs::CpuTimes::now()?;
    let results = rt
        .block_on(async { tokio::time::timeout(RUN_LIMIT, run(&args, pin)).await })
        .map_err(|_| anyhow!("the run took longer than {RUN_LIMIT:?}"))??;
    let steal = cpu_at_start.steal_percent_until(procfs::CpuTimes::now()?);
    let elapsed = started.elapsed();
    let md = report(&args, &results, pin, ncpu, steal, elapsed);
    println!("{md}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| repo_root().join("benches/results/abuse.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({:.0} s)", out.display(), elapsed.as_secs_f64());
    // The flood's and the hung requests' tasks are aborted with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn run(args: &Args, pin: bool) -> Result<Vec<ModeResult>> {
    let mut results = Vec::new();
    for &mode in &args.modes {
        eprintln!("== {}", mode.name());
        let mut bed = Bed::start(mode, args, pin).await?;
        let memory = memory(&mut bed, &args.ws_counts).await?;
        let mut r = ModeResult {
            mode,
            memory,
            probes: Condition::ALL.iter().map(|_| Vec::new()).collect(),
            hung_refused: vec![],
            floods: vec![],
            claims_local: vec![],
            claims_flood: vec![],
        };
        for round in 0..args.rounds {
            for i in 0..Condition::ALL.len() {
                let cond = Condition::ALL[(i + round) % Condition::ALL.len()];
                eprintln!("   round {} {}", round + 1, cond.label());
                let p = condition(&mut bed, &mut r, cond, round, args.requests).await?;
                r.probes[i_of(cond)].push(p);
                bed.settle().await?;
            }
        }
        let (e, s) = rss_now(&bed).await?;
        r.memory.envoy_end = e;
        r.memory.sidecar_end = s;
        results.push(r);
    }
    Ok(results)
}

fn i_of(c: Condition) -> usize {
    Condition::ALL.iter().position(|&x| x == c).unwrap_or(0)
}

// ---- the gateway and its sandboxes ------------------------------------------------------------

enum Gateway {
    Filter(FilterGateway),
    // Boxed: the ext_proc gateway (Envoy + sandbox-extproc handles) is much larger.
    ExtProc(Box<ExtProcGateway>),
}

impl Gateway {
    fn start(mode: Mode, routes: &[RouteEntry]) -> Result<Gateway> {
        let cfg = json!({"miss_hold_ms": MISS_HOLD_MS, "max_held_misses": MAX_HELD});
        Ok(match mode {
            Mode::Filter => Gateway::Filter(FilterGateway::start(routes, cfg)?),
            Mode::Extproc => Gateway::ExtProc(Box::new(ExtProcGateway::start(routes, cfg)?)),
        })
    }

    fn under_test(&self) -> &dyn GatewayUnderTest {
        match self {
            Gateway::Filter(g) => g,
            Gateway::ExtProc(g) => &**g,
        }
    }

    fn envoy(&mut self) -> &mut Envoy {
        match self {
            Gateway::Filter(g) => &mut g.envoy,
            Gateway::ExtProc(g) => &mut g.envoy,
        }
    }

    fn envoy_pid(&self) -> u32 {
        match self {
            Gateway::Filter(g) => g.envoy.pid(),
            Gateway::ExtProc(g) => g.envoy.pid(),
        }
    }

    fn extproc_pid(&self) -> Option<u32> {
        match self {
            Gateway::Filter(_) => None,
            Gateway::ExtProc(g) => g.extproc.pid(),
        }
    }
}

/// Starts the gateway on a new thread pinned to the gateway's CPU: Envoy, sandbox-extproc and
/// every thread they start inherit the mask. A fresh thread, not tokio's blocking pool, whose
/// reused threads would stay pinned.
async fn start_gateway(mode: Mode, routes: Vec<RouteEntry>, pin: bool) -> Result<Gateway> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let res = if pin {
            sys::pin_current_thread(&[GATEWAY_CPU])
        } else {
            Ok(())
        }
        .and_then(|()| Gateway::start(mode, &routes));
        let _ = tx.send(res);
    });
    rx.await.context("gateway start thread")?
}

/// One mode's gateway and everything behind it.
struct Bed {
    // The gateway first: killed before the sandboxes it talks to.
    gw: Gateway,
    addr: SocketAddr,
    routes: Vec<RouteEntry>,
    ws_ids: usize,
    claimed: SandboxServer,
    hung: HungSandbox,
    _healthy: SandboxServer,
    _ws: Vec<SandboxServer>,
}

impl Bed {
    async fn start(mode: Mode, args: &Args, pin: bool) -> Result<Bed> {
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let healthy = SandboxServer::start("healthy", any).await?;
        let claimed = SandboxServer::start("claimed", any).await?;
        let ws = vec![
            SandboxServer::start("ws-even", any).await?,
            SandboxServer::start("ws-odd", any).await?,
        ];
        let hung = HungSandbox::start().await?;
        let most = args
            .ws_counts
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(OPEN_WS);
        let ws_ids = most.div_ceil(WS_PER_ID).max(2);
        let mut routes = vec![
            RouteEntry::new("healthy", healthy.addr),
            RouteEntry::new("hung", hung.addr),
        ];
        routes.extend((0..ws_ids).map(|i| RouteEntry::new(&ws_id(i), ws[i % 2].addr)));
        let gw = start_gateway(mode, routes.clone(), pin)
            .await
            .with_context(|| format!("starting the {} gateway", mode.name()))?;
        let addr = gw.under_test().addr();
        Ok(Bed {
            gw,
            addr,
            routes,
            ws_ids,
            claimed,
            hung,
            _healthy: healthy,
            _ws: ws,
        })
    }

    /// An Envoy stat (0 when absent). The admin call blocks briefly; the runtime has another
    /// worker for the sandboxes meanwhile.
    fn stat(&mut self, name: &str) -> Result<u64> {
        let envoy = self.gw.envoy();
        Ok(block_in_place(|| envoy.stat(name))?.unwrap_or(0))
    }

    fn counter(&self, name: &str) -> Result<u64> {
        block_in_place(|| self.gw.under_test().counter(name))
    }

    /// Waits until no request or WebSocket is open through the gateway and the hung sandbox has
    /// let go of every connection, so one condition's leftovers cannot weigh on the next; fails
    /// if Envoy died.
    async fn settle(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.gw.envoy().alive() {
                bail!("Envoy exited; log:\n{}", self.gw.envoy().log());
            }
            let down = self.stat("http.sandbox_gateway.downstream_rq_active")?;
            let up = self.stat("cluster.sandbox_original_dst.upstream_rq_active")?;
            let hung = self.hung.open();
            if down == 0 && up == 0 && hung == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("not settled after 30 s: {down} downstream, {up} upstream requests active, {hung} hung connections");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // sandbox-extproc learns that a stream ended when its gRPC stream does, a moment later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Envoy, and sandbox-extproc in ext_proc mode.
    fn gateway_pids(&self) -> Vec<u32> {
        let mut pids = vec![self.gw.envoy_pid()];
        pids.extend(self.gw.extproc_pid());
        pids
    }

    fn rss(&self) -> Result<(u64, Option<u64>)> {
        let sidecar = self.gw.extproc_pid().map(procfs::rss_kib).transpose()?;
        Ok((procfs::rss_kib(self.gw.envoy_pid())?, sidecar))
    }
}

fn ws_id(i: usize) -> String {
    format!("ws-{i}")
}

// ---- the healthy sandbox's latency ------------------------------------------------------------

/// One probe: latencies of the GETs answered 200, sorted, and everything else.
#[derive(Debug, Default, Clone)]
struct Probe {
    sorted: Vec<Duration>,
    errors: usize,
    /// CPU the gateway's processes used during the probe, in % of one CPU: near 100 means the
    /// gateway's one worker, not the probe, was the bottleneck.
    gateway_cpu: f64,
}

impl Probe {
    /// Nearest-rank percentile in ms.
    fn pct(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1].as_secs_f64() * 1e3
    }
}

/// Runs `n` sequential GETs to the healthy sandbox on one keep-alive connection, on a thread and
/// runtime of its own, so the probe never waits in a run queue behind load tasks.
async fn probe(bed: &Bed, n: usize) -> Result<Probe> {
    let (addr, pids) = (bed.addr, bed.gateway_pids());
    let cpu = || -> Result<f64> { pids.iter().map(|&p| procfs::cpu_seconds(p)).sum() };
    let (cpu0, t0) = (cpu()?, Instant::now());
    let mut p = probe_thread(addr, n).await?;
    p.gateway_cpu = 100.0 * (cpu()? - cpu0) / t0.elapsed().as_secs_f64();
    Ok(p)
}

async fn probe_thread(addr: SocketAddr, n: usize) -> Result<Probe> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let res = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(probe_here(addr, n)));
        let _ = tx.send(res);
    });
    rx.await.context("probe thread")?
}

async fn probe_here(addr: SocketAddr, n: usize) -> Result<Probe> {
    let mut conn = keep_alive(addr).await?;
    let mut times = Vec::with_capacity(n);
    let mut errors = 0;
    let deadline = Instant::now() + PROBE_LIMIT;
    for i in 0..WARMUP + n {
        if Instant::now() > deadline {
            // Bounded run time: what is left counts as failed.
            errors += WARMUP + n - i;
            break;
        }
        let t = Instant::now();
        let res = tokio::time::timeout(REQUEST_TIMEOUT, get_healthy(&mut conn)).await;
        let elapsed = t.elapsed();
        let measured = i >= WARMUP;
        match res {
            Ok(Ok(200)) if measured => times.push(elapsed),
            Ok(Ok(_)) if measured => errors += 1,
            Ok(Ok(_)) => {}
            _ => {
                errors += usize::from(measured);
                conn = keep_alive(addr).await?;
            }
        }
    }
    times.sort();
    Ok(Probe {
        sorted: times,
        errors,
        gateway_cpu: f64::NAN,
    })
}

async fn keep_alive(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get_healthy(conn: &mut SendRequest<Empty<Bytes>>) -> Result<u16> {
    conn.ready().await?;
    let req = hyper::Request::get("/bench")
        .header("host", "gateway.test")
        .header("x-sandbox-id", "healthy")
        .body(Empty::new())?;
    let resp = conn.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// Runs one condition around a probe and returns the probe.
async fn condition(
    bed: &mut Bed,
    r: &mut ModeResult,
    cond: Condition,
    round: usize,
    n: usize,
) -> Result<Probe> {
    let addr = bed.addr;
    match cond {
        Condition::Quiet => probe(bed, n).await,
        Condition::Hung => {
            let load = hang(bed).await?;
            let p = probe(bed, n).await?;
            r.hung_refused.push(load.finish()?);
            Ok(p)
        }
        Condition::Flood => {
            let flood = Flood::start(addr);
            let displaced_at_start = bed.counter("miss_holds_displaced")?;
            // Measured once the book is full of junk: holds give way.
            let deadline = Instant::now() + Duration::from_secs(30);
            while bed.counter("miss_holds_displaced")? == displaced_at_start {
                ensure!(
                    Instant::now() < deadline,
                    "the flood filled no hold book in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (a0, d0, t0) = (
                flood.answered(),
                bed.counter("miss_holds_displaced")?,
                Instant::now(),
            );
            let p = probe(bed, n).await?;
            let secs = t0.elapsed().as_secs_f64();
            r.floods.push(FloodRate {
                answered_per_s: (flood.answered() - a0) as f64 / secs,
                displaced_per_s: (bed.counter("miss_holds_displaced")? - d0) as f64 / secs,
            });
            r.claims_local
                .push(claims(bed, LOCAL_IP, &format!("r{round}-other")).await?);
            r.claims_flood
                .push(claims(bed, JUNK_IP, &format!("r{round}-flooder")).await?);
            flood.stop();
            Ok(p)
        }
        Condition::WebSockets => {
            let open = open_websockets(addr, 0, OPEN_WS, bed.ws_ids).await?;
            let p = probe(bed, n).await?;
            drop(open);
            Ok(p)
        }
    }
}

// ---- (b) a hung sandbox -----------------------------------------------------------------------

struct HungLoad {
    tasks: Vec<JoinHandle<()>>,
    answers: mpsc::Receiver<u16>,
    refused: usize,
}

impl HungLoad {
    /// Ends the waiting requests; the 429s seen, after checking no waiting one was answered.
    fn finish(mut self) -> Result<usize> {
        for t in &self.tasks {
            t.abort();
        }
        let mut late = 0;
        while self.answers.try_recv().is_ok() {
            late += 1;
        }
        ensure!(
            late == 0,
            "{late} requests to the hung sandbox were answered"
        );
        Ok(self.refused)
    }
}

/// 1,100 requests to the hung sandbox, returned once 100 are refused and 1,000 wait on it.
async fn hang(bed: &Bed) -> Result<HungLoad> {
    let addr = bed.addr;
    let (tx, mut answers) = mpsc::channel(HUNG_REQUESTS);
    // Connects in bursts the listener's backlog takes.
    let connecting = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::with_capacity(HUNG_REQUESTS);
    for _ in 0..HUNG_REQUESTS {
        let (tx, connecting) = (tx.clone(), Arc::clone(&connecting));
        tasks.push(tokio::spawn(async move {
            let status = async {
                let permit = connecting.acquire_owned().await;
                let mut s = connect_from(addr, LOCAL_IP).await?;
                s.write_all(
                    b"GET /wait HTTP/1.1\r\nhost: g\r\nx-sandbox-id: hung\r\nconnection: close\r\n\r\n",
                )
                .await?;
                drop(permit);
                let mut buf = Vec::new();
                // Requests let through wait here until the round ends them.
                s.read_to_end(&mut buf).await?;
                anyhow::Ok(client::parse(&buf)?.status)
            }
            .await;
            let _ = tx.send(status.unwrap_or(0)).await;
        }));
    }
    drop(tx);
    let refused_count = HUNG_REQUESTS - PER_SANDBOX;
    let mut statuses = BTreeMap::new();
    for _ in 0..refused_count {
        let s = tokio::time::timeout(Duration::from_secs(60), answers.recv())
            .await
            .context("waiting for the requests past the bound to be refused")?
            .context("every request task ended")?;
        *statuses.entry(s).or_insert(0usize) += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while bed.hung.open() < PER_SANDBOX {
        ensure!(
            Instant::now() < deadline,
            "only {} of {PER_SANDBOX} requests reached the hung sandbox (answers: {statuses:?})",
            bed.hung.open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = statuses.get(&429).copied().unwrap_or(0);
    ensure!(
        refused == refused_count,
        "want {refused_count} 429s, got {statuses:?}"
    );
    Ok(HungLoad {
        tasks,
        answers,
        refused,
    })
}

/// A connection from `from` (a loopback address of its own). Closing it sends RST: the run makes
/// tens of thousands of connections, and TIME_WAIT on either side would eat local ports.
async fn connect_from(addr: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    sys::set_zero_linger(&socket)?;
    socket.bind(SocketAddr::new(from, 0))?;
    let s = socket.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---- (c) a junk-ID flood and claims beside it -------------------------------------------------

/// 300 clients from 127.0.0.2, each a keep-alive connection sending a made-up ID as soon as its
/// last one was answered. Keep-alive rather than a connection per request: the flood is as
/// dense, and a 3-round run does not exhaust 127.0.0.2's ports.
struct Flood {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy)]
struct FloodRate {
    answered_per_s: f64,
    displaced_per_s: f64,
}

impl Flood {
    fn start(addr: SocketAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let tasks = (0..FLOOD_CLIENTS)
            .map(|t| {
                let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if flood_connection(addr, t, &mut n, &stop, &answered)
                            .await
                            .is_err()
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Flood {
            stop,
            answered,
            tasks,
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        // Held junk requests would wait out their 3 s hold; dropping the connections ends them.
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn flood_connection(
    addr: SocketAddr,
    t: usize,
    n: &mut u64,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> Result<()> {
    let s = connect_from(addr, JUNK_IP).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    let driver = tokio::spawn(conn);
    let res = async {
        while !stop.load(Ordering::Relaxed) {
            *n += 1;
            send.ready().await?;
            let req = hyper::Request::get("/")
                .header("host", "g")
                .header("x-sandbox-id", format!("junk-{t}-{n}"))
                .body(Empty::<Bytes>::new())?;
            let resp = tokio::time::timeout(REQUEST_TIMEOUT, send.send_request(req)).await??;
            resp.into_body().collect().await?;
            answered.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    }
    .await;
    driver.abort();
    res
}

#[derive(Debug, Default, Clone)]
struct Claims {
    served: usize,
    total: usize,
    /// What the others got: status (0 = no answer) → count.
    failed: BTreeMap<u16, usize>,
}

/// 100 claims from `from`, 10 at a time: each batch's first requests go out, and 100 ms later
/// their routes are written, as a sandbox claim completes. A claim is served when its first
/// request gets the new sandbox's 200 (it was held until the route appeared, not answered 404).
async fn claims(bed: &mut Bed, from: IpAddr, tag: &str) -> Result<Claims> {
    let addr = bed.addr;
    let mut out = Claims::default();
    for batch in 0..CLAIM_BATCHES {
        let ids: Vec<String> = (0..CLAIM_BATCH)
            .map(|i| format!("claim-{tag}-{batch}-{i}"))
            .collect();
        let first: Vec<_> = ids
            .iter()
            .map(|id| {
                let id = id.clone();
                tokio::spawn(async move { get_from(addr, from, &id).await })
            })
            .collect();
        tokio::time::sleep(CLAIM_DELAY).await;
        bed.routes
            .extend(ids.iter().map(|id| RouteEntry::new(id, bed.claimed.addr)));
        bed.gw.under_test().set_routes(&bed.routes)?;
        for t in first {
            out.total += 1;
            match t.await? {
                Ok(r) if r.status == 200 && served_by(&r) == "claimed" => out.served += 1,
                Ok(r) => *out.failed.entry(r.status).or_default() += 1,
                Err(_) => *out.failed.entry(0).or_default() += 1,
            }
        }
    }
    Ok(out)
}

/// One GET on a fresh connection from `from`.
async fn get_from(addr: SocketAddr, from: IpAddr, id: &str) -> Result<client::Response> {
    let mut s = connect_from(addr, from).await?;
    let req =
        format!("GET / HTTP/1.1\r\nhost: g\r\nx-sandbox-id: {id}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .context("no answer")??;
    client::parse(&buf)
}

/// Which sandbox answered (the echo body names it); "" for anything else.
fn served_by(r: &client::Response) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["sandbox"].as_str().map(str::to_string))
        .unwrap_or_default()
}

// ---- WebSockets -------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// Opens `count` WebSockets (numbered from `first`, spread over the `ws_ids` sandbox IDs), 100
/// handshakes at a time, and checks one in 100 echoes.
async fn open_websockets(
    addr: SocketAddr,
    first: usize,
    count: usize,
    ws_ids: usize,
) -> Result<Vec<Ws>> {
    let connecting = Arc::new(Semaphore::new(100));
    let opening: Vec<JoinHandle<Result<Ws>>> = (first..first + count)
        .map(|i| {
            let connecting = Arc::clone(&connecting);
            tokio::spawn(async move {
                let _permit = connecting.acquire_owned().await;
                let mut req = format!("ws://{addr}/socket").into_client_request()?;
                req.headers_mut()
                    .insert("x-sandbox-id", ws_id(i % ws_ids).parse()?);
                let stream = connect_from(addr, LOCAL_IP).await?;
                let (ws, resp) = tokio::time::timeout(
                    Duration::from_secs(30),
                    tokio_tungstenite::client_async(req, stream),
                )
                .await
                .with_context(|| format!("websocket {i}: no answer"))?
                .with_context(|| format!("websocket {i}"))?;
                ensure!(resp.status() == 101, "websocket {i}: {}", resp.status());
                Ok(ws)
            })
        })
        .collect();
    let mut open = Vec::with_capacity(count);
    for t in opening {
        open.push(t.await??);
    }
    for ws in open.iter_mut().step_by(100) {
        ws.send(Message::text("ping")).await?;
        let m = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
            .await
            .context("no echo")?
            .context("closed")??;
        ensure!(m.to_text()? == "ping", "echo: {m:?}");
    }
    Ok(open)
}

// ---- 1. memory per idle WebSocket -------------------------------------------------------------

#[derive(Debug, Clone)]
struct Memory {
    /// WebSocket counts, 0 first, and the RSS (KiB) at each: Envoy, and sandbox-extproc.
    counts: Vec<usize>,
    envoy: Vec<u64>,
    sidecar: Vec<u64>,
    /// After closing them all again.
    envoy_after: u64,
    sidecar_after: Option<u64>,
    /// After the latency rounds (which open and close 1,100 WebSockets each): whether memory
    /// freed by closed WebSockets is used again.
    envoy_end: u64,
    sidecar_end: Option<u64>,
}

/// RSS after a pause (the last WebSockets' buffers are in place), the median of three reads.
async fn rss_now(bed: &Bed) -> Result<(u64, Option<u64>)> {
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut reads = Vec::new();
    for _ in 0..3 {
        reads.push(bed.rss()?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut envoy: Vec<u64> = reads.iter().map(|r| r.0).collect();
    let mut sidecar: Vec<u64> = reads.iter().filter_map(|r| r.1).collect();
    envoy.sort_unstable();
    sidecar.sort_unstable();
    Ok((envoy[1], sidecar.get(1).copied()))
}

async fn memory(bed: &mut Bed, counts: &[usize]) -> Result<Memory> {
    // One-time costs (the first WebSocket's code paths, the upstream pool, allocator arenas)
    // before the zero point, so they do not count per WebSocket.
    let warm = open_websockets(bed.addr, 0, 50, bed.ws_ids).await?;
    drop(warm);
    probe(bed, 0).await?;
    bed.settle().await?;
    let mut m = Memory {
        counts: vec![0],
        envoy: vec![],
        sidecar: vec![],
        envoy_after: 0,
        sidecar_after: None,
        envoy_end: 0,
        sidecar_end: None,
    };
    let (e, s) = rss_now(bed).await?;
    m.envoy.push(e);
    m.sidecar.extend(s);
    let mut open = Vec::new();
    for &c in counts {
        eprintln!("   memory: {c} WebSockets");
        open.extend(open_websockets(bed.addr, open.len(), c - open.len(), bed.ws_ids).await?);
        let (e, s) = rss_now(bed).await?;
        m.counts.push(c);
        m.envoy.push(e);
        m.sidecar.extend(s);
    }
    drop(open);
    bed.settle().await?;
    let (e, s) = rss_now(bed).await?;
    m.envoy_after = e;
    m.sidecar_after = s;
    Ok(m)
}

/// Least-squares slope of y over x: KiB per WebSocket.
fn slope(x: &[usize], y: &[u64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    let mx = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let my = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (&xi, &yi) in x.iter().zip(y) {
        num += (xi as f64 - mx) * (yi as f64 - my);
        den += (xi as f64 - mx).powi(2);
    }
    num / den
}

// ---- the report -------------------------------------------------------------------------------

struct ModeResult {
    mode: Mode,
    memory: Memory,
    /// Per condition (in `Condition::ALL` order), one probe per round.
    probes: Vec<Vec<Probe>>,
    hung_refused: Vec<usize>,
    floods: Vec<FloodRate>,
    claims_local: Vec<Claims>,
    claims_flood: Vec<Claims>,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The median and, in brackets, the range over rounds.
fn spread(v: &[f64], digits: usize) -> String {
    spread_unit(v, digits, "")
}

fn spread_unit(v: &[f64], digits: usize, unit: &str) -> String {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return "-".into();
    }
    s.sort_by(f64::total_cmp);
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    if s.len() == 1 {
        format!("{med:.digits$}{unit}")
    } else {
        format!(
            "{med:.digits$}{unit} ({:.digits$}-{:.digits$})",
            s[0],
            s[s.len() - 1]
        )
    }
}

/// One process's row; `later`: its RSS after closing the WebSockets and at the end of the run.
fn memory_rows(
    md: &mut String,
    mode: &str,
    process: &str,
    m: &Memory,
    kib: &[u64],
    later: [u64; 2],
) {
    let fit = slope(&m.counts, kib);
    let segments: Vec<String> = m
        .counts
        .windows(2)
        .zip(kib.windows(2))
        .map(|(c, k)| {
            let per = (k[1] as f64 - k[0] as f64) / (c[1] - c[0]) as f64;
            format!("{}→{}: {per:.1}", c[0], c[1])
        })
        .collect();
    let rss: Vec<String> = kib.iter().map(|&k| mib(k)).collect();
    let per_gib = if fit > 0.0 {
        thousands(1024.0 * 1024.0 / fit)
    } else {
        "-".into()
    };
    let _ = writeln!(
        md,
        "| {mode} | {process} | {} | {} | {} | **{fit:.1}** ({}) | {per_gib} |",
        rss.join(" / "),
        mib(later[0]),
        mib(later[1]),
        segments.join(", "),
    );
}

/// Rounded to hundreds with thousands separators: the slope is not more precise than that.
fn thousands(v: f64) -> String {
    let n = ((v / 100.0).round() * 100.0) as u64;
    match n {
        1_000_000.. => format!("{},{:03},{:03}", n / 1_000_000, n / 1000 % 1000, n % 1000),
        1000.. => format!("{},{:03}", n / 1000, n % 1000),
        _ => n.to_string(),
    }
}

fn claims_cell(c: &[Claims]) -> String {
    let served: usize = c.iter().map(|c| c.served).sum();
    let total: usize = c.iter().map(|c| c.total).sum();
    let per_round: Vec<String> = c.iter().map(|c| c.served.to_string()).collect();
    let mut failed: BTreeMap<u16, usize> = BTreeMap::new();
    for c in c {
        for (&k, &v) in &c.failed {
            *failed.entry(k).or_default() += v;
        }
    }
    let failed: Vec<String> = failed
        .iter()
        .map(|(k, v)| {
            if *k == 0 {
                format!("{v}× no answer")
            } else {
                format!("{v}× {k}")
            }
        })
        .collect();
    format!(
        "{served} of {total} ({:.0}%) | {} | {}",
        100.0 * served as f64 / total.max(1) as f64,
        per_round.join(", "),
        if failed.is_empty() {
            "-".into()
        } else {
            failed.join(", ")
        }
    )
}

fn report(
    args: &Args,
    results: &[ModeResult],
    pin: bool,
    ncpu: usize,
    steal: f64,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Abuse next to a healthy sandbox (`make bench-abuse`)\n"
    );
    let _ = writeln!(
        md,
        "Release builds; {} ({ncpu} CPUs), {}; CPU steal {steal:.1}% of all CPU time during the run; \
         run time {:.0} s. A noisy shared VM: wall-clock figures swing ±30% between runs, so read \
         the ratios within one run and their spread across rounds, not absolute times.\n",
        procfs::cpu_model(),
        if pin {
            "gateway (Envoy, sandbox-extproc) on CPU 0, load, sandboxes and probe on CPU 1"
        } else {
            "unpinned"
        },
        elapsed.as_secs_f64()
    );

    let _ = writeln!(md, "## Memory per idle WebSocket\n");
    let counts: Vec<String> = results
        .first()
        .map(|r| r.memory.counts.iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "VmRSS with {} idle WebSockets open through the gateway (upgraded, one echo checked in \
         100), after 50 opened and closed to warm up. KiB per WebSocket: least-squares slope over \
         the points, and each segment's. WebSockets per GiB: 1 GiB ÷ the slope.\n",
        counts.join(" / ")
    );
    let _ = writeln!(
        md,
        "| mode | process | RSS MiB at {} WS | after closing them | at the end of the run | KiB per WS (segments) | WS per GiB |",
        counts.join(" / ")
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|");
    for r in results {
        let m = &r.memory;
        let name = r.mode.name();
        memory_rows(
            &mut md,
            name,
            "Envoy",
            m,
            &m.envoy,
            [m.envoy_after, m.envoy_end],
        );
        if let (Some(after), Some(end), true) = (
            m.sidecar_after,
            m.sidecar_end,
            m.sidecar.len() == m.counts.len(),
        ) {
            memory_rows(
                &mut md,
                name,
                "sandbox-extproc",
                m,
                &m.sidecar,
                [after, end],
            );
            let both: Vec<u64> = m.envoy.iter().zip(&m.sidecar).map(|(a, b)| a + b).collect();
            let later = [m.envoy_after + after, m.envoy_end + end];
            memory_rows(&mut md, name, "both", m, &both, later);
        }
    }

    let _ = writeln!(md, "\n## A healthy sandbox's latency under abuse\n");
    let _ = writeln!(
        md,
        "{} sequential `GET /bench` to the healthy sandbox on one keep-alive connection (after {WARMUP} \
         unmeasured), per condition and round; {} rounds, the conditions' order rotating each \
         round. Figures: median over rounds (range over rounds). Ratios: the condition's figure \
         ÷ the same round's quiet one. Gateway CPU: Envoy's (and sandbox-extproc's) CPU time \
         during the probe, in % of one CPU (Envoy runs one worker). Errors: non-200 answers and \
         failed requests, all rounds.\n",
        args.requests, args.rounds
    );
    let _ = writeln!(
        md,
        "| mode | condition | p50 ms | p99 ms | max ms | p50 vs quiet | p99 vs quiet | max vs quiet | gateway CPU % | errors |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    let metrics: [fn(&Probe) -> f64; 3] = [|p| p.pct(0.5), |p| p.pct(0.99), |p| p.pct(1.0)];
    for r in results {
        let quiet = &r.probes[i_of(Condition::Quiet)];
        for (ci, cond) in Condition::ALL.iter().enumerate() {
            let probes = &r.probes[ci];
            let mut cells = Vec::new();
            for f in metrics {
                let v: Vec<f64> = probes.iter().map(f).collect();
                cells.push(spread(&v, 2));
            }
            for f in metrics {
                if *cond == Condition::Quiet {
                    cells.push("1.00x".into());
                    continue;
                }
                let v: Vec<f64> = probes.iter().zip(quiet).map(|(p, q)| f(p) / f(q)).collect();
                cells.push(spread_unit(&v, 2, "x"));
            }
            let cpu: Vec<f64> = probes.iter().map(|p| p.gateway_cpu).collect();
            cells.push(spread(&cpu, 0));
            let errors: usize = probes.iter().map(|p| p.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {errors} |",
                r.mode.name(),
                cond.label(),
                cells.join(" | ")
            );
        }
    }
    let _ = writeln!(md);
    for r in results {
        let refused: Vec<String> = r.hung_refused.iter().map(|n| n.to_string()).collect();
        let answered: Vec<f64> = r.floods.iter().map(|f| f.answered_per_s).collect();
        let displaced: Vec<f64> = r.floods.iter().map(|f| f.displaced_per_s).collect();
        let _ = writeln!(
            md,
            "- {}: (b) 429 `sandbox_busy` per round: {} of {HUNG_REQUESTS}, the other \
             {PER_SANDBOX} waiting on the hung sandbox. (c) the flood's answered requests/s during \
             the probe: {}; holds displaced/s: {}.",
            r.mode.name(),
            refused.join(", "),
            spread(&answered, 0),
            spread(&displaced, 0)
        );
    }

    let _ = writeln!(md, "\n## Claims during the junk flood\n");
    let _ = writeln!(
        md,
        "In (c), with the flood running ({FLOOD_CLIENTS} keep-alive clients from 127.0.0.2, \
         `miss_hold_ms: {MISS_HOLD_MS}`, `max_held_misses: {MAX_HELD}`): {} claims per client \
         and round, {CLAIM_BATCH} at a time, each route written {} ms after its first request. \
         Served: that first request got the new sandbox's 200.\n",
        CLAIM_BATCHES * CLAIM_BATCH,
        CLAIM_DELAY.as_millis()
    );
    let _ = writeln!(
        md,
        "| mode | claims from | served | per round | the others got |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|---|");
    for r in results {
        let _ = writeln!(
            md,
            "| {} | 127.0.0.1 (another client) | {} |",
            r.mode.name(),
            claims_cell(&r.claims_local)
        );
        let _ = writeln!(
            md,
            "| {} | 127.0.0.2 (the flooding client) | {} |",
            r.mode.name(),
            claims_cell(&r.claims_flood)
        );
    }
    md
}
