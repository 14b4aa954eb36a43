//! Shared load cases with bounded counts: what one sandbox can take from the others. A hung
//! sandbox next to a healthy one, and more WebSockets than Envoy's default circuit breakers
//! (1,024) allow, with the default config. Timings are the benchmarks' business; these cases
//! assert only outcomes.

use super::{expect_error, sandboxes, served_by, Starter};
use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::gateway::RouteEntry;
use sandbox_gateway_harness::hung::HungSandbox;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The default `max_streams_per_sandbox`.
const PER_SANDBOX: usize = 1000;

/// 1,100 requests to a sandbox that never answers: the first 1,000 wait for it, the rest get
/// 429 `sandbox_busy` at once, and a healthy sandbox next to it answers every request. Once the
/// waiting requests are gone, their places are free again.
pub async fn hung_sandbox_cannot_starve_a_healthy_one(start: &Starter) -> Result<()> {
    let hung_sandbox = HungSandbox::start().await?;
    let hung = hung_sandbox.addr;
    let sb = sandboxes(&["healthy"]).await?;
    let routes = [
        RouteEntry::new("hung", hung),
        RouteEntry::new("healthy", sb[0].addr),
    ];
    let gw = start(&routes, json!({}))?;
    let a = gw.addr();
    let total = PER_SANDBOX + 100;
    let (tx, mut rx) = tokio::sync::mpsc::channel(total);
    // Connects in bursts the listener's backlog can take.
    let connecting = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::new();
    for _ in 0..total {
        let (tx, connecting) = (tx.clone(), Arc::clone(&connecting));
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let mut s = tokio::net::TcpStream::connect(a).await?;
            s.write_all(
                b"GET /wait HTTP/1.1\r\nhost: g\r\nx-sandbox-id: hung\r\nconnection: close\r\n\r\n",
            )
            .await?;
            drop(permit);
            let mut buf = Vec::new();
            // Requests let through wait here until the test ends them.
            s.read_to_end(&mut buf).await?;
            let _ = tx.send(client::parse(&buf)).await;
            anyhow::Ok(())
        }));
    }
    drop(tx);
    let mut refused = Vec::new();
    while refused.len() < total - PER_SANDBOX {
        let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("waiting for the requests past the bound to be refused")?
            .context("every request task ended")?;
        refused.push(r?);
    }
    for r in &refused {
        expect_error(r, 429, "sandbox_busy")?;
        ensure!(r.header("retry-after").is_some(), "429 without Retry-After");
        ensure!(r.json()["sandbox_id"] == "hung", "{}", r.text());
    }
    // The healthy sandbox is unaffected while 1,000 requests wait on the hung one.
    for i in 0..20 {
        let r = client::get(a, "/", &[("x-sandbox-id", "healthy")])
            .await
            .with_context(|| format!("healthy request {i}"))?;
        ensure!(
            r.status == 200 && served_by(&r) == "healthy",
            "{}",
            r.text()
        );
    }
    // No other request to the hung sandbox was answered: exactly 1,000 were let through.
    ensure!(
        rx.try_recv().is_err(),
        "more than {} requests were refused",
        total - PER_SANDBOX
    );
    // The waiting clients give up; their places are given back. The same ID, now routed to a
    // healthy server, must be served, not refused.
    for t in &tasks {
        t.abort();
    }
    gw.set_routes(&[
        RouteEntry::new("hung", sb[0].addr),
        RouteEntry::new("healthy", sb[0].addr),
    ])?;
    super::eventually("the hung sandbox's places are freed", || async {
        let r = client::get(a, "/", &[("x-sandbox-id", "hung")]).await?;
        ensure!(r.status == 200, "{} {}", r.status, r.text());
        Ok(())
    })
    .await
}

/// 1,100 WebSockets open at once (past Envoy's default 1,024 circuit breakers), over two
/// sandboxes; every one is accepted and echoes, and a plain request to a third sandbox is served.
pub async fn more_websockets_than_envoys_defaults(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["ws-a", "ws-b", "plain"]).await?;
    let gw = start(
        &[
            RouteEntry::new("ws-a", sb[0].addr),
            RouteEntry::new("ws-b", sb[1].addr),
            RouteEntry::new("plain", sb[2].addr),
        ],
        json!({}),
    )?;
    let a = gw.addr();
    let total = 1100;
    let connecting = Arc::new(Semaphore::new(100));
    let mut opening = Vec::new();
    for i in 0..total {
        let id = if i % 2 == 0 { "ws-a" } else { "ws-b" };
        let connecting = Arc::clone(&connecting);
        opening.push(tokio::spawn(async move {
            let _permit = connecting.acquire_owned().await;
            let mut req = format!("ws://{a}/socket").into_client_request()?;
            req.headers_mut().insert("x-sandbox-id", id.parse()?);
            // Past a full circuit breaker the upgrade gets no answer at all: fail, don't hang.
            let (ws, resp) = tokio::time::timeout(
                Duration::from_secs(30),
                tokio_tungstenite::connect_async(req),
            )
            .await
            .with_context(|| format!("websocket {i}: no answer"))?
            .with_context(|| format!("websocket {i}"))?;
            ensure!(resp.status() == 101);
            anyhow::Ok(ws)
        }));
    }
    let mut open = Vec::new();
    for t in opening {
        open.push(t.await??);
    }
    // All open at once: each still echoes (one in ten checked), and other traffic flows.
    for ws in open.iter_mut().step_by(10) {
        ws.send(Message::text("ping")).await?;
        let m = ws.next().await.context("closed")??;
        ensure!(m.to_text()? == "ping", "echo: {m:?}");
    }
    let r = client::get(a, "/", &[("x-sandbox-id", "plain")]).await?;
    ensure!(r.status == 200 && served_by(&r) == "plain", "{}", r.text());
    ensure!(open.len() == total);
    Ok(())
}

/// One GET for an unknown, made-up sandbox from `from` (a loopback address of its own), the
/// answer ignored: the flood's unit.
async fn junk_request(gw: std::net::SocketAddr, from: std::net::IpAddr, n: u64) -> Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    let mut s = socket.connect(gw).await?;
    let req =
        format!("GET / HTTP/1.1\r\nhost: g\r\nx-sandbox-id: junk-{n}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(())
}

/// A flood of made-up IDs from one client fills every hold place, without end; meanwhile 100
/// sandboxes are claimed (their routes appear a moment after their first request), and each of
/// those first requests must still get its hold and then its sandbox's 200, not a 404.
pub async fn junk_flood_cannot_take_the_hold_from_a_new_claim(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["claimed"]).await?;
    const CAP: usize = 200;
    let existing = RouteEntry::new("existing", sb[0].addr);
    let gw = start(
        std::slice::from_ref(&existing),
        json!({"miss_hold_ms": 3000, "max_held_misses": CAP}),
    )?;
    let a = gw.addr();
    // 300 junk clients' worth of requests, from 127.0.0.2, each re-sent as soon as answered.
    let junk_ip: std::net::IpAddr = "127.0.0.2".parse()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for t in 0..(CAP as u64 + 100) {
        let stop = Arc::clone(&stop);
        flood.push(tokio::spawn(async move {
            let mut n = t * 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                if junk_request(a, junk_ip, n).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    // The book is full of junk once holds start giving way.
    super::eventually("the flood fills every hold place", || async {
        let displaced = gw.counter("miss_holds_displaced")?;
        ensure!(displaced > 0, "no hold displaced yet");
        Ok(())
    })
    .await?;
    // Requests for a sandbox that exists are untouched by the flood.
    for i in 0..20 {
        let r = client::get(a, "/", &[("x-sandbox-id", "existing")])
            .await
            .with_context(|| format!("existing sandbox, request {i}"))?;
        ensure!(
            r.status == 200,
            "during the flood: {} {}",
            r.status,
            r.text()
        );
    }
    let mut routes = vec![existing];
    let mut served = 0;
    for batch in 0..10 {
        let ids: Vec<String> = (0..10).map(|i| format!("claim-{batch}-{i}")).collect();
        let mut first = Vec::new();
        for id in &ids {
            let id = id.clone();
            first.push(tokio::spawn(async move {
                client::get(a, "/", &[("x-sandbox-id", &id)]).await
            }));
        }
        // The claim completes a moment after its first request arrived.
        tokio::time::sleep(Duration::from_millis(100)).await;
        routes.extend(ids.iter().map(|id| RouteEntry::new(id, sb[0].addr)));
        gw.set_routes(&routes)?;
        for (id, t) in ids.iter().zip(first) {
            let r = t.await??;
            if r.status == 200 && served_by(&r) == "claimed" {
                served += 1;
            } else {
                tracing::warn!(%id, status = r.status, body = %r.text(), "claim not served");
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let still_displacing = gw.counter("miss_holds_displaced")?;
    for t in flood {
        t.abort();
    }
    // The target is 99 of 100; a different client is never displaced, so all 100.
    ensure!(served == 100, "only {served} of 100 new claims were served");
    ensure!(
        still_displacing > CAP as u64,
        "the flood did not keep the book full"
    );
    Ok(())
}

/// A connection that never sends a byte is closed by the listener (10 s, the bootstrap's
/// `listener_filters_timeout`), while a WebSocket opened at the same moment and left silent for
/// longer stays open and still echoes.
pub async fn silent_connections_close_but_idle_websockets_stay(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["idle"]).await?;
    let gw = start(&[RouteEntry::new("idle", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    let mut req = format!("ws://{a}/socket").into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", "idle".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut silent = tokio::net::TcpStream::connect(a).await?;
    let opened = std::time::Instant::now();
    let mut buf = [0u8; 64];
    // Envoy closes it; without the listener timeout this read would wait for the hour-long
    // connection idle timeout (the header timeout only starts at the first byte).
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .context("a silent connection was still open after 30 s")?
        .unwrap_or(0);
    ensure!(n == 0, "the gateway sent {n} bytes to a silent connection");
    let closed_after = opened.elapsed();
    // The WebSocket has been idle at least as long, and is still served.
    ws.send(Message::text("still here")).await?;
    let m = ws.next().await.context("the idle WebSocket was closed")??;
    ensure!(m.to_text()? == "still here", "echo: {m:?}");
    tracing::info!(?closed_after, "silent connection closed");
    Ok(())
}
