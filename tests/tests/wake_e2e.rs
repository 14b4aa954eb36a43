//! Pause and wake through the real Envoy, end to end: the in-process API server, the test
//! kubelet (each PVC backed by a directory), the controller with its WakeService (bearer token)
//! and the gateway in module or ext_proc mode watching paused `Sandbox` markers.
//!
//! Idle → Paused (pod deleted) → a request with the token is held, the sandbox resumes with the
//! same ID and token, and a file written to its volume before the pause is read back; no token
//! → 401 and no wake; WebSocket and gRPC wake it; 100 concurrent requests → one wake; the
//! controller down → 503 `sandbox_waking` after the bound, then a wake once it is back; a pause
//! racing requests; a deleted paused sandbox → 404; `sandbox-controller pause/resume`.
//!
//! Tests other than the idle one pause a sandbox the way the idle pass does (the status write
//! `phase: Pausing, pauseReason: Idle`), so they do not depend on an idle timeout's timing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::ResourceExt;
use sandbox_controller::crd::{PauseReason, Phase, Sandbox, SandboxPool};
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{extproc_bootstrap, message_timeout, ExtProc};
use sandbox_gateway_harness::gateway::bootstrap;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const NS: &str = "default";
const ACTIVITY_TOKEN: &str = "wake-e2e-activity-token";
const WAKE_TOKEN: &str = "wake-e2e-wake-token-0123";
const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Module,
    ExtProc,
}

/// The controller: the real `sandbox-controller run` process (killing it is a crash: its
/// WakeService and every connection to it go with it).
struct Controller {
    child: std::process::Child,
    metrics: SocketAddr,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dropped in field order: the controller and the gateway first, the API server last (so
/// nothing logs a lost API server on the way down).
struct Stack {
    ctl: Option<Controller>,
    /// The gateway's Envoy (and, in ext_proc mode, its sandbox-extproc).
    envoy: Envoy,
    extproc: Option<ExtProc>,
    /// The activity replica the controller asks (in ext_proc mode: the gateway's own).
    activity: Option<ExtProc>,
    wake_addr: SocketAddr,
    /// The gateway config (module mode: a second Envoy can load the same).
    gw_cfg: Value,
    _kubelet: TestKubelet,
    kc: kube::Client,
    _api: FakeApiServer,
    dir: tempfile::TempDir,
    _volumes: tempfile::TempDir,
}

impl Stack {
    async fn start(mode: Mode, wake_timeout_ms: u64) -> Result<Stack> {
        Self::start_with(mode, wake_timeout_ms, 10_000).await
    }

    /// [`Stack::start`] with `wake.max_held` set.
    async fn start_with(mode: Mode, wake_timeout_ms: u64, max_held: u64) -> Result<Stack> {
        let api = FakeApiServer::start().await?;
        let kc = api.client()?;
        let volumes = tempfile::tempdir()?;
        let kubelet = TestKubelet::start(
            kc.clone(),
            KubeletOptions {
                volume_root: Some(volumes.path().to_path_buf()),
                ..KubeletOptions::default()
            },
        );
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.kubeconfig(&kubeconfig)?;
        let wake_token = dir.path().join("wake-token");
        std::fs::write(&wake_token, WAKE_TOKEN)?;
        let activity_token = dir.path().join("activity-token");
        std::fs::write(&activity_token, ACTIVITY_TOKEN)?;
        let wake_addr = sandbox_gateway_harness::loopback::child_addr()?;
        let mut cfg = json!({
            "route_source": { "type": "kubernetes", "kubeconfig": kubeconfig },
            "miss_hold_ms": 300,
            "wake": {
                "endpoint": format!("http://{wake_addr}"),
                "token_file": wake_token,
                "timeout_ms": wake_timeout_ms,
                "max_held": max_held,
            },
        });
        let (envoy, extproc, activity) = match mode {
            Mode::Module => {
                let routes = dir.path().join("activity-routes.json");
                std::fs::write(&routes, r#"{"sandboxes": []}"#)?;
                let activity = ExtProc::start_with_token(
                    &json!({ "route_source": sandbox_gateway_harness::extproc::file_source(&routes) }),
                    ACTIVITY_TOKEN,
                )?;
                cfg["activity_report"] = json!({
                    "endpoint": activity.activity_endpoint(), "interval_ms": 200,
                    "token_file": activity_token,
                });
                let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&cfg, 0, 0)?))?;
                (envoy, None, Some(activity))
            }
            Mode::ExtProc => {
                let e = ExtProc::start_with_token(&cfg, ACTIVITY_TOKEN)?;
                let envoy = Envoy::start(EnvoyOptions::sandboxes(extproc_bootstrap(
                    0,
                    0,
                    e.extproc,
                    message_timeout(&cfg),
                )?))?;
                (envoy, Some(e), None)
            }
        };
        let mut s = Stack {
            _api: api,
            kc,
            _kubelet: kubelet,
            envoy,
            extproc,
            activity,
            ctl: None,
            wake_addr,
            gw_cfg: cfg.clone(),
            dir,
            _volumes: volumes,
        };
        s.start_controller()?;
        Ok(s)
    }

    fn activity_endpoint(&self) -> String {
        self.activity
            .as_ref()
            .or(self.extproc.as_ref())
            .map(ExtProc::activity_endpoint)
            .unwrap_or_default()
    }

    /// Starts (or restarts) the controller, its WakeService on the same address.
    fn start_controller(&mut self) -> Result<()> {
        let metrics = sandbox_gateway_harness::loopback::child_addr()?;
        let d = self.dir.path();
        let child = std::process::Command::new(controller_bin()?)
            .args(["run", "--idle-interval", "300ms"])
            .arg("--metrics-bind-address")
            .arg(metrics.to_string())
            .arg("--wake-bind-address")
            .arg(self.wake_addr.to_string())
            .arg("--wake-token-file")
            .arg(d.join("wake-token"))
            .arg("--activity-endpoints")
            .arg(self.activity_endpoint())
            .arg("--activity-token-file")
            .arg(d.join("activity-token"))
            .env("KUBECONFIG", d.join("kubeconfig"))
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        self.ctl = Some(Controller { child, metrics });
        Ok(())
    }

    fn gw(&self) -> SocketAddr {
        self.envoy.listener
    }

    /// The controller's metrics text (empty while it is not up).
    async fn metrics_text(&self) -> String {
        let Some(c) = &self.ctl else {
            return String::new();
        };
        match client::get(c.metrics, "/metrics", &[]).await {
            Ok(r) => r.text(),
            Err(_) => String::new(),
        }
    }

    fn sandboxes(&self) -> Api<Sandbox> {
        Api::namespaced(self.kc.clone(), NS)
    }

    async fn pool(&self, name: &str, spec: Value) -> Result<()> {
        let mut full = json!({
            "replicas": 2,
            "template": { "spec": { "containers": [{ "name": "s", "image": "example/s:1" }] } },
        });
        if let (Some(f), Some(e)) = (full.as_object_mut(), spec.as_object()) {
            f.extend(e.clone());
        }
        let pool: SandboxPool = serde_json::from_value(json!({
            "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
            "metadata": { "name": name, "namespace": NS }, "spec": full,
        }))?;
        Api::<SandboxPool>::namespaced(self.kc.clone(), NS)
            .create(&PostParams::default(), &pool)
            .await?;
        Ok(())
    }

    /// Claims a sandbox; returns (ID, token, pod name).
    async fn claim(&self, name: &str, pool: &str) -> Result<(String, String, String)> {
        let sbx: Sandbox = serde_json::from_value(json!({
            "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
            "metadata": { "name": name, "namespace": NS }, "spec": { "poolRef": pool },
        }))?;
        self.sandboxes()
            .create(&PostParams::default(), &sbx)
            .await?;
        let sbx = self.phase(name, Phase::Ready).await?;
        let st = sbx.status.context("status")?;
        let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(self.kc.clone(), NS)
            .get(&st.token_secret.context("secret")?)
            .await?;
        let token = String::from_utf8(secret.data.context("data")?["token"].0.clone())?;
        Ok((
            st.sandbox_id.context("id")?,
            token,
            st.pod_name.context("pod")?,
        ))
    }

    async fn phase(&self, name: &str, want: Phase) -> Result<Sandbox> {
        let cond = move |s: Option<&Sandbox>| {
            s.and_then(|s| s.status.as_ref())
                .is_some_and(|st| st.phase == want)
        };
        tokio::time::timeout(WAIT, await_condition(self.sandboxes(), name, cond))
            .await
            .with_context(|| format!("{name} never {want:?}"))??
            .with_context(|| format!("{name} is gone"))
    }

    /// Pauses `name` as the idle pass does (the same status write), and waits for Paused.
    async fn pause_now(&self, name: &str) -> Result<Sandbox> {
        let patch = json!({ "status": { "phase": "Pausing", "pauseReason": "Idle" } });
        self.sandboxes()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.phase(name, Phase::Paused).await
    }

    /// Waits until the gateway knows `id` is paused: its pod is gone, the gateway's table has
    /// dropped its route (the readiness probe counts `routes_left` routes: the other running
    /// sandboxes), and a request without its token is refused with 401 (by the marker: there is
    /// no route left to refuse it).
    async fn wait_paused_at_gateway(&self, id: &str, pod: &str, routes_left: u64) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.kc.clone(), NS);
        tokio::time::timeout(
            WAIT,
            await_condition(pods, pod, |p: Option<&Pod>| p.is_none()),
        )
        .await??;
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = client::get(self.gw(), "/.well-known/sandbox-gateway/ready", &[]).await?;
            let r = client::get(self.gw(), "/", &[("x-sandbox-id", id)]).await?;
            if ready.json()["routes"] == routes_left && r.status == 401 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the gateway never saw {id} paused: {} {}",
                ready.text(),
                r.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `sandboxgateway_wakes_total{result}` of the running controller.
    async fn wakes(&self, result: &str) -> u64 {
        let want = format!("sandboxgateway_wakes_total{{result=\"{result}\"}} ");
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn auth<'a>(id: &'a str, token: &'a str) -> [(&'static str, &'a str); 2] {
    [("x-sandbox-id", id), ("x-access-token", token)]
}

/// A raw HTTP/1.1 request with a body through the gateway.
async fn send(
    gw: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<client::Response> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    client::send_raw(gw, raw.as_bytes()).await
}

async fn idle_pause_then_a_request_wakes_it(mode: Mode) -> Result<()> {
    let s = Stack::start(mode, 20_000).await?;
    // A pool with per-sandbox volumes: each pod is built for its sandbox, with its volume.
    s.pool(
        "vol",
        json!({
            "replicas": 0, "idleTimeout": "2s", "idlePolicy": "Pause",
            "template": { "spec": { "containers": [{
                "name": "s", "image": "example/s:1",
                "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            }] } },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"],
                          "resources": { "requests": { "storage": "1Gi" } } },
            }],
        }),
    )
    .await?;
    let (id, token, old_pod) = s.claim("notes", "vol").await?;
    let a = auth(&id, &token);
    let put = send(
        s.gw(),
        "PUT",
        "/files?path=/data/notes.txt",
        &a,
        "written before the pause",
    )
    .await?;
    ensure!(
        put.status == 201,
        "write through the gateway: {} {}",
        put.status,
        put.text()
    );
    let r = client::get(s.gw(), "/hello", &a).await?;
    ensure!(r.status == 200 && r.json()["sandbox"] == old_pod.as_str());

    // Silence: paused (not released), the pod deleted, the route gone.
    let paused = s.phase("notes", Phase::Paused).await?;
    let st = paused.status.clone().context("status")?;
    ensure!(st.pause_reason == Some(PauseReason::Idle) && st.pod_name.is_none());
    s.wait_paused_at_gateway(&id, &old_pod, 0).await?;
    if mode == Mode::Module {
        // The module's gauge (published once a second) counts the marker it holds.
        s.envoy
            .wait_stat("dynamicmodulescustom.paused_sandboxes", |v| v == 1)?;
    }
    // No token: 401, and nothing is woken.
    for _ in 0..5 {
        let r = client::get(s.gw(), "/", &[("x-sandbox-id", &id)]).await?;
        ensure!(r.status == 401, "no token: {} {}", r.status, r.text());
        let r = client::get(
            s.gw(),
            "/",
            &[("x-sandbox-id", &id), ("x-access-token", "wrong")],
        )
        .await?;
        ensure!(r.status == 401, "wrong token: {}", r.status);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        s.wakes("accepted").await == 0,
        "a request without the token woke it"
    );
    ensure!(
        s.sandboxes()
            .get("notes")
            .await?
            .status
            .context("status")?
            .phase
            == Phase::Paused
    );

    // With the token: held while it resumes, then served by the new pod, the file still there.
    let started = Instant::now();
    let r = client::get(s.gw(), "/files?path=/data/notes.txt", &a).await?;
    let waited = started.elapsed();
    ensure!(
        r.status == 200,
        "the held request: {} {}",
        r.status,
        r.text()
    );
    ensure!(
        r.text() == "written before the pause",
        "read back: {:?}",
        r.text()
    );
    let resumed = s.phase("notes", Phase::Ready).await?;
    let st = resumed.status.clone().context("status")?;
    ensure!(st.sandbox_id.as_deref() == Some(id.as_str()), "same ID");
    let new_pod = st.pod_name.clone().context("pod")?;
    ensure!(new_pod != old_pod);
    ensure!(
        s.wakes("accepted").await == 1,
        "accepted wakes: {}",
        s.wakes("accepted").await
    );
    // Same token: it still opens the sandbox, and nothing else does.
    let r = client::get(
        s.gw(),
        "/",
        &[("x-sandbox-id", &id), ("x-access-token", "wrong")],
    )
    .await?;
    ensure!(r.status == 401);
    // The old pod's address gets nothing after the resume: every answer is the new pod's.
    for _ in 0..20 {
        let r = client::get(s.gw(), "/hello", &a).await?;
        ensure!(
            r.status == 200 && r.json()["sandbox"] == new_pod.as_str(),
            "answered by {}",
            r.json()["sandbox"]
        );
    }
    eprintln!("{mode:?}: paused sandbox woke and answered in {waited:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pause_then_a_request_wakes_it_module() -> Result<()> {
    idle_pause_then_a_request_wakes_it(Mode::Module).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pause_then_a_request_wakes_it_extproc() -> Result<()> {
    idle_pause_then_a_request_wakes_it(Mode::ExtProc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_grpc_wake_a_paused_sandbox() -> Result<()> {
    let s = Stack::start(Mode::Module, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("ws", "warm").await?;
    s.pause_now("ws").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;

    let mut req = format!("ws://{}/socket", s.gw()).into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", id.parse()?);
    req.headers_mut().insert("x-access-token", token.parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await?;
    ensure!(resp.status() == 101);
    ws.send(Message::text("whoami")).await?;
    let m = ws.next().await.context("closed")??;
    let after_ws = s.phase("ws", Phase::Ready).await?;
    let pod2 = after_ws.status.and_then(|s| s.pod_name).context("pod")?;
    ensure!(m.to_text()?.contains(&pod2), "whoami after the wake: {m:?}");
    ws.close(None).await?;

    s.pause_now("ws").await?;
    s.wait_paused_at_gateway(&id, &pod2, 0).await?;
    let mut c =
        sandbox_gateway_harness::grpc::client_with_token(s.gw(), &id, "x-access-token", &token)
            .await?;
    let reply = c
        .unary(sandbox_gateway_harness::grpc::UnaryRequest {
            message: "hi".into(),
        })
        .await?
        .into_inner();
    let pod3 = s
        .phase("ws", Phase::Ready)
        .await?
        .status
        .and_then(|s| s.pod_name)
        .context("pod")?;
    ensure!(
        reply.message == "hi" && reply.sandbox == pod3,
        "gRPC after the wake: {reply:?}"
    );
    ensure!(s.wakes("accepted").await == 2);
    // A gRPC call without the token gets a gRPC status (and wakes nothing).
    s.pause_now("ws").await?;
    s.wait_paused_at_gateway(&id, &pod3, 0).await?;
    let mut c = sandbox_gateway_harness::grpc::client(s.gw(), &id).await?;
    let e = c
        .unary(sandbox_gateway_harness::grpc::UnaryRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == tonic::Code::Unauthenticated, "{e:?}");
    ensure!(s.wakes("accepted").await == 2);
    Ok(())
}

async fn a_hundred_requests_wake_it_once(mode: Mode) -> Result<()> {
    let s = Stack::start(mode, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("busy", "warm").await?;
    s.pause_now("busy").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    let gw = s.gw();
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (id, token) = (id.clone(), token.clone());
            tokio::spawn(async move { client::get(gw, "/hello", &auth(&id, &token)).await })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for c in calls {
        *statuses.entry(c.await??.status).or_insert(0) += 1;
    }
    ensure!(statuses.get(&200) == Some(&100), "statuses: {statuses:?}");
    ensure!(
        s.wakes("accepted").await == 1,
        "wakes accepted: {}",
        s.wakes("accepted").await
    );
    if mode == Mode::Module {
        // Published by the module once a second.
        let flights = s
            .envoy
            .wait_stat("dynamicmodulescustom.wake_flights", |v| v >= 1)?;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let flights = s
            .envoy
            .stat("dynamicmodulescustom.wake_flights")?
            .unwrap_or(flights);
        ensure!(flights == 1, "single flight: {flights} wakes started");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_requests_wake_it_once_module() -> Result<()> {
    a_hundred_requests_wake_it_once(Mode::Module).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_requests_wake_it_once_extproc() -> Result<()> {
    a_hundred_requests_wake_it_once(Mode::ExtProc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_down_means_sandbox_waking_then_a_wake_once_it_is_back() -> Result<()> {
    let mut s = Stack::start(Mode::Module, 1_500).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("late", "warm").await?;
    let (other, other_token, other_pod) = s.claim("other", "warm").await?;
    s.pause_now("late").await?;
    s.wait_paused_at_gateway(&id, &pod, 1).await?;
    s.ctl.take(); // the controller crashes
    let started = Instant::now();
    let r = client::get(s.gw(), "/", &auth(&id, &token)).await?;
    let held = started.elapsed();
    ensure!(
        r.status == 503 && r.json()["error"] == "sandbox_waking",
        "{} {}",
        r.status,
        r.text()
    );
    ensure!(r.header("retry-after").is_some(), "no Retry-After");
    ensure!(
        held >= Duration::from_millis(1_400),
        "answered after {held:?}, before the bound"
    );
    // gRPC clients get UNAVAILABLE with the same bound.
    let mut c =
        sandbox_gateway_harness::grpc::client_with_token(s.gw(), &id, "x-access-token", &token)
            .await?;
    let e = c
        .unary(sandbox_gateway_harness::grpc::UnaryRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == tonic::Code::Unavailable, "{e:?}");
    // Envoy is fine: the other sandbox is served, the readiness probe answers.
    let r = client::get(s.gw(), "/", &auth(&other, &other_token)).await?;
    ensure!(r.status == 200, "another sandbox: {}", r.status);
    let r = client::get(s.gw(), "/.well-known/sandbox-gateway/ready", &[]).await?;
    ensure!(r.status == 200);
    // Back: the next request wakes it.
    s.start_controller()?;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client::get(s.gw(), "/hello", &auth(&id, &token)).await?;
        if r.status == 200 {
            break;
        }
        ensure!(
            r.json()["error"] == "sandbox_waking",
            "{} {}",
            r.status,
            r.text()
        );
        if Instant::now() > deadline {
            let m = s.metrics_text().await;
            let m: Vec<&str> = m.lines().filter(|l| l.contains("wake")).collect();
            let m = m.join("\n");
            let log = s.envoy.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            anyhow::bail!(
                "never woke after the controller came back:\n{m}\n{}",
                tail.join("\n")
            );
        }
    }
    ensure!(
        s.phase("late", Phase::Ready)
            .await?
            .status
            .and_then(|s| s.sandbox_id)
            == Some(id)
    );
    // The restart released nothing: the other sandbox kept its pod and is still served (a
    // restarted controller once released sandboxes whose pool its cache had not listed yet).
    let st = s.sandboxes().get("other").await?.status.context("status")?;
    ensure!(
        st.phase == Phase::Ready && st.pod_name.as_deref() == Some(other_pod.as_str()),
        "the restart touched another sandbox: {:?} {:?}",
        st.phase,
        st.pod_name
    );
    let r = client::get(s.gw(), "/", &auth(&other, &other_token)).await?;
    ensure!(
        r.status == 200,
        "another sandbox after the restart: {}",
        r.status
    );
    Ok(())
}

/// Two gateways (two Envoys, each with its single flight) wake one sandbox at once: the
/// controller makes one `Paused → Resuming` write between them, and both are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_waking_at_once_resume_it_once() -> Result<()> {
    let s = Stack::start(Mode::Module, 20_000).await?;
    let second = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&s.gw_cfg, 0, 0)?))?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("shared", "warm").await?;
    s.pause_now("shared").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    let deadline = Instant::now() + WAIT;
    while client::get(second.listener, "/", &[("x-sandbox-id", &id)])
        .await?
        .status
        != 401
    {
        ensure!(
            Instant::now() < deadline,
            "the second gateway never saw it paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls: Vec<_> = [s.gw(), second.listener, s.gw(), second.listener]
        .into_iter()
        .map(|gw| {
            let (id, token) = (id.clone(), token.clone());
            tokio::spawn(async move { client::get(gw, "/hello", &auth(&id, &token)).await })
        })
        .collect();
    for c in calls {
        let r = c.await??;
        ensure!(r.status == 200, "{} {}", r.status, r.text());
    }
    let text = s.metrics_text().await;
    let resumed = text
        .lines()
        .find(|l| {
            l.starts_with("sandboxgateway_sandbox_phase_transitions_total")
                && l.contains("from_phase=\"Paused\"")
                && l.contains("to_phase=\"Resuming\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    ensure!(
        resumed == Some(1.0),
        "Paused → Resuming writes: {resumed:?}"
    );
    ensure!(s.wakes("accepted").await >= 2, "both gateways asked");
    Ok(())
}

/// Another object carrying a victim's paused marker (a tenant who may create Sandboxes labels
/// one with the victim's ID and a token of their own): its status does not vouch for the label
/// (only the controller writes status), so the gateway ignores it. The forger's token is refused
/// (401, nothing woken) and the victim's still wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_marker_neither_wakes_nor_locks_out_the_sandbox() -> Result<()> {
    let s = Stack::start(Mode::Module, 3_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("victim", "warm").await?;
    s.pause_now("victim").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    let forger_token = "the-forgers-own-token";
    let forged: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": {
            "name": "forger", "namespace": NS,
            "labels": { "sandboxgateway.io/paused": id },
            "annotations": {
                "sandboxgateway.io/access-token-sha256":
                    routing::contract::token_sha256_hex(forger_token.as_bytes()),
                "sandboxgateway.io/paused-by": "Spec",
            },
        },
        // No such pool: the controller leaves it Pending (PoolMissing) and never pauses it.
        "spec": { "poolRef": "nopool" },
    }))?;
    s.sandboxes()
        .create(&PostParams::default(), &forged)
        .await?;
    // Let the gateway's watch see it (and the controller's PoolMissing status write).
    s.phase("forger", Phase::Pending).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let r = client::get(s.gw(), "/", &auth(&id, forger_token)).await?;
        ensure!(r.status == 401, "the forger: {} {}", r.status, r.text());
    }
    ensure!(
        s.wakes("not_found").await == 0,
        "a forged wake reached the controller"
    );
    let st = s
        .sandboxes()
        .get("victim")
        .await?
        .status
        .context("status")?;
    ensure!(
        st.phase == Phase::Paused,
        "the forger woke the victim: {:?}",
        st.phase
    );
    // Not locked out (the forged marker says `Spec`, which would be a 409): the owner's token
    // opens the real marker and wakes it.
    let r = client::get(s.gw(), "/hello", &auth(&id, &token)).await?;
    ensure!(r.status == 200, "the owner: {} {}", r.status, r.text());
    Ok(())
}

/// A client that leaves while its request is held gives its place back at once: with
/// `max_held: 1`, the next client's request takes a free place instead of displacing the
/// abandoned one (which would otherwise be held until its bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_held_place() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut s = Stack::start_with(Mode::Module, 3_000, 1).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("left", "warm").await?;
    s.pause_now("left").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    s.ctl.take(); // nothing wakes it: requests stay held until their bound
    let mut gone = tokio::net::TcpStream::connect(s.gw()).await?;
    let req = format!(
        "GET / HTTP/1.1\r\nhost: gw\r\nx-sandbox-id: {id}\r\nx-access-token: {token}\r\n\r\n"
    );
    gone.write_all(req.as_bytes()).await?;
    s.envoy
        .wait_stat("dynamicmodulescustom.wake_holds", |v| v >= 1)?;
    drop(gone); // the client leaves while held
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client::get(s.gw(), "/", &auth(&id, &token)).await?;
    ensure!(
        r.json()["error"] == "sandbox_waking",
        "{} {}",
        r.status,
        r.text()
    );
    // Published once a second: give it two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let displaced = s
        .envoy
        .stat("dynamicmodulescustom.wake_holds_displaced")?
        .unwrap_or(0);
    ensure!(
        displaced == 0,
        "the abandoned hold kept its place: {displaced} displaced"
    );
    Ok(())
}

/// A wake the leader accepted (its `Resuming` write) and then died before finishing: the next
/// controller finishes the resume, and the request held meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_a_dead_leader_accepted_is_finished_by_the_next() -> Result<()> {
    let mut s = Stack::start(Mode::Module, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("orphan", "warm").await?;
    s.pause_now("orphan").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    s.ctl.take(); // the leader dies
                  // What its WakeService wrote before dying: the durable half of a wake.
    let patch = json!({ "status": { "phase": "Resuming" } });
    s.sandboxes()
        .patch_status("orphan", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let gw = s.gw();
    let held = {
        let (id, token) = (id.clone(), token.clone());
        tokio::spawn(async move { client::get(gw, "/hello", &auth(&id, &token)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.start_controller()?;
    let r = tokio::time::timeout(Duration::from_secs(20), held).await???;
    ensure!(
        r.status == 200,
        "the held request: {} {}",
        r.status,
        r.text()
    );
    let st = s
        .phase("orphan", Phase::Ready)
        .await?
        .status
        .context("status")?;
    ensure!(st.sandbox_id.as_deref() == Some(id.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_racing_requests_never_loses_the_sandbox() -> Result<()> {
    let s = Stack::start(Mode::Module, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("race", "warm").await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gw = s.gw();
    let load = {
        let (id, token, stop) = (id.clone(), token.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(u16, String, String)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client::get(gw, "/hello", &auth(&id, &token)).await?;
                let who = r.json()["sandbox"].as_str().unwrap_or("").to_string();
                let err = r.json()["error"].as_str().unwrap_or("").to_string();
                seen.push((r.status, who, err));
            }
            anyhow::Ok(seen)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.pause_now("race").await?;
    // Requests keep coming: each is served by the old pod, or held and served by the new one.
    let resumed = s.phase("race", Phase::Ready).await?;
    let new_pod = resumed.status.and_then(|s| s.pod_name).context("pod")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = load.await??;
    let mut after_new = false;
    for (status, who, err) in &seen {
        match (*status, err.as_str()) {
            (200, _) => {
                ensure!(who == &pod || who == &new_pod, "answered by {who}");
                // Once the new pod answered, the old one never does again.
                ensure!(
                    !(after_new && who == &pod),
                    "the old pod answered after the new one"
                );
                after_new |= who == &new_pod;
            }
            // A request forwarded to the old pod in the instant it was deleted fails like any
            // request to a deleted pod; it is never a 404 or a wrong sandbox.
            (503, "upstream_unavailable") => ensure!(!after_new, "upstream error after the resume"),
            other => anyhow::bail!("a request during the pause got {other:?}"),
        }
    }
    ensure!(after_new, "no request reached the resumed sandbox");
    ensure!(s.wakes("accepted").await >= 1);
    eprintln!("{} requests across the pause and wake", seen.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_deleted_while_a_request_waits_is_a_404() -> Result<()> {
    let mut s = Stack::start(Mode::Module, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("doomed", "warm").await?;
    s.pause_now("doomed").await?;
    s.wait_paused_at_gateway(&id, &pod, 0).await?;
    s.ctl.take(); // nobody resumes it, so the request stays held
    let gw = s.gw();
    let held = {
        let (id, token) = (id.clone(), token.clone());
        tokio::spawn(async move { client::get(gw, "/", &auth(&id, &token)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.sandboxes().delete("doomed", &Default::default()).await?;
    let r = tokio::time::timeout(Duration::from_secs(10), held).await???;
    ensure!(
        r.status == 404 && r.json()["error"] == "sandbox_not_found",
        "{} {}",
        r.status,
        r.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_pause_holds_it_and_cli_resume_brings_it_back() -> Result<()> {
    let s = Stack::start(Mode::Module, 20_000).await?;
    s.pool("warm", json!({})).await?;
    let (id, token, pod) = s.claim("manual", "warm").await?;
    let kubeconfig = s.dir.path().join("kubeconfig");
    let cli = |verb: &str| {
        let out = std::process::Command::new(controller_bin()?)
            .args([verb, &id, "--wait", "--timeout", "30s"])
            .env("KUBECONFIG", &kubeconfig)
            .output()?;
        ensure!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let out = tokio::task::block_in_place(|| cli("pause"))?;
    ensure!(out.contains("Paused"), "{out}");
    s.phase("manual", Phase::Paused).await?;
    let pods: Api<Pod> = Api::namespaced(s.kc.clone(), NS);
    tokio::time::timeout(
        WAIT,
        await_condition(pods, &pod, |p: Option<&Pod>| p.is_none()),
    )
    .await??;
    // Paused by its owner: a request with the token gets 409, and wakes nothing.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client::get(s.gw(), "/", &auth(&id, &token)).await?;
        if r.status == 409 {
            ensure!(r.json()["error"] == "sandbox_paused");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "never 409: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(s.wakes("accepted").await == 0);
    let out = tokio::task::block_in_place(|| cli("resume"))?;
    ensure!(out.contains("Ready"), "{out}");
    let r = client::get(s.gw(), "/hello", &auth(&id, &token)).await?;
    ensure!(r.status == 200, "after resume: {} {}", r.status, r.text());
    let sbx = s.sandboxes().get("manual").await?;
    ensure!(sbx.status.as_ref().and_then(|s| s.sandbox_id.as_deref()) == Some(id.as_str()));
    ensure!(!sbx
        .labels()
        .contains_key(sandbox_controller::crd::PAUSED_LABEL));
    Ok(())
}

/// The `sandbox-controller` binary (`make test` builds it; `SANDBOX_CONTROLLER_BIN` overrides).
fn controller_bin() -> Result<std::path::PathBuf> {
    let p = std::env::var_os("SANDBOX_CONTROLLER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            sandbox_gateway_harness::envoy::repo_root().join("target/debug/sandbox-controller")
        });
    ensure!(
        p.exists(),
        "sandbox-controller not found at {}: `cargo build -p sandbox-gateway-controller` (make test does)",
        p.display()
    );
    Ok(p)
}
