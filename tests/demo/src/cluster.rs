//! `sandbox-demo --mode cluster`: the whole control plane on one machine. The in-process API
//! server (kubectl talks to it), the test kubelet (pods on loopback IPs 127.x.y.z with real
//! sandbox servers on port 8080), sandbox-extproc as the ActivityService, Envoy with the module in
//! Kubernetes mode on 127.0.0.1:10000 reporting activity to it, and the controller. A scripted
//! lifecycle runs against them: a pool fills, a sandbox is claimed and reached through Envoy with
//! its token, goes silent, is released for idleness, and the pool refills; then a sandbox with
//! `idlePolicy: Pause` and a per-sandbox volume goes silent, is paused (its pod deleted), and a
//! request with its token wakes it, reading back a file written before. Every step is verified;
//! a watch on pools and sandboxes prints each change as it happens, during the script and after
//! it (while the demo keeps running for kubectl and `sandbox-controller claim`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::wait::await_condition;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use sandbox_controller::context::{Config, Replicas};
use sandbox_controller::crd::{Phase, ReleaseReason, Sandbox, SandboxPool};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{repo_root, Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_harness::gateway::bootstrap;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::{wait_for_signal, HOST_DOMAIN, PATH_PREFIX};

const NS: &str = "default";
const POOL: &str = "demo";
const WARM: i32 = 3;
const IDLE_TIMEOUT: &str = "5s";
const IDLE_INTERVAL: Duration = Duration::from_millis(500);
/// The ActivityService bearer token shared by Envoy's reports, sandbox-extproc and the controller.
const ACTIVITY_TOKEN: &str = "demo-activity-token";
/// Every wait of the script is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// The gateway URL of a sandbox (`status.url`): Host routing `<port>-<id>.<domain>`, which the
/// module's `host_domains` below accepts.
const URL_TEMPLATE: &str = "http://{port}-{id}.sandbox.localhost:10000";

/// The pool of the pause-and-wake part: each sandbox gets a volume, idleness pauses it.
const NOTES_POOL: &str = "notes";

/// The module config of cluster mode: routes from the API server's pods, activity reported to
/// sandbox-extproc's ActivityService, which the controller's idle pass asks, and wakes asked of
/// the controller's WakeService (the same token).
fn gateway_config(
    kubeconfig: &Path,
    activity_endpoint: &str,
    token_file: &Path,
    wake_endpoint: &str,
) -> Value {
    json!({
        "route_source": {"type": "kubernetes", "kubeconfig": kubeconfig},
        "host_domains": [HOST_DOMAIN],
        "path_prefix": PATH_PREFIX,
        "miss_hold_ms": 200,
        "activity_report": {
            "endpoint": activity_endpoint, "interval_ms": 200, "token_file": token_file
        },
        "wake": { "endpoint": wake_endpoint, "token_file": token_file, "timeout_ms": 30000 }
    })
}

/// Everything cluster mode runs; dropped in reverse order of start.
struct Stack {
    api: FakeApiServer,
    client: kube::Client,
    kubeconfig: PathBuf,
    kubelet: TestKubelet,
    extproc: ExtProc,
    envoy: Envoy,
    controller: JoinHandle<()>,
    narrator: JoinHandle<()>,
}

pub async fn run(check_only: bool) -> Result<ExitCode> {
    let t0 = Instant::now();
    let stack = start(t0).await?;
    let result = lifecycle(&stack, t0).await;
    let code = match &result {
        Ok(()) => {
            println!(
                "\nAll cluster checks passed ({:.1} s).",
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nFAILED: {e:#}");
            ExitCode::FAILURE
        }
    };
    if !check_only && result.is_ok() {
        try_these(&stack);
        wait_for_signal().await?;
    }
    stop(stack).await;
    Ok(code)
}

async fn start(t0: Instant) -> Result<Stack> {
    let dir = repo_root().join(".demo");
    std::fs::create_dir_all(&dir)?;
    let api = FakeApiServer::start().await?;
    let client = api.client()?;
    let kubeconfig = dir.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    // Each PVC is a directory here (the volumes outlive their pods, as PVCs do).
    let volumes = dir.join("volumes");
    let _ = std::fs::remove_dir_all(&volumes);
    let kubelet = TestKubelet::start(
        client.clone(),
        KubeletOptions {
            volume_root: Some(volumes),
            ..KubeletOptions::default()
        },
    );

    // sandbox-extproc only as the ActivityService replica (its ext_proc side is unused, with an
    // empty routes file): Envoy's module reports activity to it, the controller asks it.
    let routes = dir.join("cluster-activity-routes.json");
    std::fs::write(&routes, r#"{"sandboxes": []}"#)?;
    let cfg = json!({ "route_source": file_source(&routes) });
    let extproc =
        tokio::task::spawn_blocking(move || ExtProc::start_with_token(&cfg, ACTIVITY_TOKEN))
            .await?
            .context("starting sandbox-extproc (the ActivityService)")?;
    let token_file = dir.join("activity-token");
    std::fs::write(&token_file, ACTIVITY_TOKEN)?;

    let wake_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    wake_listener.set_nonblocking(true)?;
    let wake_endpoint = format!("http://{}", wake_listener.local_addr()?);
    let gw_cfg = gateway_config(
        &kubeconfig,
        &extproc.activity_endpoint(),
        &token_file,
        &wake_endpoint,
    );
    let boot = bootstrap(&gw_cfg, 9901, 10000)?;
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(EnvoyOptions::sandboxes(boot)))
        .await?
        .context("starting Envoy")?;

    let cfg = Config {
        replicas: Some(Replicas::Static(vec![extproc.activity_endpoint()])),
        activity_token: Some(ACTIVITY_TOKEN.into()),
        idle_interval: IDLE_INTERVAL,
        query_timeout: Duration::from_secs(2),
        url_template: Some(URL_TEMPLATE.into()),
        wake: Some(sandbox_controller::context::WakeEndpoint::new(
            wake_listener,
            routing::bearer::BearerToken::new(ACTIVITY_TOKEN),
        )),
        ..Config::default()
    };
    let (c, metrics) = (client.clone(), Metrics::new()?);
    let controller = tokio::spawn(async move {
        if let Err(e) =
            sandbox_controller::run::run(c, cfg, metrics, Arc::new(Leadership::always())).await
        {
            println!("controller stopped: {e:#}");
        }
    });

    println!("sandbox-gateway demo (cluster mode: the whole control plane, locally)");
    println!(
        "  API server  {}   (in-process; kubectl works against it)",
        api.url()
    );
    println!("  kubeconfig  {}", kubeconfig.display());
    println!(
        "  gateway     http://{}  (Envoy admin http://{}; module in Kubernetes mode)",
        envoy.listener, envoy.admin
    );
    println!(
        "  activity    sandbox-extproc ActivityService {} (Envoy reports every 200 ms)",
        extproc.activity_endpoint()
    );
    println!(
        "  controller  in-process; idle pass every {} ms, URLs {URL_TEMPLATE}, WakeService {wake_endpoint}",
        IDLE_INTERVAL.as_millis()
    );
    println!("  kubelet     pods on loopback IPs 127.x.y.z:8080, each a real sandbox server");
    println!("  Envoy log   {}", envoy.log_path.display());
    println!("\nIn another terminal, while this runs:");
    println!("  kubectl --server {} get sbp,sbx", api.url());
    println!(
        "  kubectl --server {} scale sbp {POOL} --replicas=5",
        api.url()
    );
    println!(
        "\nEvery change to a pool or sandbox is printed as the watch sees it (`[  t] ...`).\n"
    );

    let narrator = tokio::spawn(narrate(client.clone(), t0));
    Ok(Stack {
        api,
        client,
        kubeconfig,
        kubelet,
        extproc,
        envoy,
        controller,
        narrator,
    })
}

async fn stop(stack: Stack) {
    stack.narrator.abort();
    stack.controller.abort();
    let _ = std::fs::copy(&stack.envoy.log_path, ".demo/envoy.log");
    let _ = std::fs::copy(stack.extproc.log_path(), ".demo/extproc.log");
    drop(stack.envoy);
    drop(stack.extproc);
    drop(stack.kubelet);
    stack.api.stop().await;
    println!(
        "Stopped Envoy, sandbox-extproc, the controller, the kubelet and the API server \
         (logs kept in .demo/envoy.log and .demo/extproc.log). Goodbye."
    );
}

fn step(title: &str) {
    println!("\n==> {title}");
}

/// The scripted lifecycle; the first failed check ends it with its message.
async fn lifecycle(s: &Stack, t0: Instant) -> Result<()> {
    let pools: Api<SandboxPool> = Api::namespaced(s.client.clone(), NS);
    let sandboxes: Api<Sandbox> = Api::namespaced(s.client.clone(), NS);
    let gw = s.envoy.listener;

    step(&format!(
        "create SandboxPool {POOL}: {WARM} warm sandboxes, idleTimeout {IDLE_TIMEOUT}"
    ));
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": POOL, "namespace": NS },
        "spec": {
            "replicas": WARM, "idleTimeout": IDLE_TIMEOUT,
            "template": { "spec": { "containers": [{ "name": "sandbox", "image": "example/sandbox:1" }] } }
        }
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    let started = Instant::now();
    warm(&pools, |st| st.replicas >= WARM)
        .await
        .context("the pool never filled")?;
    println!(
        "    ok  pool full: {WARM} warm in {} ms",
        started.elapsed().as_millis()
    );

    step("claim: create a Sandbox from the pool");
    let name = "demo-1";
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "poolRef": POOL }
    }))?;
    let claimed_at = Instant::now();
    sandboxes.create(&PostParams::default(), &sbx).await?;
    let sbx = wait_for(&sandboxes, name, "Ready or Failed", |s| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| matches!(st.phase, Phase::Ready | Phase::Failed))
    })
    .await?;
    let latency = claimed_at.elapsed();
    let st = sbx.status.clone().unwrap_or_default();
    if st.phase == Phase::Failed {
        let why: Vec<_> = st.conditions.iter().map(|c| c.message.clone()).collect();
        bail!("{name} failed: {}", why.join("; "));
    }
    let id = st
        .sandbox_id
        .clone()
        .context("Ready without status.sandboxId")?;
    let pod = st
        .pod_name
        .clone()
        .context("Ready without status.podName")?;
    let ip = st.pod_ip.clone().context("Ready without status.podIP")?;
    let secret = st
        .token_secret
        .clone()
        .context("Ready without status.tokenSecret")?;
    let url = st.url.clone().context("Ready without status.url")?;
    let token = token(&s.client, &secret).await?;
    println!(
        "    ok  {name} Ready in {:.1} ms (client-side: create -> Ready seen by the watch)",
        latency.as_secs_f64() * 1000.0
    );
    println!("        id      {id}");
    println!("        pod     {pod} ({ip}:8080)");
    println!("        secret  {secret} (token {token})");
    println!("        url     {url}");
    let p = warm(&pools, |st| st.replicas >= WARM && st.claimed == 1)
        .await
        .context("the pool did not refill after the claim")?;
    let warm_now = p.status.map_or(0, |st| st.replicas);
    println!(
        "    ok  pool refilled: warm {warm_now}/{WARM}, claimed 1 (a used pod never returns to it)"
    );

    step("a request through Envoy with the token");
    let host = host_of(&url)?;
    let curl = format!("curl -s -H 'x-access-token: {token}' {url}/hello");
    let r = client::get(
        gw,
        "/hello",
        &[("host", host.as_str()), ("x-access-token", token.as_str())],
    )
    .await?;
    // The last activity the gateway reports: the idle timeout counts from here.
    let last_request = Instant::now();
    ensure!(
        r.status == 200,
        "with the token: status {}: {}",
        r.status,
        r.text()
    );
    let j: Value = serde_json::from_slice(&r.body).context("the sandbox's echo is not JSON")?;
    ensure!(
        j["sandbox"] == pod.as_str(),
        "answered by {}, not {pod}",
        j["sandbox"]
    );
    ensure!(
        j["headers"].get("x-access-token").is_none(),
        "the token leaked upstream"
    );
    println!(
        "    ok  {} from pod {}",
        r.status,
        j["sandbox"].as_str().unwrap_or("?")
    );
    println!("        {curl}");

    step("the same request without the token");
    let r = client::get(gw, "/hello", &[("host", host.as_str())]).await?;
    ensure!(
        r.status == 401,
        "without the token: status {} (want 401): {}",
        r.status,
        r.text()
    );
    println!(
        "    ok  {} {}",
        r.status,
        serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|j| j["error"].as_str().map(str::to_string))
            .unwrap_or_default()
    );
    println!("        curl -si {url}/hello");

    kubectl(&s.api.url());

    step(&format!(
        "silence: no requests; idleTimeout {IDLE_TIMEOUT}, idle pass every {} ms",
        IDLE_INTERVAL.as_millis()
    ));
    let gone = wait_for(&sandboxes, name, "Released", |s| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Phase::Released)
    })
    .await?;
    let reason = gone.status.as_ref().and_then(|s| s.release_reason);
    ensure!(
        reason == Some(ReleaseReason::Idle),
        "released, but for {reason:?}, not Idle"
    );
    println!(
        "    ok  idle release: {name} Released (reason Idle) {:.1} s after its last request",
        last_request.elapsed().as_secs_f64()
    );
    // The pod (the route) is deleted before the status says Released; Envoy's watch of the pods
    // follows within moments. Envoy has no watch of its own to wait on: probe, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = client::get(
            gw,
            "/hello",
            &[("host", host.as_str()), ("x-access-token", token.as_str())],
        )
        .await?;
        if r.status == 404 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        r.status == 404,
        "after the release: status {} (want 404): {}",
        r.status,
        r.text()
    );
    println!("    ok  the same request with the token now gets 404 (no route)");
    println!("        {curl}");

    step(&format!(
        "the pool after the release: {WARM} warm, none claimed (the used pod is deleted)"
    ));
    let p = warm(&pools, |st| st.replicas >= WARM && st.claimed == 0)
        .await
        .context("the pool did not return to its warm size")?;
    let st = p.status.unwrap_or_default();
    println!(
        "    ok  warm {}/{WARM}, claimed {}   (release done at +{:.1} s)",
        st.replicas,
        st.claimed,
        t0.elapsed().as_secs_f64()
    );
    pause_and_wake(s).await?;
    println!(
        "\n    lifecycle done at +{:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Pause and wake: a sandbox of a pool with `idlePolicy: Pause` and a per-sandbox volume.
async fn pause_and_wake(s: &Stack) -> Result<()> {
    let pools: Api<SandboxPool> = Api::namespaced(s.client.clone(), NS);
    let sandboxes: Api<Sandbox> = Api::namespaced(s.client.clone(), NS);
    let gw = s.envoy.listener;
    step(&format!(
        "create SandboxPool {NOTES_POOL}: idlePolicy Pause, idleTimeout {IDLE_TIMEOUT}, a volume per sandbox"
    ));
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": NOTES_POOL, "namespace": NS },
        "spec": {
            "replicas": 0, "idleTimeout": IDLE_TIMEOUT, "idlePolicy": "Pause",
            "template": { "spec": { "containers": [{
                "name": "sandbox", "image": "example/sandbox:1",
                "volumeMounts": [{ "name": "work", "mountPath": "/work" }],
            }] } },
            "volumeClaimTemplates": [{
                "metadata": { "name": "work" },
                "spec": { "accessModes": ["ReadWriteOnce"],
                          "resources": { "requests": { "storage": "1Gi" } } },
            }],
        }
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    let name = "notes-1";
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": { "name": name, "namespace": NS }, "spec": { "poolRef": NOTES_POOL }
    }))?;
    sandboxes.create(&PostParams::default(), &sbx).await?;
    let ready = wait_for(&sandboxes, name, "Ready", |s| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Phase::Ready)
    })
    .await?;
    let st = ready.status.clone().unwrap_or_default();
    let id = st.sandbox_id.clone().context("no sandboxId")?;
    let old_pod = st.pod_name.clone().context("no pod")?;
    let token = token(&s.client, &st.token_secret.clone().context("no secret")?).await?;
    let auth = [
        ("x-sandbox-id", id.as_str()),
        ("x-access-token", token.as_str()),
    ];
    let body = "written before the pause";
    let put = format!(
        "PUT /files?path=/work/notes.txt HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\
         x-sandbox-id: {id}\r\nx-access-token: {token}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = client::send_raw(gw, put.as_bytes()).await?;
    ensure!(
        r.status == 201,
        "writing the file: {} {}",
        r.status,
        r.text()
    );
    println!("    ok  {name} Ready (id {id}, pod {old_pod}, PVC {name}-work); wrote /work/notes.txt through Envoy");

    step(&format!("silence: {name} is paused, not released"));
    let paused = wait_for(&sandboxes, name, "Paused", |s| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Phase::Paused)
    })
    .await?;
    ensure!(paused
        .status
        .as_ref()
        .and_then(|s| s.pod_name.as_ref())
        .is_none());
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), NS);
    wait_for_gone(&pods, &old_pod).await?;
    println!("    ok  Paused: pod {old_pod} deleted; ID, token and volume kept");
    // The gateway learns the marker from its watch: until then a request is a miss.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client::get(gw, "/", &[("x-sandbox-id", id.as_str())]).await?;
        if r.status == 401 {
            println!("    ok  without the token: 401, and nothing is woken");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the gateway never saw {id} paused: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    step("a request with the token wakes it (held at the gateway, then served)");
    let t = Instant::now();
    let r = client::get(gw, "/files?path=/work/notes.txt", &auth).await?;
    let waited = t.elapsed();
    ensure!(
        r.status == 200,
        "the woken request: {} {}",
        r.status,
        r.text()
    );
    ensure!(r.text() == body, "read back {:?}", r.text());
    let st = sandboxes.get(name).await?.status.unwrap_or_default();
    ensure!(
        st.sandbox_id.as_deref() == Some(id.as_str()),
        "a different ID after the wake"
    );
    let new_pod = st.pod_name.clone().unwrap_or_default();
    ensure!(new_pod != old_pod, "the old pod answered");
    println!(
        "    ok  200 in {:.0} ms from new pod {new_pod}, same ID {id}, same token; the file is still there",
        waited.as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn wait_for_gone(api: &Api<k8s_openapi::api::core::v1::Pod>, name: &str) -> Result<()> {
    tokio::time::timeout(
        WAIT,
        await_condition(
            api.clone(),
            name,
            |p: Option<&k8s_openapi::api::core::v1::Pod>| p.is_none(),
        ),
    )
    .await
    .with_context(|| format!("{name} was not deleted within {} s", WAIT.as_secs()))??;
    Ok(())
}

/// What a user can try while the demo keeps running.
fn try_these(s: &Stack) {
    let url = s.api.url();
    let kc = s.kubeconfig.display();
    let ctl = repo_root().join("target/release/sandbox-controller");
    let ctl = ctl
        .strip_prefix(repo_root())
        .map_or_else(|_| ctl.display().to_string(), |p| p.display().to_string());
    println!("\nThe stack keeps running. In another terminal (from the repo root):\n");
    println!("  kubectl --server {url} get sbp,sbx");
    println!("  kubectl --server {url} scale sbp {POOL} --replicas=5");
    println!("  KUBECONFIG={kc} {ctl} claim --pool {POOL} --wait --idle-timeout 2m");
    println!("      # then: curl -s -H 'x-access-token: <token>' <url>/hello");
    println!("  KUBECONFIG={kc} {ctl} release <id>");
    println!("\nChanges keep printing below. Ctrl-C to stop.");
}

/// `kubectl get sbp,sbx` against the API server, when kubectl is installed: what a user sees.
fn kubectl(url: &str) {
    let out = std::process::Command::new("kubectl")
        .args(["--server", url, "get", "sbp,sbx"])
        .output();
    let Ok(out) = out else { return };
    step(&format!("kubectl --server {url} get sbp,sbx"));
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("    {line}");
    }
}

/// `http://8080-<id>.sandbox.localhost:10000` → `8080-<id>.sandbox.localhost:10000`.
fn host_of(url: &str) -> Result<String> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or_default();
    ensure!(!rest.is_empty(), "no host in {url}");
    Ok(rest.to_string())
}

async fn token(client: &kube::Client, secret: &str) -> Result<String> {
    let s = Api::<Secret>::namespaced(client.clone(), NS)
        .get(secret)
        .await
        .with_context(|| format!("reading Secret {secret}"))?;
    let data = s.data.context("the token Secret has no data")?;
    let b = data
        .get("token")
        .context("the token Secret has no `token`")?;
    Ok(String::from_utf8(b.0.clone())?)
}

async fn wait_for<K, F>(api: &Api<K>, name: &str, what: &str, cond: F) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(Option<&K>) -> bool + Send + 'static,
{
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond))
        .await
        .with_context(|| format!("{name}: not {what} within {} s", WAIT.as_secs()))??
        .with_context(|| format!("{name} was deleted while waiting for {what}"))
}

async fn warm(
    pools: &Api<SandboxPool>,
    cond: fn(&sandbox_controller::crd::SandboxPoolStatus) -> bool,
) -> Result<SandboxPool> {
    wait_for(pools, POOL, "at its warm size", move |p| {
        p.and_then(|p| p.status.as_ref()).is_some_and(cond)
    })
    .await
}

/// Prints every change of a pool's counts or a sandbox's phase, as the watches see them.
async fn narrate(client: kube::Client, t0: Instant) {
    let pools = watcher(
        Api::<SandboxPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.ok().and_then(pool_line));
    let sandboxes = watcher(Api::<Sandbox>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|e| e.ok().and_then(sandbox_line));
    let mut lines = futures_util::stream::select(pools, sandboxes).boxed();
    // The last line printed per object: a status write that changes nothing shown stays quiet.
    let mut seen: HashMap<String, String> = HashMap::new();
    while let Some(next) = lines.next().await {
        let Some((key, line)) = next else { continue };
        if seen.get(&key) != Some(&line) {
            println!("  [{:>6.2}s] {line}", t0.elapsed().as_secs_f64());
            seen.insert(key, line);
        }
    }
}

/// A pool event as (object key, line to print).
fn pool_line(ev: Event<SandboxPool>) -> Option<(String, String)> {
    match ev {
        Event::Apply(p) | Event::InitApply(p) => {
            let st = p.status.clone().unwrap_or_default();
            Some((
                format!("sbp/{}", p.name_any()),
                format!(
                    "pool {:<10} warm {}/{}  starting {}  claimed {}",
                    p.name_any(),
                    st.replicas,
                    p.spec.replicas,
                    st.starting,
                    st.claimed
                ),
            ))
        }
        Event::Delete(p) => Some((
            format!("sbp/{}", p.name_any()),
            format!("pool {} deleted", p.name_any()),
        )),
        Event::Init | Event::InitDone => None,
    }
}

/// A sandbox event as (object key, line to print).
fn sandbox_line(ev: Event<Sandbox>) -> Option<(String, String)> {
    let s = match ev {
        Event::Apply(s) | Event::InitApply(s) => s,
        Event::Delete(s) => {
            return Some((
                format!("sbx/{}", s.name_any()),
                format!("sandbox {} deleted", s.name_any()),
            ))
        }
        Event::Init | Event::InitDone => return None,
    };
    let st = s.status.clone().unwrap_or_default();
    let mut line = format!("sandbox {:<10} {:?}", s.name_any(), st.phase);
    match st.phase {
        Phase::Ready => {
            line += &format!(
                "  id {}  pod {}  ip {}",
                st.sandbox_id.as_deref().unwrap_or("-"),
                st.pod_name.as_deref().unwrap_or("-"),
                st.pod_ip.as_deref().unwrap_or("-")
            )
        }
        Phase::Released | Phase::Releasing => {
            if let Some(r) = st.release_reason {
                line += &format!("  (reason {})", r.as_str());
            }
        }
        Phase::Failed => {
            for c in &st.conditions {
                line += &format!("  {}", c.message);
            }
        }
        Phase::Pausing | Phase::Paused => {
            if let Some(r) = st.pause_reason {
                line += &format!(
                    "  (reason {})  id {} kept",
                    r.as_str(),
                    st.sandbox_id.as_deref().unwrap_or("-")
                );
            }
        }
        Phase::Pending | Phase::Resuming => {}
    }
    Some((format!("sbx/{}", s.name_any()), line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_a_status_url() {
        let url = URL_TEMPLATE
            .replace("{port}", "8080")
            .replace("{id}", "abc123");
        assert_eq!(
            host_of(&url).unwrap(),
            "8080-abc123.sandbox.localhost:10000"
        );
        assert_eq!(host_of("http://h:1/x").unwrap(), "h:1");
    }

    /// The URL the controller writes routes by Host through the module's host domain.
    #[test]
    fn url_template_uses_the_gateways_host_domain() {
        assert!(URL_TEMPLATE.contains(&format!(".{HOST_DOMAIN}:10000")));
        let cfg = gateway_config(Path::new("k"), "http://a", Path::new("t"), "http://w:1");
        assert_eq!(cfg["host_domains"][0], HOST_DOMAIN);
        assert_eq!(cfg["route_source"]["type"], "kubernetes");
        assert_eq!(cfg["wake"]["endpoint"], "http://w:1");
    }
}
