//! The whole stack, end to end: the in-process API server, the test kubelet (pods on loopback
//! IPs with real sandbox servers), the real Envoy with the module in Kubernetes mode reporting
//! activity, two sandbox-extproc replicas (ActivityService with a bearer token) and two
//! controllers electing a leader on a 2 s Lease.
//!
//! Pool of 3 → claim → Ready → HTTP and WebSocket through Envoy with the token → traffic (and a
//! silent open WebSocket) keeps it → silence → released, 404, pool back to 3 → the leader is
//! killed and the standby takes over → one replica unreachable: nothing is released.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use futures_util::{SinkExt, StreamExt};
use kube::api::{Api, PostParams};
use kube::runtime::wait::await_condition;
use sandbox_controller::context::{Config, Replicas};
use sandbox_controller::crd::{Phase, ReleaseReason, Sandbox, SandboxPool};
use sandbox_controller::leader::{self, Leadership, LeaseConfig};
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_harness::gateway::bootstrap;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const NS: &str = "default";
const TOKEN: &str = "e2e-controller-activity-token";
const WAIT: Duration = Duration::from_secs(30);

fn replica(dir: &tempfile::TempDir, name: &str) -> Result<ExtProc> {
    let routes = dir.path().join(format!("{name}-routes.json"));
    std::fs::write(&routes, r#"{"sandboxes": []}"#)?;
    ExtProc::start_with_token(&json!({ "route_source": file_source(&routes) }), TOKEN)
}

/// One controller replica: its elector and its controllers, aborted together (a killed pod).
struct Replica {
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
    tasks: Vec<JoinHandle<()>>,
}

impl Replica {
    fn start(client: kube::Client, identity: &str, cfg: Config) -> Result<Replica> {
        let leadership = Arc::new(Leadership::standby());
        let metrics = Metrics::new()?;
        let lease = LeaseConfig {
            namespace: NS.into(),
            name: "sandbox-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(2),
        };
        let l = leadership.clone();
        let c = client.clone();
        let elector = tokio::spawn(async move {
            let _ = leader::run(c, lease, &l).await;
        });
        let (l, m) = (leadership.clone(), metrics.clone());
        let ctl = tokio::spawn(async move {
            let _ = sandbox_controller::run::run(client, cfg, m, l).await;
        });
        Ok(Replica {
            leadership,
            metrics,
            tasks: vec![elector, ctl],
        })
    }

    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_for<K, F>(api: Api<K>, name: &str, what: &str, cond: F) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(Option<&K>) -> bool + Send + 'static,
{
    tokio::time::timeout(WAIT, await_condition(api, name, cond))
        .await
        .with_context(|| format!("{name}: {what}"))??
        .with_context(|| format!("{name} is gone"))
}

async fn phase(api: &Api<Sandbox>, name: &str, want: Phase) -> Result<Sandbox> {
    wait_for(api.clone(), name, &format!("never {want:?}"), move |s| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == want)
    })
    .await
}

async fn warm(api: &Api<SandboxPool>, name: &str, n: i32) -> Result<SandboxPool> {
    wait_for(api.clone(), name, "never full", move |p| {
        p.and_then(|p| p.status.as_ref())
            .is_some_and(|s| s.replicas == n)
    })
    .await
}

async fn claim(api: &Api<Sandbox>, name: &str) -> Result<(Sandbox, String, String)> {
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "poolRef": "e2e" }
    }))?;
    api.create(&PostParams::default(), &sbx).await?;
    let sbx = phase(api, name, Phase::Ready).await?;
    let st = sbx.status.clone().context("status")?;
    Ok((
        sbx,
        st.sandbox_id.context("id")?,
        st.token_secret.context("secret")?,
    ))
}

async fn token(client: &kube::Client, secret: &str) -> Result<String> {
    let s = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), NS)
        .get(secret)
        .await?;
    Ok(String::from_utf8(
        s.data.context("data")?["token"].0.clone(),
    )?)
}

fn leader_of(replicas: &[Replica]) -> Option<&Replica> {
    replicas.iter().find(|r| r.leadership.is_leader())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lifecycle_through_envoy_with_two_controllers_and_two_replicas() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let kc = api.client()?;
    let _kubelet = TestKubelet::start(kc.clone(), KubeletOptions::default());
    let dir = tempfile::tempdir()?;
    let (a, b) = (replica(&dir, "a")?, replica(&dir, "b")?);

    // The gateway: kube mode, reporting to replica `a` only.
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let token_file = dir.path().join("activity-token");
    std::fs::write(&token_file, TOKEN)?;
    let gw_cfg = json!({
        "route_source": { "type": "kubernetes", "kubeconfig": kubeconfig },
        "miss_hold_ms": 200,
        "activity_report": {
            "endpoint": a.activity_endpoint(), "interval_ms": 200, "token_file": token_file
        }
    });
    let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&gw_cfg, 0, 0)?))?;
    let gw = envoy.listener;

    let cfg = Config {
        replicas: Some(Replicas::Static(vec![
            a.activity_endpoint(),
            b.activity_endpoint(),
        ])),
        activity_token: Some(TOKEN.into()),
        idle_interval: Duration::from_millis(300),
        query_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let replicas = vec![
        Replica::start(kc.clone(), "ctl-0", cfg.clone())?,
        Replica::start(kc.clone(), "ctl-1", cfg.clone())?,
    ];

    let pools: Api<SandboxPool> = Api::namespaced(kc.clone(), NS);
    let sandboxes: Api<Sandbox> = Api::namespaced(kc.clone(), NS);
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": "e2e", "namespace": NS },
        "spec": {
            "replicas": 3, "idleTimeout": "4s",
            "template": { "spec": { "containers": [{ "name": "s", "image": "example/s:1" }] } }
        }
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    warm(&pools, "e2e", 3).await?;
    let leaders = replicas.iter().filter(|r| r.leadership.is_leader()).count();
    ensure!(leaders == 1, "{leaders} leaders");

    // Claim, then HTTP and WebSocket through Envoy with the token.
    let (sbx, id, secret) = claim(&sandboxes, "s1").await?;
    let tok = token(&kc, &secret).await?;
    let pod = sbx
        .status
        .as_ref()
        .and_then(|s| s.pod_name.clone())
        .context("pod")?;
    let auth = [
        ("x-sandbox-id", id.as_str()),
        ("x-access-token", tok.as_str()),
    ];
    let r = client::get(gw, "/hello", &auth).await?;
    ensure!(r.status == 200, "through Envoy: {} {}", r.status, r.text());
    ensure!(
        r.json()["sandbox"] == pod.as_str(),
        "reached {}",
        r.json()["sandbox"]
    );
    let r = client::get(gw, "/hello", &[("x-sandbox-id", id.as_str())]).await?;
    ensure!(r.status == 401, "no token: {}", r.status);
    let mut req = format!("ws://{gw}/socket").into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", id.parse()?);
    req.headers_mut().insert("x-access-token", tok.parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    ws.send(Message::text("whoami")).await?;
    let m = ws.next().await.context("closed")??;
    ensure!(m.to_text()?.contains(&pod), "whoami: {m:?}");

    // Traffic through the gateway (seen by replica `a` only) keeps it past its idle timeout,
    // and so does the open WebSocket while it stays silent.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        ensure!(client::get(gw, "/", &auth).await?.status == 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let st = sandboxes.get("s1").await?.status.context("status")?;
    ensure!(
        st.phase == Phase::Ready,
        "released while in use: {:?}",
        st.phase
    );
    ws.close(None).await?;
    drop(ws);

    // Silence: released for idleness, the route is gone, the pool refills.
    let gone = phase(&sandboxes, "s1", Phase::Released).await?;
    ensure!(gone.status.and_then(|s| s.release_reason) == Some(ReleaseReason::Idle));
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client::get(gw, "/", &auth).await?;
        if r.status == 404 {
            break;
        }
        ensure!(Instant::now() < deadline, "still routed: {}", r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    warm(&pools, "e2e", 3).await?;

    // The leader dies: the standby takes over and claims.
    let old = leader_of(&replicas).context("a leader")?;
    let killed_at = Instant::now();
    old.kill();
    let (_, id2, _) = claim(&sandboxes, "s2").await?;
    let takeover = killed_at.elapsed();
    let new = leader_of(&replicas).context("a new leader")?;
    ensure!(!std::ptr::eq(new, old));
    // s2 is Ready after the kill and the survivor leads. (Which replica's counter shows the
    // claim is not asserted: an aborted in-process replica's running reconciles are detached
    // tasks that may still finish. The SIGSTOP test in route-controller/tests/leader.rs runs
    // real processes and checks that only the standby's writes land.)
    eprintln!("standby took over and claimed {id2} {takeover:?} after the leader was killed");

    // One replica unreachable: nothing is released for idleness, however long it is silent.
    drop(b);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let st = sandboxes.get("s2").await?.status.context("status")?;
    ensure!(st.phase == Phase::Ready, "released with a replica missing");
    ensure!(new.metrics.releases.with_label_values(&["Idle"]).get() == 0);
    ensure!(
        new.metrics
            .idle_passes
            .with_label_values(&["replica_unreachable"])
            .get()
            > 0
    );
    drop(a);
    Ok(())
}

/// Pods in network namespaces of their own (veth pairs, 10.77.x.2), not on loopback: the claim
/// is routed across a real interface, and the pod's address exists only inside its namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_in_network_namespaces_are_claimed_and_routed_across_veth() -> Result<()> {
    use sandbox_gateway_harness::kubelet::PodNetwork;
    let api = FakeApiServer::start().await?;
    let kc = api.client()?;
    let kubelet = TestKubelet::start(
        kc.clone(),
        KubeletOptions {
            network: PodNetwork::Netns,
            ..KubeletOptions::default()
        },
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let gw_cfg = json!({
        "route_source": { "type": "kubernetes", "kubeconfig": kubeconfig },
        "miss_hold_ms": 200
    });
    let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&gw_cfg, 0, 0)?))?;
    let gw = envoy.listener;
    let ctl = Replica::start(kc.clone(), "solo", Config::default())?;

    let pools: Api<SandboxPool> = Api::namespaced(kc.clone(), NS);
    let sandboxes: Api<Sandbox> = Api::namespaced(kc.clone(), NS);
    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": "e2e", "namespace": NS },
        "spec": { "replicas": 2,
            "template": { "spec": { "containers": [{ "name": "s", "image": "example/s:1" }] } } }
    }))?;
    pools.create(&PostParams::default(), &pool).await?;
    warm(&pools, "e2e", 2).await?;
    let (sbx, id, secret) = claim(&sandboxes, "netns").await?;
    let st = sbx.status.clone().context("status")?;
    let pod_ip: std::net::Ipv4Addr = st.pod_ip.clone().context("pod IP")?.parse()?;
    ensure!(
        pod_ip.octets()[..2] == [10, 77],
        "pod IP {pod_ip} is not a veth address"
    );
    let pod = st.pod_name.clone().context("pod")?;
    ensure!(kubelet.ip_of(NS, &pod) == Some(pod_ip));
    let tok = token(&kc, &secret).await?;
    let r = client::get(
        gw,
        "/hello",
        &[("x-sandbox-id", &id), ("x-access-token", &tok)],
    )
    .await?;
    ensure!(r.status == 200, "through Envoy: {} {}", r.status, r.text());
    ensure!(r.json()["sandbox"] == pod.as_str());
    drop(ctl);
    drop(kubelet);
    Ok(())
}
