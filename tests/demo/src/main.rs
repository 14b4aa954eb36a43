//! `sandbox-demo [--check-only] [--mode filter|extproc|cluster]`: the gateway on one machine.
//! Starts three local sandboxes (alpha, beta, gamma), writes `.demo/routes.json`, starts Envoy
//! 1.40 with `envoy/demo.yaml` (listener 127.0.0.1:10000, admin 127.0.0.1:9901), prints
//! ready-to-paste commands, checks each of them itself, then runs until Ctrl-C/SIGTERM.
//! `--check-only` exits after the checks (status 0 when all pass). The module comes from `$SANDBOX_GATEWAY_MODULE_DIR`,
//! by default `target/release` (`make build`). `--mode extproc` runs Envoy's ext_proc filter
//! against `sandbox-extproc` (`envoy/extproc.yaml.tmpl`, same ports) instead of the module; the
//! binary comes from `$SANDBOX_EXTPROC_BIN`, by default `target/release/sandbox-extproc`.
//! `--mode cluster` runs the whole control plane instead (in-process API server, test kubelet,
//! controller, sandbox-extproc as the ActivityService, Envoy with the module in Kubernetes mode)
//! and a sandbox's scripted lifecycle, printed as it happens (see `cluster.rs`).

#![forbid(unsafe_code)]

mod cluster;

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::envoy::{repo_root, Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{extproc_bootstrap, message_timeout, ExtProc};
use sandbox_gateway_harness::gateway::{write_routes, RouteEntry};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The demo bootstrap: `envoy/gateway.yaml.tmpl` rendered with [`demo_filter_config`], admin
/// port 9901 and listener port 10000 (a unit test keeps the two in step).
const DEMO_YAML: &str = "envoy/demo.yaml";
/// Relative to the repo root, where the demo runs Envoy.
const ROUTES_PATH: &str = ".demo/routes.json";
pub(crate) const HOST_DOMAIN: &str = "sandbox.localhost";
pub(crate) const PATH_PREFIX: &str = "/sandboxes";
const TOKEN: &str = "demo-token";

/// The gateway on one machine: three local sandboxes behind Envoy 1.40 on 127.0.0.1:10000, with
/// ready-to-paste commands, each checked by the demo itself.
#[derive(Parser, Debug)]
#[command(name = "sandbox-demo")]
struct Args {
    /// Exit after the checks (status 0 when all pass) instead of running until Ctrl-C.
    #[arg(long)]
    check_only: bool,
    /// `filter`: Envoy loads libsandbox_gateway.so; `extproc`: Envoy's ext_proc filter talks to
    /// sandbox-extproc; `cluster`: the whole control plane (API server, kubelet, controller,
    /// Envoy in Kubernetes mode) and a sandbox's lifecycle.
    #[arg(long, value_enum, default_value_t = Mode::Filter)]
    mode: Mode,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Filter,
    Extproc,
    Cluster,
}

/// The module config baked into `envoy/demo.yaml`.
fn demo_filter_config() -> Value {
    json!({
        "route_source": {"type": "file", "path": ROUTES_PATH, "poll_interval_ms": 200},
        "host_domains": [HOST_DOMAIN],
        "path_prefix": PATH_PREFIX,
        "miss_hold_ms": 500
    })
}

fn main() -> Result<ExitCode> {
    let args = Args::parse();
    let (check_only, mode) = (args.check_only, args.mode);
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    // Envoy inherits our working directory and resolves the relative routes path against it.
    std::env::set_current_dir(repo_root()).context("changing to the repo root")?;
    if std::env::var_os("SANDBOX_GATEWAY_MODULE_DIR").is_none() {
        // Still single-threaded here (no runtime yet), so changing the environment is sound.
        std::env::set_var(
            "SANDBOX_GATEWAY_MODULE_DIR",
            repo_root().join("target/release"),
        );
    }
    if std::env::var_os("SANDBOX_EXTPROC_BIN").is_none() {
        // Same as above: no other thread exists yet.
        std::env::set_var(
            "SANDBOX_EXTPROC_BIN",
            repo_root().join("target/release/sandbox-extproc"),
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    match mode {
        Mode::Cluster => rt.block_on(cluster::run(check_only)),
        _ => rt.block_on(run(check_only, mode == Mode::Extproc)),
    }
}

async fn run(check_only: bool, extproc_mode: bool) -> Result<ExitCode> {
    let mut sandboxes = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        sandboxes.push(SandboxServer::start(name, ([127, 0, 0, 1], 0).into()).await?);
    }
    let [alpha, beta, gamma] = [0, 1, 2].map(|i| sandboxes[i].addr);
    std::fs::create_dir_all(".demo")?;
    let token_sha256 = hex::encode(Sha256::digest(TOKEN));
    write_routes(
        ROUTES_PATH.as_ref(),
        &[
            RouteEntry::new("alpha", alpha),
            RouteEntry::new("beta", beta),
            RouteEntry::new("gamma", gamma).token_sha256(&token_sha256),
        ],
    )?;
    // ext_proc mode: sandbox-extproc with the module's config, Envoy on the same ports.
    let extproc = if extproc_mode {
        let cfg = demo_filter_config();
        let ext = tokio::task::spawn_blocking(move || ExtProc::start(&cfg, &[])).await??;
        Some(ext)
    } else {
        None
    };
    let bootstrap = match &extproc {
        Some(ext) => extproc_bootstrap(
            9901,
            10000,
            ext.extproc,
            message_timeout(&demo_filter_config()),
        )?,
        None => {
            std::fs::read_to_string(DEMO_YAML).with_context(|| format!("reading {DEMO_YAML}"))?
        }
    };
    let envoy = tokio::task::spawn_blocking(move || {
        Envoy::start(EnvoyOptions {
            bootstrap,
            concurrency: 1,
            listener_name: "sandboxes".into(),
            env: vec![],
        })
    })
    .await??;
    let gw = envoy.listener;

    println!(
        "sandbox-gateway demo ({} mode)",
        if extproc_mode { "ext_proc" } else { "filter" }
    );
    if let Some(ext) = &extproc {
        println!(
            "  extproc     ext_proc {}, ActivityService {}, metrics http://{}/metrics",
            ext.extproc, ext.activity, ext.metrics
        );
    }
    println!(
        "  gateway     http://{gw}  (Envoy admin http://{})",
        envoy.admin
    );
    println!("  sandboxes   alpha {alpha}, beta {beta}, gamma {gamma} (token {TOKEN:?})");
    println!("  routes      {ROUTES_PATH} (edit it: Envoy reloads within 200 ms)");
    println!("  module cfg  {}", demo_filter_config());
    println!("  Envoy log   {}", envoy.log_path.display());
    println!("\nTry these (each one was just checked):\n");

    let mut failed = 0;
    let mut show = |title: &str, cmd: String, res: Result<()>| {
        match res {
            Ok(()) => println!("  ok      {title}"),
            Err(e) => {
                failed += 1;
                println!("  FAILED  {title}: {e:#}");
            }
        }
        println!("          {cmd}\n");
    };
    let (a_port, b_port) = (alpha.port(), beta.port());
    let host = format!("{b_port}-beta.{HOST_DOMAIN}:{}", gw.port());
    let path = format!("{PATH_PREFIX}/alpha/{a_port}/api?x=1");
    show(
        "route by header -> alpha",
        format!("curl -s -H 'x-sandbox-id: alpha' http://{gw}/hello"),
        echo(
            gw,
            "/hello",
            &[("x-sandbox-id", "alpha")],
            "alpha",
            "/hello",
        )
        .await,
    );
    show(
        "route by Host <port>-<id>.<domain> -> beta (*.localhost is 127.0.0.1 for curl)",
        format!("curl -s http://{host}/"),
        echo(gw, "/", &[("host", &host)], "beta", "/").await,
    );
    show(
        &format!("route by path {PATH_PREFIX}/<id>/<port>/... -> alpha, prefix stripped"),
        format!("curl -s 'http://{gw}{path}'"),
        echo(gw, &path, &[], "alpha", "/api?x=1").await,
    );
    let with_token = [("x-sandbox-id", "gamma"), ("x-access-token", TOKEN)];
    show(
        "access token -> gamma (the token is not forwarded)",
        format!("curl -s -H 'x-sandbox-id: gamma' -H 'x-access-token: {TOKEN}' http://{gw}/"),
        echo(gw, "/", &with_token, "gamma", "/").await,
    );
    show(
        "no access token -> 401",
        format!("curl -si -H 'x-sandbox-id: gamma' http://{gw}/"),
        local_reply(gw, "gamma", 401).await,
    );
    show(
        "unknown sandbox -> 404 (after a 500 ms hold)",
        format!("curl -si -H 'x-sandbox-id: nope' http://{gw}/"),
        local_reply(gw, "nope", 404).await,
    );
    show(
        "server-sent events from beta",
        format!("curl -N -H 'x-sandbox-id: beta' 'http://{gw}/sse?n=5'"),
        sse(gw).await,
    );
    show(
        "WebSocket to alpha, message `whoami` (python3 only, or websocat)",
        format!(
            "{}\n          websocat -H 'x-sandbox-id: alpha' ws://{gw}/ws   # then type whoami",
            ws_command(gw)
        ),
        websocket(gw).await,
    );
    if let Some(ext) = &extproc {
        show(
            "last-active per sandbox from the ActivityService (add --json for JSON)",
            format!(
                "target/release/sandbox-extproc last-active --endpoint {}",
                ext.activity_endpoint()
            ),
            last_active(ext).await,
        );
    }

    let result = if failed > 0 {
        println!("{failed} check(s) FAILED");
        ExitCode::FAILURE
    } else {
        println!("All checks passed.");
        ExitCode::SUCCESS
    };
    if !check_only && failed == 0 {
        println!("Demo running; Ctrl-C to stop.");
        wait_for_signal().await?;
    }
    // Keep Envoy's log past the temp dir it lives in.
    let _ = std::fs::copy(&envoy.log_path, ".demo/envoy.log");
    drop(envoy);
    if let Some(ext) = &extproc {
        let _ = std::fs::copy(ext.log_path(), ".demo/extproc.log");
    }
    drop(extproc);
    for s in sandboxes {
        s.shutdown().await;
    }
    println!("Stopped Envoy and the sandboxes (Envoy log kept in .demo/envoy.log). Goodbye.");
    Ok(result)
}

/// The sandboxes the checks above used are listed with a last-active time.
async fn last_active(ext: &ExtProc) -> Result<()> {
    let la = ext.last_active().await?;
    for id in ["alpha", "beta", "gamma"] {
        ensure!(la.get(id).is_some_and(|&t| t > 0), "{id} missing: {la:?}");
    }
    Ok(())
}

/// Expects the sandbox's JSON echo: right sandbox, right forwarded path, no token upstream.
async fn echo(
    gw: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    sandbox: &str,
    forwarded_path: &str,
) -> Result<()> {
    let r = client::get(gw, path, headers).await?;
    ensure!(r.status == 200, "status {}: {}", r.status, r.text());
    let j: Value = serde_json::from_slice(&r.body).context("echo is not JSON")?;
    ensure!(j["sandbox"] == sandbox, "answered by {}", j["sandbox"]);
    ensure!(j["path"] == forwarded_path, "forwarded path {}", j["path"]);
    ensure!(
        j["headers"].get("x-access-token").is_none(),
        "token leaked upstream"
    );
    Ok(())
}

/// Expects the gateway's own JSON error reply.
async fn local_reply(gw: SocketAddr, id: &str, status: u16) -> Result<()> {
    let r = client::get(gw, "/", &[("x-sandbox-id", id)]).await?;
    ensure!(r.status == status, "status {}: {}", r.status, r.text());
    let j: Value = serde_json::from_slice(&r.body).context("error reply is not JSON")?;
    ensure!(j["error"].is_string(), "no error code in {j}");
    Ok(())
}

async fn sse(gw: SocketAddr) -> Result<()> {
    let r = client::get(gw, "/sse?n=5&interval_ms=50", &[("x-sandbox-id", "beta")]).await?;
    ensure!(r.status == 200, "status {}: {}", r.status, r.text());
    ensure!(
        r.header("content-type") == Some("text/event-stream"),
        "not an event stream"
    );
    let text = r.text();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(events.len() == 5, "{} events instead of 5", events.len());
    ensure!(
        events.iter().all(|e| e["sandbox"] == "beta"),
        "events not from beta"
    );
    Ok(())
}

async fn websocket(gw: SocketAddr) -> Result<()> {
    let mut req = format!("ws://{gw}/ws").into_client_request()?;
    req.headers_mut()
        .insert("x-sandbox-id", HeaderValue::from_static("alpha"));
    let timeout = Duration::from_secs(10);
    let (mut ws, _) =
        tokio::time::timeout(timeout, tokio_tungstenite::connect_async(req)).await??;
    ws.send(Message::text("whoami")).await?;
    let reply = tokio::time::timeout(timeout, ws.next())
        .await?
        .context("closed without a reply")??;
    let j: Value = serde_json::from_str(reply.to_text()?)?;
    ensure!(j["sandbox"] == "alpha", "answered by {}", j["sandbox"]);
    let _ = ws.close(None).await;
    Ok(())
}

/// A WebSocket client with nothing but python3: handshake, one masked text frame, one reply.
fn ws_command(gw: SocketAddr) -> String {
    let (ip, port) = (gw.ip(), gw.port());
    format!(
        r#"python3 -c 'import socket,os,base64; s=socket.create_connection(("{ip}",{port})); k=base64.b64encode(os.urandom(16)).decode(); s.sendall(("GET /ws HTTP/1.1\r\nHost: {ip}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "+k+"\r\nx-sandbox-id: alpha\r\n\r\n").encode()); print(s.recv(4096).decode().splitlines()[0]); m=os.urandom(4); p=b"whoami"; s.sendall(bytes([0x81,0x80|len(p)])+m+bytes(c^m[i%4] for i,c in enumerate(p))); h=s.recv(2); print(s.recv(h[1]).decode())'"#
    )
}

pub(crate) async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use sandbox_gateway_harness::gateway::bootstrap;

    /// The flags `make demo`, `make demo-check` and the README use.
    #[test]
    fn flags_as_make_passes_them() {
        Args::command().debug_assert();
        let parse = |argv: &[&str]| Args::try_parse_from(argv).map(|a| (a.check_only, a.mode));
        assert_eq!(parse(&["sandbox-demo"]).unwrap(), (false, Mode::Filter));
        assert_eq!(
            parse(&["sandbox-demo", "--mode", "filter"]).unwrap(),
            (false, Mode::Filter)
        );
        assert_eq!(
            parse(&["sandbox-demo", "--check-only"]).unwrap(),
            (true, Mode::Filter)
        );
        assert_eq!(
            parse(&["sandbox-demo", "--check-only", "--mode", "extproc"]).unwrap(),
            (true, Mode::Extproc)
        );
        assert_eq!(
            parse(&["sandbox-demo", "--check-only", "--mode", "cluster"]).unwrap(),
            (true, Mode::Cluster)
        );
        assert!(parse(&["sandbox-demo", "--mode", "other"]).is_err());
        assert!(parse(&["sandbox-demo", "--mode"]).is_err());
    }

    const HEADER: &str = "\
# The sandbox-gateway demo bootstrap: envoy/gateway.yaml.tmpl rendered for the local demo
# (admin 127.0.0.1:9901, listener 127.0.0.1:10000, routes from .demo/routes.json).
# Generated; do not edit below this header. Regenerate with
#   UPDATE_DEMO_YAML=1 cargo test -p sandbox-gateway-demo --bin sandbox-demo
# `make demo` runs it with local sandboxes. By hand, from the repo root (after `make build`):
#   ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/release .venv/bin/envoy -c envoy/demo.yaml --concurrency 1
";

    /// Drops the leading block of comment and blank lines. The template's own header names the
    /// placeholders, so rendering garbles it; demo.yaml carries its own header instead.
    fn without_header(yaml: &str) -> &str {
        let mut rest = yaml;
        while rest.starts_with('#') || rest.starts_with('\n') {
            rest = rest.split_once('\n').map_or("", |(_, r)| r);
        }
        rest
    }

    #[test]
    fn demo_yaml_is_the_rendered_template() {
        let rendered = bootstrap(&demo_filter_config(), 9901, 10000).unwrap();
        let rendered = without_header(&rendered);
        let path = repo_root().join(DEMO_YAML);
        if std::env::var_os("UPDATE_DEMO_YAML").is_some() {
            std::fs::write(&path, format!("{HEADER}\n{rendered}")).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(
            on_disk.starts_with("# "),
            "{DEMO_YAML} lost its header comment"
        );
        assert!(
            without_header(&on_disk) == rendered,
            "{DEMO_YAML} drifted from envoy/gateway.yaml.tmpl; regenerate it with \
             UPDATE_DEMO_YAML=1 cargo test -p sandbox-gateway-demo --bin sandbox-demo"
        );
    }
}
