//! Shared cases about long streams and route changes: WebSocket and SSE through the gateway, the
//! routes file hot reload, the miss hold, and an open WebSocket outliving its route.

use super::{eventually, sandboxes, served_by, Starter};
use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::gateway::RouteEntry;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub async fn websocket_through_the_gateway(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["ws"]).await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    for (url, header) in [
        (format!("ws://{a}/socket"), true),
        (
            format!("ws://{a}/sandboxes/alpha/{}/socket", sb[0].addr.port()),
            false,
        ),
    ] {
        let mut req = url.as_str().into_client_request()?;
        if header {
            req.headers_mut().insert("x-sandbox-id", "alpha".parse()?);
        }
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .context(url.clone())?;
        ensure!(resp.status() == 101);
        ws.send(Message::text("whoami")).await?;
        let m = ws.next().await.context("closed")??;
        ensure!(m.to_text()?.contains("\"ws\""), "whoami: {m:?}");
        for i in 0..50 {
            let payload = format!("msg-{i}-{}", "x".repeat(i * 100));
            ws.send(Message::text(payload.clone())).await?;
            let echo = ws.next().await.context("closed")??;
            ensure!(echo.to_text()? == payload);
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255])).await?;
        ensure!(ws.next().await.context("closed")??.into_data().as_ref() == [0u8, 1, 2, 255]);
        ws.close(None).await?;
    }
    // An upgrade to an unknown sandbox is refused with the JSON error, not a 101.
    let mut req = format!("ws://{a}/").into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", "ghost".parse()?);
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => ensure!(resp.status() == 404),
        other => anyhow::bail!("want 404, got {other:?}"),
    }
    Ok(())
}

pub async fn sse_streams_without_buffering(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["sse"]).await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await?;
    // Two events 3 s apart: if anything buffered the stream, the first would arrive with the end.
    s.write_all(
        b"GET /sse?n=2&interval_ms=3000 HTTP/1.1\r\nhost: g\r\nx-sandbox-id: alpha\r\nconnection: close\r\n\r\n",
    )
    .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"seq\":0") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        ensure!(n > 0, "stream ended before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    ensure!(head.contains("text/event-stream"), "{head}");
    ensure!(
        !head.contains("\"seq\":1"),
        "second event cannot be there yet"
    );
    // Nothing more for a while: the stream is open and idle, not finished.
    let quiet = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    ensure!(quiet.is_err(), "stream should still be open and idle");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await??;
    ensure!(String::from_utf8_lossy(&rest).contains("\"seq\":1"));
    Ok(())
}

pub async fn routes_hot_reload(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one", "two"]).await?;
    let gw = start(
        &[RouteEntry::new("alpha", sb[0].addr)],
        json!({"miss_hold_ms": 0}),
    )?;
    let a = gw.addr();
    let who = |id: &'static str| async move {
        let r = client::get(a, "/", &[("x-sandbox-id", id)]).await?;
        Ok::<_, anyhow::Error>(if r.status == 200 {
            served_by(&r)
        } else {
            r.status.to_string()
        })
    };
    ensure!(who("alpha").await? == "one");
    // Add beta, move alpha to the second sandbox.
    gw.set_routes(&[
        RouteEntry::new("alpha", sb[1].addr),
        RouteEntry::new("beta", sb[0].addr),
    ])?;
    eventually("alpha moved", || async {
        ensure!(who("alpha").await? == "two");
        Ok(())
    })
    .await?;
    ensure!(who("beta").await? == "one");
    // Remove alpha: gone at once from the gateway's point of view.
    gw.set_routes(&[RouteEntry::new("beta", sb[0].addr)])?;
    eventually("alpha removed", || async {
        ensure!(who("alpha").await? == "404");
        Ok(())
    })
    .await?;
    // A bad edit is ignored: beta keeps working through several poll intervals.
    gw.write_routes_raw(br#"{"sandboxes": [{"id": "BAD", "ip": "127.0.0.1", "port": 1}]}"#)?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        who("beta").await? == "one",
        "bad edit must not change routing"
    );
    gw.write_routes_raw(b"{ not json")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        who("beta").await? == "one",
        "bad edit must not change routing"
    );
    // A valid empty file removes everything.
    gw.set_routes(&[])?;
    eventually("all removed", || async {
        ensure!(who("beta").await? == "404");
        Ok(())
    })
    .await?;
    gw.set_routes(&[RouteEntry::new("beta", sb[0].addr)])?;
    eventually("beta back", || async {
        ensure!(who("beta").await? == "one");
        Ok(())
    })
    .await?;
    Ok(())
}

/// A route that appears while a request for it is held is used by that request.
pub async fn miss_hold_waits_for_a_late_route(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["late"]).await?;
    let gw = start(&[], json!({"miss_hold_ms": 5000}))?;
    let a = gw.addr();
    let pending =
        tokio::spawn(async move { client::get(a, "/", &[("x-sandbox-id", "fresh")]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.set_routes(&[RouteEntry::new("fresh", sb[0].addr)])?;
    let r = pending.await??;
    ensure!(
        r.status == 200 && served_by(&r) == "late",
        "held request: {} {}",
        r.status,
        r.text()
    );

    // A client that gives up during the hold leaves nothing broken behind.
    let mut s = tokio::net::TcpStream::connect(a).await?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: g\r\nx-sandbox-id: never\r\n\r\n")
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let r = client::get(a, "/", &[("x-sandbox-id", "fresh")]).await?;
    ensure!(r.status == 200);
    Ok(())
}

/// A route that disappears stops new requests at once; a WebSocket already open keeps flowing
/// (the gateway does not cut established sessions on a readiness blip; a deleted pod closes its
/// own sockets).
pub async fn open_websocket_survives_route_removal(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["ws"]).await?;
    let gw = start(
        &[RouteEntry::new("alpha", sb[0].addr)],
        json!({"miss_hold_ms": 0}),
    )?;
    let a = gw.addr();
    let mut req = format!("ws://{a}/live").into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", "alpha".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    ws.send(Message::text("before")).await?;
    ensure!(ws.next().await.context("closed")??.to_text()? == "before");
    gw.set_routes(&[])?;
    eventually("route removed", || async {
        let r = client::get(a, "/", &[("x-sandbox-id", "alpha")]).await?;
        ensure!(r.status == 404, "still routed: {}", r.status);
        Ok(())
    })
    .await?;
    ws.send(Message::text("after")).await?;
    ensure!(ws.next().await.context("closed")??.to_text()? == "after");
    let mut req = format!("ws://{a}/live").into_client_request()?;
    req.headers_mut().insert("x-sandbox-id", "alpha".parse()?);
    ensure!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "new sessions are refused"
    );
    ws.close(None).await?;
    Ok(())
}
