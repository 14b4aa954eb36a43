//! Shared cases about protocols: gRPC to a real tonic sandbox (unary, server streaming, errors in
//! trailers) and the gateway's own answers as gRPC statuses; an HTTP/2 client in front of an
//! HTTP/1.1-only sandbox; answers for a sandbox that refuses or resets connections.

use super::{expect_error, Starter, SECRET_SHA256};
use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandbox_gateway_harness::client;
use sandbox_gateway_harness::gateway::RouteEntry;
use sandbox_gateway_harness::grpc::{self, GrpcSandbox, StreamCall, UnaryRequest};
use sandbox_gateway_harness::refused::RefusedPort;
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde_json::{json, Value};
use std::net::SocketAddr;
use tonic::Code;

async fn unary(c: &mut grpc::Client, message: &str) -> Result<grpc::Reply, tonic::Status> {
    c.unary(UnaryRequest {
        message: message.into(),
    })
    .await
    .map(|r| r.into_inner())
}

fn expect_status(got: Result<grpc::Reply, tonic::Status>, code: Code, error: &str) -> Result<()> {
    let st = match got {
        Ok(r) => anyhow::bail!("want {code:?} {error}, got OK {r:?}"),
        Err(st) => st,
    };
    ensure!(
        st.code() == code && st.message().contains(error),
        "want {code:?} containing {error:?}, got {:?} {:?}",
        st.code(),
        st.message()
    );
    Ok(())
}

pub async fn grpc_through_the_gateway(start: &Starter) -> Result<()> {
    let g = GrpcSandbox::start("grpc-one", "127.0.0.1:0".parse()?).await?;
    let closed = RefusedPort::new()?;
    let gw = start(
        &[
            RouteEntry::new("grpc", g.addr),
            RouteEntry::new("grpc-later", g.addr).not_ready(),
            RouteEntry::new("grpc-token", g.addr).token_sha256(SECRET_SHA256),
            RouteEntry::new("grpc-down", closed.addr),
        ],
        json!({"miss_hold_ms": 100}),
    )?;
    let a = gw.addr();

    // Unary, both ways.
    let mut c = grpc::client(a, "grpc").await?;
    let r = unary(&mut c, "hi")
        .await
        .context("unary through the gateway")?;
    ensure!(r.message == "hi" && r.sandbox == "grpc-one", "{r:?}");
    expect_status(
        unary(&mut c, "fail").await,
        Code::FailedPrecondition,
        "refused",
    )?;

    // Server streaming: every message, then OK; or the messages, then an error in trailers.
    let mut s = c
        .stream(StreamCall {
            count: 5,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await? {
        got.push(m.index);
    }
    ensure!(got == [0, 1, 2, 3, 4], "stream: {got:?}");
    let mut s = c
        .stream(StreamCall {
            count: 2,
            fail_code: Code::Aborted as i32,
            fail_message: "stopped by the sandbox".into(),
        })
        .await?
        .into_inner();
    let mut n = 0;
    let end = loop {
        match s.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => break None,
            Err(st) => break Some(st),
        }
    };
    let end = end.context("the stream must end with the sandbox's error")?;
    ensure!(
        n == 2 && end.code() == Code::Aborted && end.message() == "stopped by the sandbox",
        "trailers error: {n} messages, {end:?}"
    );

    // The gateway's own answers, as gRPC statuses (never OK).
    let mut unknown = grpc::client(a, "grpc-nope").await?;
    expect_status(
        unary(&mut unknown, "x").await,
        Code::NotFound,
        "sandbox_not_found",
    )?;
    let mut bad = grpc::client(a, "Bad_Id").await?;
    expect_status(
        unary(&mut bad, "x").await,
        Code::InvalidArgument,
        "invalid_sandbox_id",
    )?;
    let mut token = grpc::client(a, "grpc-token").await?;
    expect_status(
        unary(&mut token, "x").await,
        Code::Unauthenticated,
        "missing_access_token",
    )?;
    let mut later = grpc::client(a, "grpc-later").await?;
    let st = later
        .unary(UnaryRequest {
            message: "x".into(),
        })
        .await
        .err()
        .context("a not-ready sandbox must not answer OK")?;
    ensure!(
        st.code() == Code::Unavailable && st.message().contains("sandbox_not_ready"),
        "{st:?}"
    );
    ensure!(
        st.metadata().get("grpc-retry-pushback-ms").is_some()
            && st.metadata().get("retry-after").is_some(),
        "retry information: {:?}",
        st.metadata()
    );
    // Envoy's own answer when the sandbox refuses the connection.
    let mut down = grpc::client(a, "grpc-down").await?;
    expect_status(
        unary(&mut down, "x").await,
        Code::Unavailable,
        "upstream_unavailable",
    )?;
    Ok(())
}

/// An HTTP/2 client (prior knowledge, as gRPC and many SDKs speak) reaching a sandbox that only
/// speaks HTTP/1.1: the gateway speaks HTTP/1.1 upstream for anything but gRPC.
pub async fn http2_client_reaches_an_http1_sandbox(start: &Starter) -> Result<()> {
    let h1 = SandboxServer::start_http1_only("h1-only", "127.0.0.1:0".parse()?).await?;
    let both = SandboxServer::start("h1-and-h2", "127.0.0.1:0".parse()?).await?;
    let gw = start(
        &[
            RouteEntry::new("old-server", h1.addr),
            RouteEntry::new("new-server", both.addr),
        ],
        json!({}),
    )?;
    for id in ["old-server", "new-server"] {
        let (status, body) = h2_get(gw.addr(), "/over-h2", id).await?;
        ensure!(status == 200, "{id}: {status} {body}");
        ensure!(
            body["version"] == "HTTP/1.1" && body["path"] == "/over-h2",
            "{id}: {body}"
        );
    }
    Ok(())
}

/// A sandbox that refuses connections, and one that closes them mid-request, get the gateway's JSON (HTTP)
/// rather than Envoy's plain text.
pub async fn upstream_failures_are_json(start: &Starter) -> Result<()> {
    let closed = RefusedPort::new()?;
    let resetter = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reset_addr = resetter.local_addr()?;
    // Reads the request, then closes without a byte of answer.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = resetter.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let gw = start(
        &[
            RouteEntry::new("refuses", closed.addr),
            RouteEntry::new("resets", reset_addr),
        ],
        json!({}),
    )?;
    for (id, what) in [
        ("refuses", "connection refused"),
        ("resets", "closed mid-request"),
    ] {
        let r = client::get(gw.addr(), "/", &[("x-sandbox-id", id)]).await?;
        expect_error(&r, 503, "upstream_unavailable").with_context(|| what.to_string())?;
        ensure!(
            r.json()["details"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: details say what Envoy saw: {}",
            r.text()
        );
    }
    Ok(())
}

/// One GET over HTTP/2 with prior knowledge (h2c); the body parsed as JSON.
async fn h2_get(gw: SocketAddr, path: &str, sandbox: &str) -> Result<(u16, Value)> {
    let tcp = tokio::net::TcpStream::connect(gw).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{gw}{path}"))
        .header("x-sandbox-id", sandbox)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
    Ok((status, v))
}
