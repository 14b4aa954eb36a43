//! End-to-end in ext_proc mode: the real Envoy 1.40 with its ext_proc filter talking to the real
//! sandbox-extproc binary. The routing/error/security cases are the ones filter mode runs
//! (`cases/`), unchanged.

mod cases;

use anyhow::{ensure, Context};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::extproc::ExtProcGateway;
use sandbox_gateway_harness::gateway::GatewayUnderTest;
use sandbox_gateway_harness::gateway::RouteEntry;
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn extproc_mode(
    routes: &[RouteEntry],
    overrides: Value,
) -> anyhow::Result<Box<dyn GatewayUnderTest>> {
    Ok(Box::new(ExtProcGateway::start(routes, overrides)?))
}

cases::shared_cases!(extproc_mode);

async fn sandbox(name: &str) -> anyhow::Result<SandboxServer> {
    SandboxServer::start(name, "127.0.0.1:0".parse()?).await
}

/// sandbox-extproc killed under traffic: every request gets a prompt JSON 503 (fail closed, no
/// hang, nothing forwarded), and routing comes back when the server does. Requests routed in
/// ext_proc mode show up in that replica's GetLastActive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extproc_killed_mid_traffic() -> anyhow::Result<()> {
    let sb = sandbox("one").await?;
    let mut gw = ExtProcGateway::start(&[RouteEntry::new("alpha", sb.addr)], json!({}))?;
    let a = gw.envoy.listener;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha")]).await?;
    ensure!(r.status == 200, "{}", r.text());
    let la = gw.extproc.last_active().await?;
    ensure!(
        la.get("alpha").is_some_and(|&t| t + 50 >= before),
        "ext_proc traffic is recorded: {la:?}"
    );

    // Traffic while the server dies: each request must finish (any status) well within the
    // deadline; after the kill, the answer is the JSON 503.
    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..40 {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                client::get(a, "/", &[("x-sandbox-id", "alpha")]),
            )
            .await;
            statuses.push(match r {
                Ok(Ok(r)) => r.status,
                Ok(Err(_)) => 0,
                Err(_) => return Err(anyhow::anyhow!("a request hung")),
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(statuses)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.extproc.kill();
    let statuses = traffic.await??;
    ensure!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "only routed or refused: {statuses:?}"
    );

    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        client::get(a, "/", &[("x-sandbox-id", "alpha")]),
    )
    .await
    .context("request hung with extproc down")??;
    ensure!(r.status == 503, "extproc down: {} {}", r.status, r.text());
    ensure!(r.json()["error"] == "routing_unavailable", "{}", r.text());
    ensure!(r.header("retry-after") == Some("1"), "{:?}", r.headers);
    ensure!(
        r.json().get("sandbox").is_none(),
        "must not reach the sandbox"
    );
    tracing::info!(elapsed = ?started.elapsed(), "answer with extproc down");

    gw.extproc.restart()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client::get(a, "/", &[("x-sandbox-id", "alpha")]).await?;
        if r.status == 200 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no recovery: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A hung sandbox-extproc (stopped, sockets open) is bounded by message_timeout: the request
/// gets the JSON 503, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_extproc_times_out() -> anyhow::Result<()> {
    let sb = sandbox("one").await?;
    let gw = ExtProcGateway::start(
        &[RouteEntry::new("alpha", sb.addr)],
        json!({"miss_hold_ms": 0}),
    )?;
    let a = gw.envoy.listener;
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha")]).await?;
    ensure!(r.status == 200);
    let pid = gw.extproc.pid().context("extproc running")?;
    let stop = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
    };
    ensure!(stop("-STOP")?.success());
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        client::get(a, "/", &[("x-sandbox-id", "alpha")]),
    )
    .await;
    let _ = stop("-CONT");
    let r = r.context("request hung with extproc stopped")??;
    ensure!(r.status == 503, "{} {}", r.status, r.text());
    ensure!(r.json()["error"] == "routing_unavailable", "{}", r.text());
    Ok(())
}
