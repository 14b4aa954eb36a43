//! End-to-end last-active: Envoy modules report to the real sandbox-extproc binary, which merges
//! them; the answers come from `GetLastActive` over gRPC. No timing targets: generous deadlines,
//! polling, and order-of-events assertions only.

use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_harness::gateway::{write_routes, FilterGateway, RouteEntry};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const REPORT_MS: u64 = 200;

/// Wall clock in Unix ms, minus the module's clock granularity: Envoy stamps activity with the
/// coarse real-time clock (one kernel tick, a few ms behind), so "after t" means "after now_ms()".
fn now_ms() -> u64 {
    const COARSE_CLOCK_SLACK_MS: u64 = 50;
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .saturating_sub(COARSE_CLOCK_SLACK_MS)
}

/// sandbox-extproc serving `routes` (its own copy of the routes file) plus its temp dir.
fn extproc_for(routes: &[RouteEntry]) -> Result<(ExtProc, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("routes.json");
    write_routes(&path, routes)?;
    let ext = ExtProc::start(&json!({"route_source": file_source(&path)}), &[])?;
    Ok((ext, dir))
}

/// A filter-mode Envoy that reports to `ext` every REPORT_MS.
fn reporting_envoy(
    routes: &[RouteEntry],
    ext: &ExtProc,
    throttle_ms: u64,
) -> Result<FilterGateway> {
    FilterGateway::start(
        routes,
        json!({
            "activity_report": {"endpoint": ext.activity_endpoint(), "interval_ms": REPORT_MS},
            "activity_stream_throttle_ms": throttle_ms,
        }),
    )
}

/// Polls GetLastActive until `pred` holds (10 s deadline).
async fn wait_last_active(
    ext: &ExtProc,
    what: &str,
    pred: impl Fn(&HashMap<String, u64>) -> bool,
) -> Result<HashMap<String, u64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let la = ext.last_active().await;
        if let Ok(la) = &la {
            if pred(la) {
                return Ok(la.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: never satisfied; last answer {la:?}; extproc log:\n{}",
            ext.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ok(gw: &FilterGateway, id: &str) -> Result<()> {
    let r = client::get(gw.envoy.listener, "/", &[("x-sandbox-id", id)]).await?;
    ensure!(r.status == 200, "{id}: {} {}", r.status, r.text());
    Ok(())
}

/// Two Envoys, one sandbox: GetLastActive holds the later of the two, and an older report from
/// the other Envoy never moves it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_envoys_are_merged() -> Result<()> {
    let sb = SandboxServer::start("one", "127.0.0.1:0".parse()?).await?;
    let routes = [
        RouteEntry::new("alpha", sb.addr),
        RouteEntry::new("beta", sb.addr),
    ];
    let (ext, _d) = extproc_for(&routes)?;
    let a = reporting_envoy(&routes, &ext, 1000)?;
    let b = reporting_envoy(&routes, &ext, 1000)?;

    let t0 = now_ms();
    ok(&a, "alpha").await?;
    ok(&a, "beta").await?;
    let la = wait_last_active(&ext, "A's report", |la| {
        la.get("alpha").is_some_and(|&t| t >= t0) && la.get("beta").is_some_and(|&t| t >= t0)
    })
    .await?;
    let alpha_via_a = la["alpha"];
    // Past the coarse-clock resolution, so B's timestamp is strictly later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = now_ms();
    ok(&b, "alpha").await?;
    let la = wait_last_active(&ext, "B's report", |la| {
        la.get("alpha").is_some_and(|&t| t >= t1)
    })
    .await?;
    let merged = la["alpha"];
    ensure!(merged > alpha_via_a, "{merged} vs {alpha_via_a}");
    ensure!(merged <= now_ms() + 1000, "from the future: {merged}");
    ensure!(la["beta"] < t1, "beta only went through A: {la:?}");
    // A keeps re-sending its (older) alpha for a while: the max must hold.
    tokio::time::sleep(Duration::from_millis(6 * REPORT_MS)).await;
    let la = ext.last_active().await?;
    ensure!(
        la["alpha"] == merged,
        "went back: {} -> {}",
        merged,
        la["alpha"]
    );
    Ok(())
}

/// sandbox-extproc killed and restarted on the same port: the data path never notices, and the
/// modules' full snapshots give the new process every sandbox's last-active back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extproc_restart_gets_snapshots_back() -> Result<()> {
    let sb = SandboxServer::start("one", "127.0.0.1:0".parse()?).await?;
    let routes = [
        RouteEntry::new("alpha", sb.addr),
        RouteEntry::new("beta", sb.addr),
    ];
    let (mut ext, _d) = extproc_for(&routes)?;
    let a = reporting_envoy(&routes, &ext, 1000)?;
    let b = reporting_envoy(&routes, &ext, 1000)?;
    ok(&a, "alpha").await?;
    ok(&b, "beta").await?;
    let before = wait_last_active(&ext, "first reports", |la| {
        la.contains_key("alpha") && la.contains_key("beta")
    })
    .await?;

    ext.kill();
    // Extproc down: routing is unaffected, and activity keeps being recorded locally.
    tokio::time::sleep(Duration::from_millis(3 * REPORT_MS)).await;
    let t_down = now_ms();
    ok(&a, "beta").await?;
    ok(&b, "alpha").await?;
    ext.restart()?;
    let after = wait_last_active(&ext, "snapshots after restart", |la| {
        la.get("alpha").is_some_and(|&t| t >= t_down)
            && la.get("beta").is_some_and(|&t| t >= t_down)
    })
    .await?;
    for id in ["alpha", "beta"] {
        ensure!(
            after[id] >= before[id],
            "{id} lost: {before:?} -> {after:?}"
        );
    }
    Ok(())
}

/// A WebSocket with traffic keeps its sandbox active past the report interval, and so does a
/// silent one while it is open (a connected client is in use); once closed it stops advancing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_traffic_advances_last_active() -> Result<()> {
    let sb = SandboxServer::start("ws", "127.0.0.1:0".parse()?).await?;
    let routes = [
        RouteEntry::new("busy", sb.addr),
        RouteEntry::new("quiet", sb.addr),
    ];
    let (ext, _d) = extproc_for(&routes)?;
    let gw = reporting_envoy(&routes, &ext, 100)?;
    let connect = |id: &'static str| {
        let url = format!("ws://{}/socket", gw.envoy.listener);
        async move {
            let mut req = url.into_client_request()?;
            req.headers_mut().insert("x-sandbox-id", id.parse()?);
            let (ws, _) = tokio_tungstenite::connect_async(req).await.context(id)?;
            anyhow::Ok(ws)
        }
    };
    let mut quiet = connect("quiet").await?;
    let quiet_opened = now_ms();
    let mut busy = connect("busy").await?;
    let busy_opened = now_ms();
    // Traffic on busy for several report intervals (and well past the stream throttle).
    let span = Duration::from_millis(8 * REPORT_MS);
    let start = Instant::now();
    while start.elapsed() < span {
        busy.send(Message::text("ping")).await?;
        busy.next().await.context("busy closed")??;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let traffic_end = now_ms();
    let la = wait_last_active(&ext, "busy advanced", |la| {
        la.get("busy")
            .is_some_and(|&t| t >= busy_opened + span.as_millis() as u64 / 2)
    })
    .await?;
    ensure!(la["busy"] <= traffic_end + 1000, "{la:?}");
    // Quiet sent nothing, but its stream is open: a connected client is activity at every
    // report, so the control plane never takes its sandbox for idle.
    let la = wait_last_active(&ext, "quiet advanced while open", |la| {
        la.get("quiet")
            .is_some_and(|&t| t >= quiet_opened + span.as_millis() as u64 / 2)
    })
    .await?;
    ensure!(la["quiet"] <= now_ms() + 1000, "{la:?}");
    // Both sockets still open: quiet was idle, not closed.
    quiet.send(Message::text("still here")).await?;
    ensure!(quiet.next().await.context("quiet closed")??.to_text()? == "still here");
    // Closed, it stops advancing (one report may still carry the last open instant).
    quiet.close(None).await?;
    drop(quiet);
    tokio::time::sleep(Duration::from_millis(4 * REPORT_MS)).await;
    let before = ext.last_active().await?["quiet"];
    tokio::time::sleep(Duration::from_millis(6 * REPORT_MS)).await;
    let after = ext.last_active().await?["quiet"];
    ensure!(
        after == before,
        "quiet still advancing after close: {before} -> {after}"
    );
    Ok(())
}

/// A filter-mode Envoy whose reporter sends the token in `token` (written to a file the module
/// config names), to an extproc that requires `ext`'s token.
fn reporting_envoy_with_token(
    routes: &[RouteEntry],
    ext: &ExtProc,
    token: &str,
) -> Result<(FilterGateway, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("activity-token");
    std::fs::write(&path, format!("{token}\n"))?;
    let gw = FilterGateway::start(
        routes,
        json!({
            "activity_report": {
                "endpoint": ext.activity_endpoint(),
                "interval_ms": REPORT_MS,
                "token_file": path,
            },
        }),
    )?;
    Ok((gw, dir))
}

const ACTIVITY_TOKEN: &str = "e2e-activity-token-7f3a";

/// The module with the right token file reports to an extproc that requires it: traffic shows
/// up in GetLastActive, and no report was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_authenticates_the_reporter() -> Result<()> {
    let sb = SandboxServer::start("one", "127.0.0.1:0".parse()?).await?;
    let routes = [RouteEntry::new("alpha", sb.addr)];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("routes.json");
    write_routes(&path, &routes)?;
    let ext =
        ExtProc::start_with_token(&json!({"route_source": file_source(&path)}), ACTIVITY_TOKEN)?;
    let (gw, _t) = reporting_envoy_with_token(&routes, &ext, ACTIVITY_TOKEN)?;
    let t0 = now_ms();
    ok(&gw, "alpha").await?;
    wait_last_active(&ext, "authenticated report", |la| {
        la.get("alpha").is_some_and(|&t| t >= t0)
    })
    .await?;
    gw.envoy
        .wait_stat("dynamicmodulescustom.activity_report_batches", |n| n > 0)?;
    let refused = gw
        .envoy
        .stat("dynamicmodulescustom.activity_report_unauthenticated")?;
    ensure!(refused == Some(0), "refused: {refused:?}");
    let metrics = ext.metrics_text()?;
    ensure!(
        metrics.contains("sandbox_extproc_activity_auth_failures_total{rpc=\"Report\"} 0"),
        "{metrics}"
    );
    Ok(())
}

/// A wrong token file: the extproc records nothing from that Envoy, and the module counts and
/// logs the refusal. (Routing itself is unaffected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_file_is_refused_and_records_nothing() -> Result<()> {
    let sb = SandboxServer::start("one", "127.0.0.1:0".parse()?).await?;
    let routes = [RouteEntry::new("alpha", sb.addr)];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("routes.json");
    write_routes(&path, &routes)?;
    let ext =
        ExtProc::start_with_token(&json!({"route_source": file_source(&path)}), ACTIVITY_TOKEN)?;
    let (gw, _t) = reporting_envoy_with_token(&routes, &ext, "not-the-token")?;
    ok(&gw, "alpha").await?;
    // Several report intervals, each a refused stream.
    let refused = gw.envoy.wait_stat(
        "dynamicmodulescustom.activity_report_unauthenticated",
        |n| n >= 2,
    )?;
    let failures = gw
        .envoy
        .stat("dynamicmodulescustom.activity_report_failures")?
        .unwrap_or(0);
    ensure!(failures >= refused, "{failures} < {refused}");
    let la = ext.last_active().await?;
    ensure!(la.is_empty(), "recorded from a refused reporter: {la:?}");
    let metrics = ext.metrics_text()?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sandbox_extproc_activity_auth_failures_total{rpc=\"Report\"}"))
        .context("auth failure metric")?;
    let n: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
    ensure!(n >= 2.0, "{line}");
    let log = gw.envoy.log();
    ensure!(
        log.contains("activity report refused: UNAUTHENTICATED"),
        "module log:\n{log}"
    );
    Ok(())
}
