//! Wake to first byte: a timed run, not a test (tests/tests/wake_e2e.rs asserts what must
//! happen; this measures how long a client waits).
//!
//! `make bench-wake` (release builds), i.e.
//! `cargo bench -p sandbox-gateway-bench --bench wake [-- --sequential 30 --parallel-rounds 5]`.
//!
//! On the in-process API server (the real kube client over HTTP), the test kubelet (pods Ready
//! 20 ms after they are seen, a real sandbox server on each loopback IP), the controller with its
//! WakeService (bearer token), and the real Envoy with the module in Kubernetes mode and `wake`
//! configured. A sandbox is paused the way the idle pass pauses it (the status write
//! `Pausing/Idle`); once the pod is gone and the gateway refuses a request without the token
//! (it knows the marker), the clock starts: one GET with the token, held by the gateway while
//! the controller binds a warm pod, until its response (a few bytes: the first byte and the last
//! arrive together). One at a time, then 20 sandboxes at once. Two gateways watch the same
//! cluster, the module's Envoy and an Envoy with sandbox-extproc (`SANDBOX_EXTPROC_BIN`), and
//! every round wakes through each in turn, so the two are compared on the same machine state.
//!
//! Writes `benches/results/wake.md` (also printed).

#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use sandbox_controller::context::{Config, WakeEndpoint};
use sandbox_controller::crd::{Phase, Sandbox, SandboxPool};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_bench::pct;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{repo_root, Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{extproc_bootstrap, message_timeout, ExtProc};
use sandbox_gateway_harness::gateway::bootstrap;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::json;

const NS: &str = "default";
const WAKE_TOKEN: &str = "bench-wake-token-0123456789";
const WAIT: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    /// Wakes one at a time.
    #[arg(long, default_value_t = 30)]
    sequential: usize,
    /// Rounds of 20 sandboxes woken at once.
    #[arg(long, default_value_t = 5)]
    parallel_rounds: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Sbx {
    name: String,
    id: String,
    token: String,
}

struct Bench {
    kc: kube::Client,
    metrics: Arc<Metrics>,
}

type Gw = std::net::SocketAddr;

impl Bench {
    fn sandboxes(&self) -> Api<Sandbox> {
        Api::namespaced(self.kc.clone(), NS)
    }

    async fn phase(&self, name: &str, want: Phase) -> Result<Sandbox> {
        let cond = move |s: Option<&Sandbox>| {
            s.and_then(|s| s.status.as_ref())
                .is_some_and(|st| st.phase == want)
        };
        tokio::time::timeout(WAIT, await_condition(self.sandboxes(), name, cond))
            .await
            .with_context(|| format!("{name} never {want:?}"))??
            .context("gone")
    }

    async fn claim(&self, name: &str) -> Result<Sbx> {
        let sbx: Sandbox = serde_json::from_value(json!({
            "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
            "metadata": { "name": name, "namespace": NS }, "spec": { "poolRef": "warm" }
        }))?;
        self.sandboxes()
            .create(&PostParams::default(), &sbx)
            .await?;
        let st = self
            .phase(name, Phase::Ready)
            .await?
            .status
            .context("status")?;
        let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(self.kc.clone(), NS)
            .get(&st.token_secret.context("secret")?)
            .await?;
        Ok(Sbx {
            name: name.into(),
            id: st.sandbox_id.context("id")?,
            token: String::from_utf8(secret.data.context("data")?["token"].0.clone())?,
        })
    }

    /// Pauses as the idle pass does; returns once its pod is gone.
    async fn pause(&self, s: &Sbx) -> Result<()> {
        let pod = self
            .sandboxes()
            .get(&s.name)
            .await?
            .status
            .and_then(|st| st.pod_name)
            .context("pod")?;
        let patch = json!({ "status": { "phase": "Pausing", "pauseReason": "Idle" } });
        self.sandboxes()
            .patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.phase(&s.name, Phase::Paused).await?;
        let pods: Api<Pod> = Api::namespaced(self.kc.clone(), NS);
        tokio::time::timeout(
            WAIT,
            await_condition(pods, &pod, |p: Option<&Pod>| p.is_none()),
        )
        .await??;
        Ok(())
    }

    /// Waits until the gateway holds only `routes_left` routes (its readiness probe counts them:
    /// the sandboxes still running) and refuses a token-less request for each of `all` with 401:
    /// with their routes gone, that is the paused marker answering, so the next request with the
    /// token is a wake.
    async fn quiet(&self, gw: Gw, all: &[&Sbx], routes_left: u64) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = client::get(gw, "/.well-known/sandbox-gateway/ready", &[]).await?;
            let mut refused = 0;
            for s in all {
                let r = client::get(gw, "/", &[("x-sandbox-id", &s.id)]).await?;
                refused += usize::from(r.status == 401);
            }
            if ready.json()["routes"] == routes_left && refused == all.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                // What still carries a route label, as the API server has it.
                let pods: Api<Pod> = Api::namespaced(self.kc.clone(), NS);
                let lp =
                    kube::api::ListParams::default().labels(routing::contract::SANDBOX_ID_LABEL);
                let labelled: Vec<String> = pods
                    .list(&lp)
                    .await?
                    .items
                    .iter()
                    .map(|p| {
                        let id = p
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(routing::contract::SANDBOX_ID_LABEL));
                        format!(
                            "{} id={id:?} deleting={} phase={:?}",
                            p.metadata.name.as_deref().unwrap_or(""),
                            p.metadata.deletion_timestamp.is_some(),
                            p.status.as_ref().and_then(|s| s.phase.clone()),
                        )
                    })
                    .collect();
                let phases: Vec<String> = self
                    .sandboxes()
                    .list(&Default::default())
                    .await?
                    .items
                    .iter()
                    .map(|s| {
                        format!(
                            "{}={:?}",
                            s.metadata.name.as_deref().unwrap_or(""),
                            s.status.as_ref().map(|st| st.phase)
                        )
                    })
                    .collect();
                anyhow::bail!(
                    "never paused at the gateway: {} refused {refused}/{}; labelled pods \
                     {labelled:?}; sandboxes {phases:?}",
                    ready.text(),
                    all.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One request with the token to a paused sandbox: seconds to its response.
    async fn wake(&self, gw: Gw, s: &Sbx) -> Result<f64> {
        let t0 = Instant::now();
        let r = client::get(
            gw,
            "/",
            &[("x-sandbox-id", &s.id), ("x-access-token", &s.token)],
        )
        .await?;
        let dt = t0.elapsed().as_secs_f64();
        ensure!(r.status == 200, "woken request: {} {}", r.status, r.text());
        self.phase(&s.name, Phase::Ready).await?;
        Ok(dt)
    }
}

fn line(out: &mut String, what: &str, v: &mut [f64]) {
    let n = v.len();
    let (p50, p99, max) = (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
    let _ = writeln!(
        out,
        "| {what} | {n} | {:.1} | {:.1} | {:.1} |",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let api = FakeApiServer::start().await?;
    let kc = api.client()?;
    let _kubelet = TestKubelet::start(
        kc.clone(),
        KubeletOptions {
            ready_after: Duration::from_millis(20),
            ..KubeletOptions::default()
        },
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let token_file = dir.path().join("wake-token");
    std::fs::write(&token_file, WAKE_TOKEN)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let wake_addr = listener.local_addr()?;
    let cfg = Config {
        wake: Some(WakeEndpoint::new(
            listener,
            routing::bearer::BearerToken::new(WAKE_TOKEN),
        )),
        ..Config::default()
    };
    let metrics = Metrics::new()?;
    let (c, m) = (kc.clone(), metrics.clone());
    let _ctl = tokio::spawn(async move {
        let _ = sandbox_controller::run::run(c, cfg, m, Arc::new(Leadership::always())).await;
    });
    let gw_cfg = json!({
        "route_source": { "type": "kubernetes", "kubeconfig": kubeconfig },
        "miss_hold_ms": 300,
        "wake": { "endpoint": format!("http://{wake_addr}"), "token_file": token_file },
    });
    let module = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&gw_cfg, 0, 0)?))?;
    let extproc = ExtProc::start(&gw_cfg, &[])?;
    let via_extproc = Envoy::start(EnvoyOptions::sandboxes(extproc_bootstrap(
        0,
        0,
        extproc.extproc,
        message_timeout(&gw_cfg),
    )?))?;
    let gateways: [(&str, Gw); 2] = [
        ("module", module.listener),
        ("ext_proc", via_extproc.listener),
    ];
    let b = Bench {
        kc: kc.clone(),
        metrics,
    };
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": "warm", "namespace": NS },
        "spec": { "replicas": 25,
            "template": { "spec": { "containers": [{ "name": "s", "image": "example/s:1" }] } } }
    }))?;
    Api::<SandboxPool>::namespaced(kc.clone(), NS)
        .create(&PostParams::default(), &pool)
        .await?;
    let pools = Api::<SandboxPool>::namespaced(kc.clone(), NS);
    let full = || {
        await_condition(pools.clone(), "warm", |p: Option<&SandboxPool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.replicas == 25)
        })
    };
    tokio::time::timeout(WAIT, full()).await??;

    // One sandbox per gateway for the one-at-a-time runs; while one is paused the other runs,
    // so each gateway holds one route when quiet.
    let mut seq: [Vec<f64>; 2] = Default::default();
    let mut ones = Vec::new();
    for g in 0..gateways.len() {
        ones.push(b.claim(&format!("seq-{g}")).await?);
    }
    for _ in 0..args.sequential {
        for (g, (_, gw)) in gateways.iter().enumerate() {
            tokio::time::timeout(WAIT, full()).await??;
            b.pause(&ones[g]).await?;
            b.quiet(*gw, &[&ones[g]], 1).await?;
            seq[g].push(b.wake(*gw, &ones[g]).await?);
        }
    }
    let mut par: [Vec<f64>; 2] = Default::default();
    let many: Vec<Sbx> = join_all((0..20).map(|i| b.claim_named(i)))
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    for _ in 0..args.parallel_rounds {
        for (g, (_, gw)) in gateways.iter().enumerate() {
            tokio::time::timeout(WAIT, full()).await??;
            for r in join_all(many.iter().map(|s| b.pause(s))).await {
                r?;
            }
            // The two one-at-a-time sandboxes stay Ready: two routes left.
            b.quiet(*gw, &many.iter().collect::<Vec<_>>(), 2).await?;
            for r in join_all(many.iter().map(|s| b.wake(*gw, s))).await {
                par[g].push(r?);
            }
        }
    }
    let hist = b.metrics.wake_seconds.clone();
    let mut out = String::new();
    let _ = writeln!(out, "# Wake to first byte (`make bench-wake`)\n");
    let _ = writeln!(
        out,
        "In-process API server, test kubelet (pods Ready 20 ms after seen), controller with its \
         WakeService, two real Envoys watching the same cluster: one with the module, one with \
         sandbox-extproc (release builds), woken through in turn each round. Paused like the \
         idle pass pauses; the clock runs from the GET with the token to its response.\n"
    );
    let _ = writeln!(out, "| gateway | run | wakes | p50 ms | p99 ms | max ms |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (g, (name, _)) in gateways.iter().enumerate() {
        line(&mut out, &format!("{name} | one at a time"), &mut seq[g]);
        line(&mut out, &format!("{name} | 20 at once"), &mut par[g]);
    }
    let _ = writeln!(
        out,
        "\nController side (wake accepted → Ready, `sandboxgateway_wake_duration_seconds`): \
         {} wakes, mean {:.1} ms.",
        hist.get_sample_count(),
        hist.get_sample_sum() / hist.get_sample_count().max(1) as f64 * 1e3
    );
    print!("{out}");
    let path = repo_root().join("benches/results/wake.md");
    std::fs::write(&path, &out)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

impl Bench {
    async fn claim_named(&self, i: usize) -> Result<Sbx> {
        self.claim(&format!("par-{i}")).await
    }
}
