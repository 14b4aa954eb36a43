//! End-to-end cases for the request-path rules, written once against `GatewayUnderTest` so every
//! deployment mode (module today, ext_proc later) runs the same cases through a real Envoy.

use crate::client::{self, Response};
use crate::gateway::RouteEntry;
use crate::sandbox::SandboxServer;
use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A running gateway in some mode.
pub trait GatewayUnderTest: Send + Sync {
    fn addr(&self) -> SocketAddr;
    /// The routes file this gateway's route source reads.
    fn routes_path(&self) -> &std::path::Path;
    fn set_routes(&self, routes: &[RouteEntry]) -> Result<()> {
        crate::gateway::write_routes(self.routes_path(), routes)
    }
    /// Overwrites the routes file with arbitrary bytes (a bad edit), atomically.
    fn write_routes_raw(&self, bytes: &[u8]) -> Result<()> {
        let path = self.routes_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Defines one `#[tokio::test]` per shared case, each starting its gateway with `$starter`
/// (a `fn(&[RouteEntry], Value) -> Result<Box<dyn GatewayUnderTest>>`). Every mode's test file
/// invokes this once, so a new case runs in every mode.
#[macro_export]
macro_rules! shared_cases {
    ($starter:path) => {
        $crate::shared_cases!(@each $starter;
            header_host_and_path_routing,
            local_replies_are_json,
            client_cannot_choose_the_upstream,
            websocket_through_the_gateway,
            sse_streams_without_buffering,
            routes_hot_reload,
            miss_hold_waits_for_a_late_route,
            hostile_input_gets_400,
            open_websocket_survives_route_removal,
        );
    };
    (@each $starter:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Err(e) = $crate::cases::$name(&$starter).await {
                    panic!("{e:#}");
                }
            }
        )*
    };
}

/// Starts a gateway of the mode under test with these routes and config overrides.
pub type Starter = dyn Fn(&[RouteEntry], Value) -> Result<Box<dyn GatewayUnderTest>> + Sync;

/// sha256("secret")
pub const SECRET_SHA256: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

async fn sandboxes(names: &[&str]) -> Result<Vec<SandboxServer>> {
    let mut v = Vec::new();
    for n in names {
        v.push(SandboxServer::start(n, "127.0.0.1:0".parse()?).await?);
    }
    Ok(v)
}

/// Which sandbox answered (the echo body names it).
fn served_by(r: &Response) -> String {
    r.json()["sandbox"].as_str().unwrap_or("").to_string()
}

fn expect_error(r: &Response, status: u16, code: &str) -> Result<()> {
    ensure!(
        r.status == status,
        "want {status} {code}, got {} {}",
        r.status,
        r.text()
    );
    ensure!(
        r.header("content-type") == Some("application/json"),
        "local reply must be JSON: {:?}",
        r.headers
    );
    let v = r.json();
    ensure!(v["error"] == code, "want error {code}, got {v}");
    ensure!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message missing: {v}"
    );
    Ok(())
}

/// Retries `f` until it returns Ok (route changes propagate asynchronously).
async fn eventually<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: gave up")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub async fn header_host_and_path_routing(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one", "two"]).await?;
    let gw = start(
        &[
            RouteEntry::new("alpha", sb[0].addr),
            RouteEntry::new("beta", sb[1].addr),
        ],
        json!({}),
    )?;
    let a = gw.addr();

    let r = client::get(a, "/hello?x=1", &[("x-sandbox-id", "alpha")]).await?;
    ensure!(
        r.status == 200 && served_by(&r) == "one",
        "header: {}",
        r.text()
    );
    ensure!(r.json()["path"] == "/hello?x=1");
    // An explicit port goes to that port on the sandbox's own IP.
    let port = sb[1].addr.port().to_string();
    let r = client::get(
        a,
        "/",
        &[("x-sandbox-id", "alpha"), ("x-sandbox-port", &port)],
    )
    .await?;
    ensure!(served_by(&r) == "two", "header port: {}", r.text());

    let host = format!("{}-beta.sandbox.test", sb[1].addr.port());
    let r = client::get(a, "/h", &[("host", &host)]).await?;
    ensure!(
        r.status == 200 && served_by(&r) == "two",
        "host: {}",
        r.text()
    );
    let r = client::get(a, "/h", &[("host", "beta.sandbox.test:8080")]).await?;
    ensure!(served_by(&r) == "two", "host without port: {}", r.text());

    let path = format!("/sandboxes/alpha/{}/api/v1/items?q=2", sb[0].addr.port());
    let r = client::get(a, &path, &[]).await?;
    ensure!(
        r.status == 200 && served_by(&r) == "one",
        "path: {}",
        r.text()
    );
    ensure!(
        r.json()["path"] == "/api/v1/items?q=2",
        "prefix stripped: {}",
        r.text()
    );
    let path = format!("/sandboxes/alpha/{}", sb[0].addr.port());
    let r = client::get(a, &path, &[]).await?;
    ensure!(
        r.json()["path"] == "/",
        "bare prefix becomes /: {}",
        r.text()
    );

    // The header wins over Host when both are present.
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha"), ("host", &host)]).await?;
    ensure!(served_by(&r) == "one");
    Ok(())
}

pub async fn local_replies_are_json(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(
        &[
            RouteEntry::new("alpha", sb[0].addr),
            RouteEntry::new("sleepy", sb[0].addr).not_ready(),
            RouteEntry::new("locked", sb[0].addr).token_sha256(SECRET_SHA256),
        ],
        json!({"retry_after_s": 7}),
    )?;
    let a = gw.addr();
    expect_error(&client::get(a, "/", &[]).await?, 400, "missing_sandbox_id")?;
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", "Alpha")]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", "-x")]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    expect_error(
        &client::get(
            a,
            "/",
            &[("x-sandbox-id", "alpha"), ("x-sandbox-port", "0")],
        )
        .await?,
        400,
        "invalid_sandbox_port",
    )?;
    expect_error(
        &client::get(
            a,
            "/",
            &[("x-sandbox-id", "alpha"), ("x-sandbox-id", "beta")],
        )
        .await?,
        400,
        "duplicate_header",
    )?;
    expect_error(
        &client::get(a, "/sandboxes/alpha/http/x", &[]).await?,
        400,
        "invalid_sandbox_port",
    )?;

    let r = client::get(a, "/", &[("x-sandbox-id", "nobody")]).await?;
    expect_error(&r, 404, "sandbox_not_found")?;
    ensure!(r.json()["sandbox_id"] == "nobody");

    let r = client::get(a, "/", &[("x-sandbox-id", "sleepy")]).await?;
    expect_error(&r, 503, "sandbox_not_ready")?;
    ensure!(
        r.header("retry-after") == Some("7"),
        "Retry-After: {:?}",
        r.headers
    );

    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", "locked")]).await?,
        401,
        "missing_access_token",
    )?;
    expect_error(
        &client::get(
            a,
            "/",
            &[("x-sandbox-id", "locked"), ("x-access-token", "secreT")],
        )
        .await?,
        401,
        "invalid_access_token",
    )?;
    expect_error(
        &client::get(
            a,
            "/",
            &[
                ("x-sandbox-id", "locked"),
                ("x-access-token", "secret"),
                ("x-access-token", "secret"),
            ],
        )
        .await?,
        401,
        "invalid_access_token",
    )?;
    let r = client::get(
        a,
        "/",
        &[("x-sandbox-id", "locked"), ("x-access-token", "secret")],
    )
    .await?;
    ensure!(r.status == 200, "right token: {}", r.text());
    ensure!(
        r.json()["headers"].get("x-access-token").is_none(),
        "token must be stripped: {}",
        r.text()
    );
    // A token sent to a sandbox without one is stripped too: it is never forwarded anywhere.
    let r = client::get(
        a,
        "/",
        &[("x-sandbox-id", "alpha"), ("x-access-token", "secret")],
    )
    .await?;
    ensure!(r.json()["headers"].get("x-access-token").is_none());
    Ok(())
}

/// A listener that only counts connections: nothing may ever reach it.
async fn victim() -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    Ok((addr, hits))
}

pub async fn client_cannot_choose_the_upstream(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let (victim_addr, hits) = victim().await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    let v = victim_addr.to_string();
    let r = client::get(
        a,
        "/",
        &[("x-sandbox-id", "alpha"), ("x-envoy-original-dst-host", &v)],
    )
    .await?;
    ensure!(served_by(&r) == "one", "went elsewhere: {}", r.text());
    ensure!(
        r.json()["headers"]
            .get("x-envoy-original-dst-host")
            .is_none(),
        "header must be removed: {}",
        r.text()
    );
    expect_error(
        &client::get(a, "/", &[("x-envoy-original-dst-host", &v)]).await?,
        400,
        "missing_sandbox_id",
    )?;
    expect_error(
        &client::get(
            a,
            "/",
            &[("x-sandbox-id", "ghost"), ("x-envoy-original-dst-host", &v)],
        )
        .await?,
        404,
        "sandbox_not_found",
    )?;
    // A Host naming an address is not a sandbox host.
    expect_error(
        &client::get(a, "/", &[("host", &v)]).await?,
        400,
        "missing_sandbox_id",
    )?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(
        hits.load(Ordering::SeqCst) == 0,
        "victim reached {} times",
        hits.load(Ordering::SeqCst)
    );
    Ok(())
}

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

pub async fn hostile_input_gets_400(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    let long_id = "a".repeat(8000);
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", &long_id)]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    let huge = "b".repeat(50_000);
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", &huge)]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    let long_host = format!("{}.sandbox.test", "c".repeat(10_000));
    expect_error(
        &client::get(a, "/", &[("host", &long_host)]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    let long_host = format!("80-{}.sandbox.test", "c".repeat(10_000));
    expect_error(
        &client::get(a, "/", &[("host", &long_host)]).await?,
        400,
        "invalid_sandbox_id",
    )?;
    for id in [
        "ALPHA", "alphA", "älpha", "al pha", "al.pha", "al/pha", "%61lpha",
    ] {
        let r = client::get(a, "/", &[("x-sandbox-id", id)]).await?;
        expect_error(&r, 400, "invalid_sandbox_id").context(id.to_string())?;
    }
    let r = client::send_raw(
        a,
        b"GET / HTTP/1.1\r\nhost: g\r\nx-sandbox-id: al\xff\xfepha\r\nconnection: close\r\n\r\n",
    )
    .await?;
    ensure!(r.status == 400, "non-UTF-8 id: {} {}", r.status, r.text());
    let r = client::send_raw(
        a,
        b"GET /sandboxes/\xc3\xa4lpha/80/ HTTP/1.1\r\nhost: g\r\nconnection: close\r\n\r\n",
    )
    .await?;
    ensure!(r.status == 400, "non-ASCII path id: {}", r.status);
    // Over Envoy's own header limit (60 KiB) Envoy answers before any filter runs.
    let too_big = "d".repeat(70_000);
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha"), ("x-pad", &too_big)]).await;
    ensure!(
        r.map(|r| r.status == 431).unwrap_or(true),
        "oversized headers must not be routed"
    );
    // Still up and routing.
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha")]).await?;
    ensure!(r.status == 200 && served_by(&r) == "one");
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
