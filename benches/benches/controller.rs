//! The controller's costs: a timed run, not a test (the controller's tests assert what must
//! happen; this measures how fast and how many writes).
//!
//! `make bench-controller` (release builds), i.e.
//! `cargo bench -p sandbox-gateway-bench --bench controller [-- --sequential 50 --burst 1000]`.
//!
//! All of it on the in-process API server (the real kube client over HTTP), the test kubelet
//! (pods Ready 20 ms after they are seen, each with a real sandbox server on a loopback IP) and,
//! for the first two, the real Envoy with the module in Kubernetes mode:
//!
//! 1. Warm claim to first 200 through Envoy: create a Sandbox, wait (watch) for Ready, GET
//!    through Envoy with its token until 200. One at a time, then 20 at once.
//! 2. API writes per warm claim, from the API server's write counters.
//! 3. A burst of `--burst` claims at once from a pool of as many warm pods: claim-to-Ready
//!    p50/p99, and whether the pool ever held more unclaimed pods than `replicas` (over-creation).
//! 4. Sustained claims at `--rate` per minute for `--seconds` with refill (each claimed sandbox is
//!    deleted once Ready, so the run stays bounded): p50/p99 and over-creation.
//! 5. The idle pass's work over 10k and 100k sandboxes with 3 sandbox-extproc replicas: the
//!    three GetLastActive calls (every sandbox on every replica, the worst case), the merge and
//!    the rule over every sandbox; time and this process's RSS growth. API writes are not part
//!    of it (a pass writes only for sandboxes whose activity moved or that are idle).
//!
//! Writes `benches/results/controller.md` (also printed).

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use futures_util::future::join_all;
use futures_util::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::runtime::{watcher, WatchStreamExt};
use sandbox_controller::context::Config;
use sandbox_controller::crd::{Phase, Sandbox, SandboxPool};
use sandbox_controller::decide::idle::{judge, merge, Answer, Clock, Reply, Verdict};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_bench::pct;
use sandbox_gateway_bench::procfs;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{repo_root, Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_harness::gateway::bootstrap;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::json;

const NS: &str = "default";

#[derive(Parser)]
struct Args {
    /// Claims one at a time through Envoy.
    #[arg(long, default_value_t = 50)]
    sequential: usize,
    /// Rounds of 20 claims at once through Envoy.
    #[arg(long, default_value_t = 5)]
    parallel_rounds: usize,
    /// Claims in the burst (from a pool of as many).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Sustained claims per minute.
    #[arg(long, default_value_t = 10_000)]
    rate: usize,
    /// How long the sustained run lasts.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Sandbox counts for the idle pass.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    idle_sizes: Vec<usize>,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Stack {
    api: FakeApiServer,
    kc: kube::Client,
    _kubelet: TestKubelet,
    _ctl: tokio::task::JoinHandle<()>,
}

async fn stack(refill_rate: f64, refill_burst: usize) -> Result<Stack> {
    let api = FakeApiServer::start().await?;
    let kc = api.client()?;
    let kubelet = TestKubelet::start(
        kc.clone(),
        KubeletOptions {
            ready_after: Duration::from_millis(20),
            ..KubeletOptions::default()
        },
    );
    let cfg = Config {
        refill_rate,
        refill_burst,
        ..Config::default()
    };
    let (c, m) = (kc.clone(), Metrics::new()?);
    let ctl = tokio::spawn(async move {
        let _ = sandbox_controller::run::run(c, cfg, m, Arc::new(Leadership::always())).await;
    });
    Ok(Stack {
        api,
        kc,
        _kubelet: kubelet,
        _ctl: ctl,
    })
}

async fn make_pool(kc: &kube::Client, name: &str, replicas: usize) -> Result<()> {
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "replicas": replicas, "onEmpty": "Wait", "claimWait": "60s",
            "template": { "spec": { "containers": [{ "name": "s", "image": "example/s:1" }] } } }
    }))?;
    Api::<SandboxPool>::namespaced(kc.clone(), NS)
        .create(&PostParams::default(), &pool)
        .await?;
    let api = Api::<SandboxPool>::namespaced(kc.clone(), NS);
    let r = replicas as i32;
    tokio::time::timeout(
        Duration::from_secs(300),
        await_condition(api, name, move |p: Option<&SandboxPool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.replicas == r)
        }),
    )
    .await
    .context("pool never filled")??;
    Ok(())
}

/// One watch on every Sandbox, shared by all claims of a run: a claim registers before it
/// creates its Sandbox and is told when the watch first sees it Ready. (A watch per claim made
/// the in-process API server filter every event once per waiting claim, which measured the
/// bench's own watches, not the controller.)
#[derive(Clone)]
struct ReadyWatch {
    waiters: Arc<std::sync::Mutex<HashMap<String, tokio::sync::oneshot::Sender<Sandbox>>>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl ReadyWatch {
    fn start(kc: &kube::Client) -> ReadyWatch {
        let waiters: Arc<std::sync::Mutex<HashMap<String, tokio::sync::oneshot::Sender<Sandbox>>>> =
            Arc::default();
        let w = waiters.clone();
        let api = Api::<Sandbox>::namespaced(kc.clone(), NS);
        let task = tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(ev) = events.next().await {
                let Ok(s) = ev else { continue };
                if s.status.as_ref().is_some_and(|st| st.phase == Phase::Ready) {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    let tx = w.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                    if let Some(tx) = tx {
                        let _ = tx.send(s);
                    }
                }
            }
        });
        ReadyWatch {
            waiters,
            task: Arc::new(task),
        }
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

/// Creates a Sandbox and waits for Ready; returns it and the seconds it took.
async fn claim(
    kc: &kube::Client,
    rw: &ReadyWatch,
    pool: &str,
    name: &str,
) -> Result<(Sandbox, f64)> {
    let api = Api::<Sandbox>::namespaced(kc.clone(), NS);
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": { "name": name, "namespace": NS }, "spec": { "poolRef": pool }
    }))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    rw.waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), tx);
    let t0 = Instant::now();
    api.create(&PostParams::default(), &sbx).await?;
    let ready = tokio::time::timeout(Duration::from_secs(120), rx)
        .await
        .context("claim never Ready")?
        .context("the watch ended")?;
    Ok((ready, t0.elapsed().as_secs_f64()))
}

async fn token(kc: &kube::Client, sbx: &Sandbox) -> Result<String> {
    let name = sbx
        .status
        .as_ref()
        .and_then(|s| s.token_secret.clone())
        .context("secret")?;
    let s = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(kc.clone(), NS)
        .get(&name)
        .await?;
    Ok(String::from_utf8(
        s.data.context("data")?["token"].0.clone(),
    )?)
}

/// Claim → Ready → first 200 through Envoy; seconds.
async fn claim_to_200(
    kc: &kube::Client,
    rw: &ReadyWatch,
    gw: std::net::SocketAddr,
    name: &str,
) -> Result<f64> {
    let t0 = Instant::now();
    let (sbx, _) = claim(kc, rw, "warm", name).await?;
    let id = sbx
        .status
        .as_ref()
        .and_then(|s| s.sandbox_id.clone())
        .context("id")?;
    let tok = token(kc, &sbx).await?;
    loop {
        let r = client::get(gw, "/", &[("x-sandbox-id", &id), ("x-access-token", &tok)]).await?;
        if r.status == 200 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "never routed: {}",
            r.status
        );
    }
}

/// Watches a pool's status and records the most unclaimed pods it ever had.
fn watch_unclaimed(kc: &kube::Client, pool: &str) -> (Arc<AtomicI32>, Arc<AtomicBool>) {
    let max = Arc::new(AtomicI32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (m, s) = (max.clone(), stop.clone());
    let api = Api::<SandboxPool>::namespaced(kc.clone(), NS);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={pool}"));
    tokio::spawn(async move {
        let mut w = watcher(api, cfg).applied_objects().boxed();
        while let Some(Ok(p)) = w.next().await {
            if let Some(st) = p.status {
                m.fetch_max(st.replicas + st.starting + st.outdated, Ordering::Relaxed);
            }
            if s.load(Ordering::Relaxed) {
                break;
            }
        }
    });
    (max, stop)
}

async fn bench_envoy(args: &Args, out: &mut String) -> Result<()> {
    let s = stack(200.0, 200).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    s.api.kubeconfig(&kubeconfig)?;
    let cfg = json!({
        "route_source": { "type": "kubernetes", "kubeconfig": kubeconfig },
        "miss_hold_ms": 1000
    });
    let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&cfg, 0, 0)?))?;
    let gw = envoy.listener;
    make_pool(&s.kc, "warm", 25).await?;
    let rw = ReadyWatch::start(&s.kc);

    // Writes per warm claim.
    let res = ["secrets", "pods", "sandboxes"];
    let before: Vec<_> = res.iter().map(|r| s.api.write_counts_for(r)).collect();
    claim_to_200(&s.kc, &rw, gw, "writes-0").await?;
    let after: Vec<_> = res.iter().map(|r| s.api.write_counts_for(r)).collect();
    let d = |i: usize| after[i].total() - before[i].total();
    let sbx_created = after[2].creates - before[2].creates;

    let mut seq = Vec::new();
    for i in 0..args.sequential {
        seq.push(claim_to_200(&s.kc, &rw, gw, &format!("seq-{i}")).await? * 1000.0);
    }
    let mut par = Vec::new();
    for r in 0..args.parallel_rounds {
        // Let the pool refill between rounds (20 claims from 25 warm).
        make_pool_refilled(&s.kc, "warm", 25).await?;
        let all = join_all((0..20).map(|i| {
            let (kc, rw) = (s.kc.clone(), rw.clone());
            async move { claim_to_200(&kc, &rw, gw, &format!("par-{r}-{i}")).await }
        }))
        .await;
        for t in all {
            par.push(t? * 1000.0);
        }
    }
    writeln!(out, "## Warm claim to first 200 through Envoy\n")?;
    writeln!(
        out,
        "| claims | n | p50 ms | p99 ms | max ms |\n|---|--:|--:|--:|--:|"
    )?;
    let n = seq.len();
    writeln!(
        out,
        "| one at a time | {n} | {:.1} | {:.1} | {:.1} |",
        pct(&mut seq, 0.5),
        pct(&mut seq, 0.99),
        pct(&mut seq, 1.0)
    )?;
    let n = par.len();
    writeln!(
        out,
        "| 20 at once | {n} | {:.1} | {:.1} | {:.1} |\n",
        pct(&mut par, 0.5),
        pct(&mut par, 0.99),
        pct(&mut par, 1.0)
    )?;
    writeln!(out, "## API writes per warm claim\n")?;
    writeln!(
        out,
        "Secret {}, pod {} (the claim patch; the kubelet's status writes and the pool's refill are \
         counted apart below), Sandbox {} (create by the client {sbx_created}, then the \
         controller's finalizer and status).\n",
        d(0),
        pod_claim_patches(&before[1], &after[1]),
        d(2),
    )?;
    writeln!(
        out,
        "Pod writes in that window, all kinds: {} creates (refill), {} patches (claim + kubelet \
         status), {} deletes.\n",
        after[1].creates - before[1].creates,
        after[1].patches - before[1].patches,
        after[1].deletes - before[1].deletes
    )?;
    Ok(())
}

fn pod_claim_patches(
    b: &sandbox_gateway_apiserver::WriteCounts,
    a: &sandbox_gateway_apiserver::WriteCounts,
) -> String {
    // The kubelet patches each new (refill) pod's status twice; the rest is the claim.
    let refill = a.creates - b.creates;
    let patches = a.patches - b.patches;
    format!("{}", patches.saturating_sub(2 * refill))
}

async fn make_pool_refilled(kc: &kube::Client, name: &str, warm: i32) -> Result<()> {
    let api = Api::<SandboxPool>::namespaced(kc.clone(), NS);
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(api, name, move |p: Option<&SandboxPool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.replicas == warm)
        }),
    )
    .await
    .context("pool never refilled")??;
    Ok(())
}

async fn bench_burst(args: &Args, out: &mut String) -> Result<()> {
    let n = args.burst;
    let s = stack(2000.0, n).await?;
    make_pool(&s.kc, "burst", n).await?;
    let rw = ReadyWatch::start(&s.kc);
    let creates0 = s.api.write_counts_for("pods").creates;
    let (max, stop) = watch_unclaimed(&s.kc, "burst");
    let t0 = Instant::now();
    let all = join_all((0..n).map(|i| {
        let (kc, rw) = (s.kc.clone(), rw.clone());
        async move {
            claim(&kc, &rw, "burst", &format!("b-{i}"))
                .await
                .map(|(_, t)| t * 1000.0)
        }
    }))
    .await;
    let wall = t0.elapsed();
    let mut lat: Vec<f64> = all.into_iter().collect::<Result<_>>()?;
    make_pool_refilled(&s.kc, "burst", n as i32).await?;
    stop.store(true, Ordering::Relaxed);
    let creates = s.api.write_counts_for("pods").creates - creates0;
    writeln!(out, "## Burst: {n} claims at once from a pool of {n}\n")?;
    writeln!(
        out,
        "All Ready in {:.2} s; claim to Ready p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms. Pods \
         created for the refill: {creates} (want {n}); most unclaimed pods ever: {} (replicas \
         {n}).\n",
        wall.as_secs_f64(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0),
        max.load(Ordering::Relaxed)
    )?;
    Ok(())
}

async fn bench_sustained(args: &Args, out: &mut String) -> Result<()> {
    let replicas = 200usize;
    let s = stack(1000.0, 200).await?;
    make_pool(&s.kc, "steady", replicas).await?;
    let rw = ReadyWatch::start(&s.kc);
    let (max, stop) = watch_unclaimed(&s.kc, "steady");
    let creates0 = s.api.write_counts_for("pods").creates;
    let gap = Duration::from_secs_f64(60.0 / args.rate as f64);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let mut i = 0;
    let mut next = Instant::now();
    while Instant::now() < end {
        let (kc, rw) = (s.kc.clone(), rw.clone());
        let name = format!("s-{i}");
        tasks.push(tokio::spawn(async move {
            let r = claim(&kc, &rw, "steady", &name).await;
            let _ = Api::<Sandbox>::namespaced(kc, NS)
                .delete(&name, &DeleteParams::default())
                .await;
            r.map(|(_, t)| t * 1000.0)
        }));
        i += 1;
        next += gap;
        tokio::time::sleep_until(next.into()).await;
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(ms) => lat.push(ms),
            Err(_) => failed += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let creates = s.api.write_counts_for("pods").creates - creates0;
    writeln!(
        out,
        "## Sustained: {} claims per minute for {} s, pool of {replicas} with refill\n",
        args.rate, args.seconds
    )?;
    writeln!(
        out,
        "{i} claims, {failed} failed; claim to Ready p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms. \
         Pods created: {creates}; most unclaimed pods ever: {} (replicas {replicas}).\n",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0),
        max.load(Ordering::Relaxed)
    )?;
    Ok(())
}

async fn bench_idle(args: &Args, out: &mut String) -> Result<()> {
    use proto::v1::activity_service_client::ActivityServiceClient;
    use proto::v1::{GetLastActiveRequest, ReportRequest, SandboxActivity};
    writeln!(out, "## Idle pass work, 3 sandbox-extproc replicas\n")?;
    writeln!(
        out,
        "| sandboxes | 3× GetLastActive ms | merge ms | rule ms | total ms | RSS growth MiB |\n\
         |--:|--:|--:|--:|--:|--:|"
    )?;
    let token = "bench-token";
    for &n in &args.idle_sizes {
        let dir = tempfile::tempdir()?;
        let routes = dir.path().join("routes.json");
        std::fs::write(&routes, r#"{"sandboxes": []}"#)?;
        let reps: Vec<ExtProc> = (0..3)
            .map(|_| {
                ExtProc::start_with_args_and_token(
                    &json!({ "route_source": file_source(&routes) }),
                    &["--max-sandboxes", "1000000"],
                    token,
                )
            })
            .collect::<Result<_>>()?;
        let now = sandbox_controller::context::now_ms();
        let ids: Vec<String> = (0..n).map(|i| format!("sbx{i:07}")).collect();
        for r in &reps {
            let mut c = ActivityServiceClient::connect(r.activity_endpoint()).await?;
            let batches: Vec<ReportRequest> = ids
                .chunks(10_000)
                .map(|chunk| ReportRequest {
                    reporter: "bench".into(),
                    full_snapshot: false,
                    entries: chunk
                        .iter()
                        .map(|id| SandboxActivity {
                            sandbox_id: id.clone(),
                            last_active_ms: now - 1000,
                        })
                        .collect(),
                })
                .collect();
            let mut req = tonic::Request::new(futures_util::stream::iter(batches));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            c.report(req).await?;
        }
        let rss0 = procfs::rss_kib(std::process::id())?;
        let t0 = Instant::now();
        let replies = join_all(reps.iter().map(|r| async move {
            let mut c = ActivityServiceClient::connect(r.activity_endpoint())
                .await?
                .max_decoding_message_size(256 << 20);
            let mut req = tonic::Request::new(GetLastActiveRequest {
                sandbox_ids: vec![],
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let a = c.get_last_active(req).await?.into_inner();
            Ok::<_, anyhow::Error>((
                r.activity_endpoint(),
                Reply::Answered(Answer {
                    replica: a.replica,
                    collecting_since_ms: a.collecting_since_ms,
                    evicted_total: a.evicted_total,
                    last_active: a
                        .entries
                        .into_iter()
                        .map(|e| (e.sandbox_id, e.last_active_ms))
                        .collect::<HashMap<_, _>>(),
                }),
            ))
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        let t_rpc = t0.elapsed();
        let t1 = Instant::now();
        let sight = merge(&replies, &mut HashMap::new()).map_err(|b| anyhow::anyhow!("{b:?}"))?;
        let t_merge = t1.elapsed();
        ensure!(
            sight.last_active.len() == n,
            "merged {}",
            sight.last_active.len()
        );
        let t2 = Instant::now();
        let clock = Clock {
            claimed_ms: now - 3_600_000,
            ready_ms: Some(now - 3_600_000),
            stored_last_active_ms: None,
            idle_timeout_ms: Some(600_000),
            max_lifetime_ms: None,
        };
        let kept = ids
            .iter()
            .filter(|id| matches!(judge(&clock, id, Some(&sight), now), Verdict::Keep { .. }))
            .count();
        let t_rule = t2.elapsed();
        ensure!(kept == n, "every reported sandbox is active");
        let rss1 = procfs::rss_kib(std::process::id())?;
        writeln!(
            out,
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
            t_rpc.as_secs_f64() * 1000.0,
            t_merge.as_secs_f64() * 1000.0,
            t_rule.as_secs_f64() * 1000.0,
            t0.elapsed().as_secs_f64() * 1000.0,
            rss1.saturating_sub(rss0) as f64 / 1024.0
        )?;
        drop(replies);
    }
    writeln!(out)?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .try_init();
    let mut out = String::from("# Controller benchmark\n\n");
    writeln!(
        out,
        "`make bench-controller` on {} ({} CPUs); in-process API server, test kubelet (Ready \
         20 ms after seen), release builds.\n",
        procfs::cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    bench_envoy(&args, &mut out).await?;
    eprintln!("{out}");
    bench_burst(&args, &mut out).await?;
    eprintln!("burst done");
    bench_sustained(&args, &mut out).await?;
    eprintln!("sustained done");
    bench_idle(&args, &mut out).await?;
    println!("{out}");
    let path = repo_root().join("benches/results/controller.md");
    std::fs::write(&path, &out)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
