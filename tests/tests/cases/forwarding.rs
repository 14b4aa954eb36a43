//! Shared cases about what the upstream is told about the client's request: the stripped path
//! prefix (`x-forwarded-prefix`) for servers that build URLs, the path kept as received, and a
//! loopback Host (`upstream_host`) for servers that pin theirs. Clients can spoof neither header.
//! The harness's own servers show each rule; a real MCP server and client show them together.

use super::{expect_error, sandboxes, served_by, Starter};
use anyhow::{ensure, Context, Result};
use sandbox_gateway_harness::client::{self, Response};
use sandbox_gateway_harness::gateway::RouteEntry;
use sandbox_gateway_harness::python::{mcp_client, McpScenario, McpServers};
use serde_json::{json, Value};

/// The header as the sandbox received it (its echo), if it did.
fn seen(r: &Response, name: &str) -> Option<String> {
    r.json()["headers"]
        .get(name)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn location(r: &Response) -> Result<String> {
    ensure!(
        r.status == 302,
        "want a redirect: {} {}",
        r.status,
        r.text()
    );
    r.header("location")
        .map(str::to_string)
        .context("302 without Location")
}

/// A server behind the stripped prefix builds its redirect from `x-forwarded-prefix`, and the
/// client can follow it back through the gateway. A client's own value never reaches it.
pub async fn url_building_server_behind_the_path_prefix(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(&[RouteEntry::new("alpha", sb[0].addr)], json!({}))?;
    let a = gw.addr();
    let port = sb[0].addr.port();
    let prefix = format!("/sandboxes/alpha/{port}");

    // Spoofed twice, so both "first value wins" and "last value wins" would show.
    let spoof = [
        ("x-forwarded-prefix", "//evil.example"),
        ("x-forwarded-prefix", "/other"),
    ];
    let r = client::get(a, &format!("{prefix}/redirect?to=/api/kernels"), &spoof).await?;
    let loc = location(&r)?;
    ensure!(
        loc == format!("{prefix}/api/kernels"),
        "Location built from our prefix: {loc}"
    );
    // Following it lands on the same sandbox, prefix stripped again.
    let r = client::get(a, &loc, &[]).await?;
    ensure!(
        r.status == 200 && served_by(&r) == "one",
        "follow: {}",
        r.text()
    );
    ensure!(r.json()["path"] == "/api/kernels", "{}", r.text());
    ensure!(seen(&r, "x-forwarded-prefix").as_deref() == Some(prefix.as_str()));

    // Routed by header or Host, nothing was stripped: the upstream gets no prefix at all, and
    // so its URL is unprefixed (what the client sent must not be taken for ours).
    let host = format!("{port}-alpha.sandbox.test");
    for headers in [
        vec![("x-sandbox-id", "alpha")],
        vec![("host", host.as_str())],
    ] {
        let mut h = headers.clone();
        h.extend_from_slice(&spoof);
        let r = client::get(a, "/redirect", &h).await?;
        ensure!(location(&r)? == "/landing", "{headers:?}: spoof was used");
        let r = client::get(a, "/echo", &h).await?;
        ensure!(
            seen(&r, "x-forwarded-prefix").is_none(),
            "{headers:?}: spoof forwarded: {}",
            r.text()
        );
    }
    // The failure the prefix header prevents: a root-relative URL has no sandbox key.
    expect_error(
        &client::get(a, "/api/kernels", &[]).await?,
        400,
        "missing_sandbox_id",
    )?;
    Ok(())
}

/// `path_prefix_mode: "keep"`: the upstream sees the path exactly as the client sent it (for a
/// server whose base URL is the prefix), and no `x-forwarded-prefix`.
pub async fn keep_path_mode_forwards_the_path_unchanged(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let gw = start(
        &[RouteEntry::new("alpha", sb[0].addr)],
        json!({"path_prefix_mode": "keep"}),
    )?;
    let a = gw.addr();
    let prefix = format!("/sandboxes/alpha/{}", sb[0].addr.port());
    for path in [
        format!("{prefix}/lab/tree?x=1&y=%2F"),
        format!("{prefix}/"),
        prefix.clone(),
    ] {
        let r = client::get(a, &path, &[("x-forwarded-prefix", "/evil")]).await?;
        ensure!(
            r.status == 200 && served_by(&r) == "one",
            "{path}: {}",
            r.text()
        );
        ensure!(r.json()["path"] == path.as_str(), "{path}: {}", r.text());
        ensure!(
            seen(&r, "x-forwarded-prefix").is_none(),
            "{path}: {}",
            r.text()
        );
    }
    Ok(())
}

/// A server that accepts only `localhost:<port>` (DNS-rebinding protection) refuses the
/// sandbox Host by default; with `upstream_host: "localhost"` it is served, and the client's Host
/// arrives in `x-forwarded-host` (never a client's own x-forwarded-host).
pub async fn host_pinned_server_with_upstream_host(start: &Starter) -> Result<()> {
    let sb = sandboxes(&["one"]).await?;
    let routes = [RouteEntry::new("alpha", sb[0].addr)];
    let port = sb[0].addr.port();
    let host = format!("{port}-alpha.sandbox.test");

    // Default: the Host passes unchanged, and the pinned server says no.
    let gw = start(&routes, json!({}))?;
    let r = client::get(gw.addr(), "/host-pinned", &[("host", &host)]).await?;
    ensure!(r.status == 421, "default Host: {} {}", r.status, r.text());
    let r = client::get(gw.addr(), "/echo", &[("host", &host)]).await?;
    ensure!(
        seen(&r, "host").as_deref() == Some(host.as_str()),
        "{}",
        r.text()
    );
    drop(gw);

    let gw = start(&routes, json!({"upstream_host": "localhost"}))?;
    let a = gw.addr();
    let local = format!("localhost:{port}");
    let spoof = ("x-forwarded-host", "evil.example");
    let r = client::get(a, "/host-pinned", &[("host", &host), spoof]).await?;
    ensure!(r.status == 200, "Host routing: {} {}", r.status, r.text());
    ensure!(
        seen(&r, "host").as_deref() == Some(local.as_str()),
        "{}",
        r.text()
    );
    ensure!(
        seen(&r, "x-forwarded-host").as_deref() == Some(host.as_str()),
        "{}",
        r.text()
    );
    // Header routing, no port: the route's own port; the original Host is the gateway's name.
    let r = client::get(a, "/host-pinned", &[("x-sandbox-id", "alpha"), spoof]).await?;
    ensure!(r.status == 200, "header routing: {} {}", r.status, r.text());
    ensure!(
        seen(&r, "x-forwarded-host").as_deref() == Some("gateway.test"),
        "{}",
        r.text()
    );
    // Path routing: both headers, and the prefix still stripped.
    let r = client::get(
        a,
        &format!("/sandboxes/alpha/{port}/host-pinned"),
        &[("host", "gw.example:8443"), spoof],
    )
    .await?;
    ensure!(r.status == 200, "path routing: {} {}", r.status, r.text());
    ensure!(seen(&r, "x-forwarded-host").as_deref() == Some("gw.example:8443"));
    ensure!(seen(&r, "x-forwarded-prefix") == Some(format!("/sandboxes/alpha/{port}")));
    // HTTP/2 clients: the Host is `:authority`; the upstream (HTTP/1.1) gets it as Host.
    let r = client::get_h2(a, &host, "/host-pinned", &[spoof]).await?;
    ensure!(r.status == 200, "h2: {} {}", r.status, r.text());
    ensure!(
        seen(&r, "host").as_deref() == Some(local.as_str()),
        "{}",
        r.text()
    );
    ensure!(
        seen(&r, "x-forwarded-host").as_deref() == Some(host.as_str()),
        "{}",
        r.text()
    );
    Ok(())
}

/// The real thing: MCP servers from the Python MCP SDK (PyPI `mcp`) over the SSE transport,
/// bound to loopback (so the SDK checks the Host), driven by the SDK's own client through the
/// gateway. Without the options they fail the ways issue 12 describes; with them each session
/// initializes, lists tools and calls them.
pub async fn mcp_server_over_sse_through_the_gateway(start: &Starter) -> Result<()> {
    let mcp = McpServers::start(&[
        ("root", "root"),
        ("mounted", "mount:/sandboxes/mcp-keep/{port}"),
        ("fwd", "forwarded-prefix"),
    ])?;
    let (root, mounted, fwd) = (mcp.port("root")?, mcp.port("mounted")?, mcp.port("fwd")?);
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let routes = [
        RouteEntry::new("mcp-root", at(root)),
        RouteEntry::new("mcp-keep", at(mounted)),
        RouteEntry::new("mcp-fwd", at(fwd)),
    ];
    let plain = start(&routes, json!({}))?;
    let opted = start(
        &routes,
        json!({"path_prefix_mode": "keep", "upstream_host": "localhost"}),
    )?;
    let scenario =
        |name: &str, gw: std::net::SocketAddr, path: String, host: Option<String>| McpScenario {
            name: name.into(),
            url: format!("http://{gw}{path}"),
            headers: host.map(|h| ("Host".to_string(), h)).into_iter().collect(),
        };
    let root_host = format!("{root}-mcp-root.sandbox.test");
    let results = mcp_client(&[
        scenario(
            "default: path prefix stripped, server at /",
            plain.addr(),
            format!("/sandboxes/mcp-root/{root}/sse"),
            None,
        ),
        scenario(
            "default: path prefix stripped, server under the prefix",
            plain.addr(),
            format!("/sandboxes/mcp-keep/{mounted}/sse"),
            None,
        ),
        scenario(
            "default: Host routing, Host kept",
            plain.addr(),
            "/sse".into(),
            Some(root_host.clone()),
        ),
        scenario(
            "default: path prefix stripped, server trusts x-forwarded-prefix",
            plain.addr(),
            format!("/sandboxes/mcp-fwd/{fwd}/sse"),
            None,
        ),
        scenario(
            "keep path + localhost Host: server under the prefix, public gateway name",
            opted.addr(),
            format!("/sandboxes/mcp-keep/{mounted}/sse"),
            Some("gateway.example".into()),
        ),
        scenario(
            "keep path + localhost Host: Host routing",
            opted.addr(),
            "/sse".into(),
            Some(root_host),
        ),
    ])
    .await?;
    let responses = |r: &Value| r["responses"].to_string();
    let failed_with = |r: &Value, needle: &str| -> Result<()> {
        ensure!(
            r["ok"] == false && responses(r).contains(needle),
            "{}: want a failure with {needle:?}, got {r:#}",
            r["name"]
        );
        Ok(())
    };
    let worked = |r: &Value, port: u16| -> Result<()> {
        ensure!(
            r["ok"] == true
                && r["tools"] == json!(["add", "whoami"])
                && r["add"] == json!(["5"])
                && r["whoami"] == json!([format!("mcp-{port}")]),
            "{}: want a working session with mcp-{port}, got {r:#}\nserver log:\n{}",
            r["name"],
            mcp.log()
        );
        Ok(())
    };
    // The SSE stream opens, but the server tells the client to POST to /messages/, which names
    // no sandbox: the gateway's 400.
    failed_with(&results[0], "POST /messages/")?;
    failed_with(&results[0], "missing_sandbox_id")?;
    // A server whose base path is the prefix never sees it.
    failed_with(&results[1], "/sse -> 404")?;
    // DNS-rebinding protection refuses the sandbox Host.
    failed_with(&results[2], "GET /sse -> 421")?;
    worked(&results[3], fwd)?;
    ensure!(
        responses(&results[3]).contains(&format!("POST /sandboxes/mcp-fwd/{fwd}/messages/")),
        "messages went back through the prefix: {:#}",
        results[3]
    );
    worked(&results[4], mounted)?;
    worked(&results[5], root)?;
    Ok(())
}
