//! The controller under test: the in-process API server, the test kubelet and the controller's
//! own `run` on one tokio runtime, with helpers to make pools and sandboxes and to wait for
//! states through watches. Waits have generous bounds so a broken controller fails the test
//! instead of hanging it; they are not timing targets.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Client, ResourceExt};
use sandbox_controller::context::Config;
use sandbox_controller::crd::{Phase, Sandbox, SandboxPool, SandboxSpec, POOL_LABEL};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

pub const NS: &str = "default";
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Stack {
    pub api: FakeApiServer,
    pub client: Client,
    pub kubelet: TestKubelet,
    pub metrics: Arc<Metrics>,
    controller: Option<JoinHandle<()>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts the API server, the kubelet and one controller that always leads.
pub async fn stack(cfg: Config) -> Stack {
    stack_with(cfg, KubeletOptions::default()).await
}

pub async fn stack_with(cfg: Config, kubelet: KubeletOptions) -> Stack {
    init_tracing();
    let api = FakeApiServer::start().await.expect("api server");
    let client = api.client().expect("client");
    let kubelet = TestKubelet::start(client.clone(), kubelet);
    let metrics = Metrics::new().expect("metrics");
    let controller = spawn_controller(client.clone(), cfg, metrics.clone(), Leadership::always());
    Stack {
        api,
        client,
        kubelet,
        metrics,
        controller: Some(controller),
    }
}

pub fn spawn_controller(
    client: Client,
    cfg: Config,
    metrics: Arc<Metrics>,
    leader: Leadership,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = sandbox_controller::run::run(client, cfg, metrics, Arc::new(leader)).await {
            tracing::error!(error = %e, "controller stopped");
        }
    })
}

pub fn template() -> Value {
    json!({
        "metadata": { "labels": { "app": "sandbox" } },
        "spec": { "containers": [{ "name": "sandbox", "image": "example/sandbox:1" }] }
    })
}

/// Creates a pool; `extra` is merged into its spec.
pub async fn make_pool(client: &Client, name: &str, replicas: i32, extra: Value) -> SandboxPool {
    let mut spec = json!({ "template": template(), "replicas": replicas });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1",
        "kind": "SandboxPool",
        "metadata": { "name": name, "namespace": NS },
        "spec": spec,
    }))
    .expect("pool");
    Api::<SandboxPool>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &pool)
        .await
        .expect("create pool")
}

/// Creates a Sandbox named `name` from `pool`.
pub async fn make_sandbox(client: &Client, name: &str, pool: &str, extra: Value) -> Sandbox {
    let mut spec = serde_json::to_value(SandboxSpec {
        pool_ref: pool.into(),
        idle_timeout: None,
        max_lifetime: None,
        port: None,
        require_token: None,
        idle_policy: None,
        paused: None,
    })
    .expect("spec");
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": { "name": name, "namespace": NS },
        "spec": spec,
    }))
    .expect("sandbox");
    Api::<Sandbox>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &sbx)
        .await
        .expect("create sandbox")
}

/// Waits until the pool's status shows `warm` warm pods.
pub async fn wait_warm(client: &Client, pool: &str, warm: i32) -> SandboxPool {
    let api = Api::<SandboxPool>::namespaced(client.clone(), NS);
    let cond = move |p: Option<&SandboxPool>| {
        p.and_then(|p| p.status.as_ref())
            .is_some_and(|s| s.replicas == warm)
    };
    tokio::time::timeout(WAIT, await_condition(api, pool, cond))
        .await
        .unwrap_or_else(|_| panic!("pool {pool} never had {warm} warm pods"))
        .expect("watch")
        .expect("pool exists")
}

/// Waits until the pool's status shows `warm` warm and `claimed` claimed pods.
pub async fn wait_counts(client: &Client, pool: &str, warm: i32, claimed: i32) -> SandboxPool {
    let api = Api::<SandboxPool>::namespaced(client.clone(), NS);
    let cond = move |p: Option<&SandboxPool>| {
        p.and_then(|p| p.status.as_ref())
            .is_some_and(|s| s.replicas == warm && s.claimed == claimed)
    };
    tokio::time::timeout(WAIT, await_condition(api, pool, cond))
        .await
        .unwrap_or_else(|_| panic!("pool {pool} never had {warm} warm and {claimed} claimed"))
        .expect("watch")
        .expect("pool exists")
}

/// Waits until the sandbox reaches `phase`.
pub async fn wait_phase(client: &Client, name: &str, phase: Phase) -> Sandbox {
    let api = Api::<Sandbox>::namespaced(client.clone(), NS);
    let cond = move |s: Option<&Sandbox>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == phase)
    };
    tokio::time::timeout(WAIT, await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("sandbox {name} never reached {phase:?}"))
        .expect("watch")
        .expect("sandbox exists")
}

/// Waits until the object is gone.
pub async fn wait_gone<K>(api: Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::time::timeout(
        WAIT,
        await_condition(api, name, |o: Option<&K>| o.is_none()),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} was never deleted"))
    .expect("watch");
}

/// Every pod of a pool, from the API server.
pub async fn pool_pods(client: &Client, pool: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}={pool}")))
        .await
        .expect("list")
        .items
}

/// The token in a sandbox's Secret.
pub async fn token_of(client: &Client, sbx: &Sandbox) -> String {
    let name = sbx
        .status
        .as_ref()
        .and_then(|s| s.token_secret.clone())
        .expect("token secret in status");
    let s = Api::<Secret>::namespaced(client.clone(), NS)
        .get(&name)
        .await
        .expect("secret");
    String::from_utf8(s.data.expect("data")["token"].0.clone()).expect("utf8")
}

pub fn pod_name(s: &Sandbox) -> String {
    s.status
        .as_ref()
        .and_then(|s| s.pod_name.clone())
        .unwrap_or_else(|| panic!("{} has no pod", s.name_any()))
}

/// A plain HTTP/1.1 GET to `ip:port/path` (a real socket to the pod's sandbox server).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
