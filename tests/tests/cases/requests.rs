//! Shared cases about single requests: routing by header, Host and path; JSON local replies;
//! what a client must never be able to choose (the upstream); hostile input.

use super::{expect_error, sandboxes, served_by, Starter, SECRET_SHA256};
use anyhow::{ensure, Context, Result};
use routing::decide::READY_PATH;
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::gateway::RouteEntry;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Request headers, as `client::get` takes them.
type Headers<'a> = &'a [(&'a str, &'a str)];

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
    let bad_keys: [(&str, Headers, &str); 6] = [
        ("/", &[], "missing_sandbox_id"),
        ("/", &[("x-sandbox-id", "Alpha")], "invalid_sandbox_id"),
        ("/", &[("x-sandbox-id", "-x")], "invalid_sandbox_id"),
        (
            "/",
            &[("x-sandbox-id", "alpha"), ("x-sandbox-port", "0")],
            "invalid_sandbox_port",
        ),
        (
            "/",
            &[("x-sandbox-id", "alpha"), ("x-sandbox-id", "beta")],
            "duplicate_header",
        ),
        ("/sandboxes/alpha/http/x", &[], "invalid_sandbox_port"),
    ];
    for (path, headers, code) in bad_keys {
        expect_error(&client::get(a, path, headers).await?, 400, code)?;
    }

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

    let bad_tokens: [(Headers, &str); 3] = [
        (&[("x-sandbox-id", "locked")], "missing_access_token"),
        (
            &[("x-sandbox-id", "locked"), ("x-access-token", "secreT")],
            "invalid_access_token",
        ),
        (
            &[
                ("x-sandbox-id", "locked"),
                ("x-access-token", "secret"),
                ("x-access-token", "secret"),
            ],
            "invalid_access_token",
        ),
    ];
    for (headers, code) in bad_tokens {
        expect_error(&client::get(a, "/", headers).await?, 401, code)?;
    }
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

/// The readiness path: the gateway's own answer where the request names no sandbox (a file
/// source is synced once loaded), the sandbox's wherever a request names one.
pub async fn readiness_probe_names_no_sandbox(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(
        &[
            RouteEntry::new("alpha", sb[0].addr),
            RouteEntry::new("sleepy", sb[0].addr).not_ready(),
        ],
        json!({}),
    )?;
    let a = gw.addr();
    for path in [READY_PATH, &format!("{READY_PATH}?from=kubelet")] {
        let r = client::get(a, path, &[]).await?;
        ensure!(r.status == 200, "{path}: {} {}", r.status, r.text());
        ensure!(r.header("content-type") == Some("application/json"));
        ensure!(
            r.json() == json!({"ready": true, "routes": 2}),
            "{}",
            r.text()
        );
    }
    let head = format!("HEAD {READY_PATH} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n");
    let r = client::send_raw(a, head.as_bytes()).await?;
    ensure!(r.status == 200 && r.body.is_empty(), "HEAD: {}", r.status);
    // Any other method, or a neighbouring path, names no sandbox either: 400 as before.
    let post = format!(
        "POST {READY_PATH} HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    expect_error(
        &client::send_raw(a, post.as_bytes()).await?,
        400,
        "missing_sandbox_id",
    )?;
    let r = client::get(a, &format!("{READY_PATH}z"), &[]).await?;
    expect_error(&r, 400, "missing_sandbox_id")?;
    // Named by header, Host or path prefix, the same path belongs to the sandbox.
    let r = client::get(a, READY_PATH, &[("x-sandbox-id", "alpha")]).await?;
    ensure!(
        r.status == 200 && served_by(&r) == "one" && r.json()["path"] == READY_PATH,
        "header: {}",
        r.text()
    );
    let r = client::get(a, READY_PATH, &[("host", "alpha.sandbox.test")]).await?;
    ensure!(served_by(&r) == "one", "host: {}", r.text());
    let path = format!("/sandboxes/alpha/{}{READY_PATH}", sb[0].addr.port());
    let r = client::get(a, &path, &[]).await?;
    ensure!(r.json()["path"] == READY_PATH, "path: {}", r.text());
    let r = client::get(a, READY_PATH, &[("x-sandbox-id", "sleepy")]).await?;
    expect_error(&r, 503, "sandbox_not_ready")?;
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

pub async fn hostile_input_gets_400(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    let long_id = "a".repeat(8000);
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", &long_id)])
            .await
            .context("8000-byte id")?,
        400,
        "invalid_sandbox_id",
    )?;
    let huge = "b".repeat(50_000);
    expect_error(
        &client::get(a, "/", &[("x-sandbox-id", &huge)])
            .await
            .context("50000-byte id")?,
        400,
        "invalid_sandbox_id",
    )?;
    let long_host = format!("{}.sandbox.test", "c".repeat(10_000));
    expect_error(
        &client::get(a, "/", &[("host", &long_host)])
            .await
            .context("10000-byte host")?,
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
    let r = client::get(a, "/", &[("x-sandbox-id", "alpha")])
        .await
        .context("a good request after the hostile ones")?;
    ensure!(r.status == 200 && served_by(&r) == "one");
    Ok(())
}

/// The `e2b` preset: the gateway's token travels as `e2b-traffic-access-token` and is stripped;
/// envd's own `X-Access-Token` reaches the sandbox untouched (envd authenticates with it), and an
/// explicit `access_token_header` still wins over the preset's.
pub async fn e2b_preset_leaves_envds_token_alone(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["envd"]).await?;
    let routes = [RouteEntry::new("box", sb[0].addr).token_sha256(SECRET_SHA256)];
    let gw = start(&routes, json!({"header_keys": "e2b"}))?;
    let a = gw.addr();
    let r = client::get(
        a,
        "/",
        &[
            ("e2b-sandbox-id", "box"),
            ("e2b-traffic-access-token", "secret"),
            ("x-access-token", "envd-token"),
        ],
    )
    .await?;
    ensure!(r.status == 200, "gateway token accepted: {}", r.text());
    let headers = &r.json()["headers"];
    ensure!(
        headers["x-access-token"] == "envd-token",
        "envd's token must reach the sandbox: {}",
        r.text()
    );
    ensure!(
        headers.get("e2b-traffic-access-token").is_none(),
        "the gateway's token must be stripped: {}",
        r.text()
    );
    // envd's header is not the gateway's token: without the gateway token, 401.
    expect_error(
        &client::get(
            a,
            "/",
            &[("e2b-sandbox-id", "box"), ("x-access-token", "secret")],
        )
        .await?,
        401,
        "missing_access_token",
    )?;
    drop(gw);

    let gw = start(
        &routes,
        json!({"header_keys": "e2b", "access_token_header": "x-gw-token"}),
    )?;
    let r = client::get(
        gw.addr(),
        "/",
        &[("e2b-sandbox-id", "box"), ("x-gw-token", "secret")],
    )
    .await?;
    ensure!(r.status == 200, "explicit header wins: {}", r.text());
    Ok(())
}
