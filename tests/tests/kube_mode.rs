//! End-to-end, Kubernetes route source: the real Envoy 1.40 with the module, whose real `kube`
//! watcher lists and watches pods from an in-test API server over real HTTP.

use anyhow::{ensure, Context, Result};
use sandbox_gateway_apiserver::pods::{
    fake_pod, set_annotation, set_deletion_timestamp, set_label, set_ready,
};
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use routing::contract::{PORT_ANNOTATION, SANDBOX_ID_LABEL as ID_LABEL};
use routing::decide::READY_PATH;

#[path = "support/kube_gateway.rs"]
mod kube_gateway;
use kube_gateway::KubeGateway;

impl KubeGateway {
    fn addr(&self) -> SocketAddr {
        self.envoy.listener
    }

    fn stat(&self, name: &str) -> u64 {
        self.envoy
            .stat(&format!("dynamicmodulescustom.{name}"))
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// A sandbox server on its own loopback IP (pod IPs are unique, and the gateway relies on it).
async fn sandbox(name: &str, ip: &str) -> Result<SandboxServer> {
    SandboxServer::start(name, format!("{ip}:0").parse()?).await
}

fn pod_for(ns: &str, name: &str, id: &str, sb: &SandboxServer, ready: bool) -> Value {
    let mut p = fake_pod(ns, name, Some(id), Some(&sb.addr.ip().to_string()), ready);
    set_annotation(&mut p, PORT_ANNOTATION, Some(&sb.addr.port().to_string()));
    p
}

/// Who answers for `id`: the sandbox's name, or the status code / error code.
async fn who(gw: &KubeGateway, id: &str) -> String {
    match client::get(gw.addr(), "/", &[("x-sandbox-id", id)]).await {
        Ok(r) if r.status == 200 => r.json()["sandbox"].as_str().unwrap_or("?").to_string(),
        Ok(r) => format!("{} {}", r.status, r.json()["error"].as_str().unwrap_or("")),
        Err(e) => format!("error {e}"),
    }
}

async fn eventually(gw: &KubeGateway, id: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = who(gw, id).await;
        if got == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{id}: want {want:?}, still {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_drives_routes() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let sb = sandbox("alpha-pod", "127.0.0.11").await?;
    let gw = KubeGateway::start(&api)?;
    eventually(&gw, "alpha", "404 sandbox_not_found")
        .await
        .context("step 1")?;

    // A claimed sandbox whose pod has no IP yet is "not ready", not "not found".
    let mut pending = fake_pod("team", "alpha-0", Some("alpha"), None, false);
    set_annotation(
        &mut pending,
        PORT_ANNOTATION,
        Some(&sb.addr.port().to_string()),
    );
    api.apply(pending);
    eventually(&gw, "alpha", "503 sandbox_not_ready")
        .await
        .context("pending")?;
    let p = api.apply(pod_for("team", "alpha-0", "alpha", &sb, true));
    eventually(&gw, "alpha", "alpha-pod")
        .await
        .context("step 2")?;

    let mut q = p.clone();
    set_ready(&mut q, false);
    let q = api.apply(q);
    // Known but not ready: 503 + Retry-After, not 404.
    eventually(&gw, "alpha", "503 sandbox_not_ready")
        .await
        .context("step 3")?;

    let mut q = q.clone();
    set_ready(&mut q, true);
    let q = api.apply(q);
    eventually(&gw, "alpha", "alpha-pod")
        .await
        .context("step 4")?;

    // Relabel: the old ID stops at once, the new one routes.
    let mut q = q.clone();
    set_label(&mut q, ID_LABEL, Some("alpha-two"));
    let q = api.apply(q);
    eventually(&gw, "alpha-two", "alpha-pod")
        .await
        .context("step 5")?;
    ensure!(who(&gw, "alpha").await == "404 sandbox_not_found");

    // Label removed: no route at all.
    let mut r = q.clone();
    set_label(&mut r, ID_LABEL, None);
    api.apply(r);
    eventually(&gw, "alpha-two", "404 sandbox_not_found")
        .await
        .context("step 6")?;

    let mut s = q.clone();
    set_label(&mut s, ID_LABEL, Some("alpha"));
    let s = api.apply(s);
    eventually(&gw, "alpha", "alpha-pod")
        .await
        .context("step 7")?;

    // Terminating: unroutable before the pod is gone.
    let mut t = s.clone();
    set_deletion_timestamp(&mut t);
    api.apply(t);
    eventually(&gw, "alpha", "404 sandbox_not_found")
        .await
        .context("step 8")?;
    api.delete("team", "alpha-0");
    eventually(&gw, "alpha", "404 sandbox_not_found")
        .await
        .context("step 9")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_ip_goes_to_the_new_owner_only() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let alice = sandbox("alice-pod", "127.0.0.21").await?;
    let bob = sandbox("bob-pod", "127.0.0.21").await?;
    let gw = KubeGateway::start(&api)?;
    api.apply(pod_for("team-a", "alice-0", "alice", &alice, true));
    eventually(&gw, "alice", "alice-pod")
        .await
        .context("step 10")?;

    // Bob's pod (another namespace) is Ready on the same IP; alice's delete has not arrived.
    api.apply(pod_for("team-b", "bob-0", "bob", &bob, true));
    eventually(&gw, "bob", "bob-pod").await.context("step 11")?;
    ensure!(
        who(&gw, "alice").await == "404 sandbox_not_found",
        "alice must be fenced"
    );
    // Not even by naming bob's port.
    let port = bob.addr.port().to_string();
    let r = client::get(
        gw.addr(),
        "/",
        &[("x-sandbox-id", "alice"), ("x-sandbox-port", &port)],
    )
    .await?;
    ensure!(r.status == 404, "alice + bob's port reached {}", r.text());
    gw.envoy
        .wait_stat("dynamicmodulescustom.route_ip_fenced", |v| v >= 1)?;

    // Alice's delete arrives late: bob is unaffected.
    api.delete("team-a", "alice-0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(who(&gw, "bob").await == "bob-pod");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_claims_keep_the_oldest() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let old = sandbox("old-pod", "127.0.0.31").await?;
    let new = sandbox("new-pod", "127.0.0.32").await?;
    let gw = KubeGateway::start(&api)?;
    let mut p = pod_for("team", "dup-old", "dup", &old, true);
    p["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    api.apply(p);
    eventually(&gw, "dup", "old-pod").await.context("step 12")?;
    let mut q = pod_for("team", "dup-new", "dup", &new, true);
    q["metadata"]["creationTimestamp"] = json!("2026-06-01T00:00:00Z");
    api.apply(q);
    gw.envoy
        .wait_stat("dynamicmodulescustom.route_conflicts", |v| v >= 1)?;
    for _ in 0..10 {
        ensure!(
            who(&gw, "dup").await == "old-pod",
            "a newcomer must not take the traffic"
        );
    }
    api.delete("team", "dup-old");
    eventually(&gw, "dup", "new-pod").await.context("step 13")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_keeps_routes_then_converges() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let a = sandbox("a-pod", "127.0.0.41").await?;
    let b = sandbox("b-pod", "127.0.0.42").await?;
    let c = sandbox("c-pod", "127.0.0.43").await?;
    let gw = KubeGateway::start(&api)?;
    api.apply(pod_for("team", "a-0", "aaa", &a, true));
    api.apply(pod_for("team", "b-0", "bbb", &b, true));
    eventually(&gw, "aaa", "a-pod").await.context("step 14")?;
    eventually(&gw, "bbb", "b-pod").await.context("step 15")?;

    // Watch connections cut: nothing changes for traffic.
    api.drop_watches();
    ensure!(who(&gw, "aaa").await == "a-pod");

    // The API server goes away entirely: the last known routes keep serving.
    api.stop().await;
    for _ in 0..20 {
        ensure!(
            who(&gw, "aaa").await == "a-pod",
            "routes must survive an outage"
        );
        ensure!(who(&gw, "bbb").await == "b-pod");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.envoy
        .wait_stat("dynamicmodulescustom.route_watch_errors", |v| v >= 1)?;
    // Meanwhile the cluster changes, and its history is compacted: the watcher must relist (410).
    let relists_before = gw.stat("route_relists");
    api.delete("team", "b-0");
    api.apply(pod_for("team", "c-0", "ccc", &c, true));
    api.compact();
    api.restart().await?;
    eventually(&gw, "ccc", "c-pod").await.context("step 16")?;
    eventually(&gw, "bbb", "404 sandbox_not_found")
        .await
        .context("step 17")?;
    ensure!(who(&gw, "aaa").await == "a-pod");
    gw.envoy
        .wait_stat("dynamicmodulescustom.route_relists", |v| v > relists_before)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_at_start_then_sync() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let a = sandbox("a-pod", "127.0.0.51").await?;
    api.apply(pod_for("team", "a-0", "aaa", &a, true));
    api.stop().await;
    // Envoy starts although the API server is down, and says it has no routes yet.
    let gw = KubeGateway::start(&api)?;
    let r = client::get(gw.addr(), "/", &[("x-sandbox-id", "aaa")]).await?;
    ensure!(
        r.status == 503 && r.json()["error"] == "routes_not_synced",
        "{}",
        r.text()
    );
    ensure!(r.header("retry-after").is_some());
    // And its readiness probe says so: not ready, so no balancer sends it traffic yet.
    let r = client::get(gw.addr(), READY_PATH, &[]).await?;
    ensure!(
        r.status == 503 && r.json()["error"] == "routes_not_synced",
        "{}",
        r.text()
    );
    ensure!(r.header("retry-after").is_some());
    gw.envoy
        .wait_stat("dynamicmodulescustom.routes_synced", |v| v == 0)?;
    api.restart().await?;
    eventually(&gw, "aaa", "a-pod").await.context("step 18")?;
    let r = client::get(gw.addr(), READY_PATH, &[]).await?;
    ensure!(
        r.status == 200 && r.json() == json!({"ready": true, "routes": 1}),
        "{} {}",
        r.status,
        r.text()
    );
    gw.envoy
        .wait_stat("dynamicmodulescustom.routes_synced", |v| v == 1)?;
    eventually(&gw, "nobody", "404 sandbox_not_found")
        .await
        .context("step 19")?;
    Ok(())
}
