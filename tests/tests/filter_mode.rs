//! End-to-end: the real Envoy 1.40 with libsandbox_gateway.so, real sockets, real WebSocket and
//! SSE clients. The cases live in `cases/` (shared across modes).

mod cases;

use sandbox_gateway_harness::envoy::{Envoy, EnvoyOptions};
use sandbox_gateway_harness::gateway::GatewayUnderTest;
use sandbox_gateway_harness::gateway::{bootstrap, write_routes, FilterGateway, RouteEntry};
use serde_json::{json, Value};

fn filter_mode(
    routes: &[RouteEntry],
    overrides: Value,
) -> anyhow::Result<Box<dyn GatewayUnderTest>> {
    Ok(Box::new(FilterGateway::start(routes, overrides)?))
}

cases::shared_cases!(filter_mode);

/// The Envoy process survives everything above and keeps its routes across reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_published() {
    let sb = sandboxes_one().await;
    let mut gw = FilterGateway::start(&[RouteEntry::new("alpha", sb.addr)], json!({})).unwrap();
    let a = gw.envoy.listener;
    for _ in 0..3 {
        let r = sandbox_gateway_harness::client::get(a, "/", &[("x-sandbox-id", "alpha")])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = sandbox_gateway_harness::client::get(a, "/", &[("x-sandbox-id", "Bad")])
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let e = &gw.envoy;
    assert_eq!(
        e.stat("dynamicmodulescustom.requests_routed").unwrap(),
        Some(3)
    );
    assert_eq!(
        e.stat("dynamicmodulescustom.local_replies.error.invalid_sandbox_id")
            .unwrap(),
        Some(1)
    );
    e.wait_stat("dynamicmodulescustom.routes", |v| v == 1)
        .unwrap();
    e.wait_stat("dynamicmodulescustom.route_reloads_ok", |v| v == 1)
        .unwrap();
    assert_eq!(e.stat("dynamicmodulescustom.panics").unwrap(), Some(0));
    assert!(gw.envoy.alive());
}

async fn sandboxes_one() -> sandbox_gateway_harness::sandbox::SandboxServer {
    sandbox_gateway_harness::sandbox::SandboxServer::start("one", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn rejected(filter_config: Value) -> String {
    let (status, log) = Envoy::expect_rejected(EnvoyOptions::sandboxes(
        bootstrap(&filter_config, 0, 0).unwrap(),
    ))
    .unwrap();
    assert!(
        !status.success(),
        "Envoy must refuse the config; log:\n{log}"
    );
    log
}

/// Bad module config: Envoy refuses to start, and the log names the problem.
#[test]
fn bad_config_is_rejected_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    write_routes(&routes, &[]).unwrap();
    let file = json!({"type": "file", "path": routes});

    let log = rejected(json!({"route_source": file, "bogus_field": 1}));
    assert!(
        log.contains("bogus_field"),
        "log should name the field:\n{log}"
    );
    let log = rejected(json!({"route_source": file, "miss_hold_ms": "soon"}));
    assert!(
        log.contains("miss_hold_ms"),
        "log should name the field:\n{log}"
    );
    let log = rejected(json!({"route_source": file, "host_domains": ["UPPER.case"]}));
    assert!(log.contains("host_domains"), "{log}");
    let log = rejected(
        json!({"route_source": {"type": "file", "path": dir.path().join("missing.json")}}),
    );
    assert!(log.contains("missing.json"), "{log}");
    std::fs::write(
        &routes,
        r#"{"sandboxes": [{"id": "x", "ip": "127.0.0.1"}]}"#,
    )
    .unwrap();
    let log = rejected(json!({"route_source": file}));
    assert!(log.contains("port"), "{log}");
}

/// Reads one HTTP/1.1 response with a `content-length` body (not waiting for the connection to
/// close: Envoy may keep it open while the rest of the request body is still owed).
async fn read_one_response(
    c: &mut tokio::net::TcpStream,
) -> sandbox_gateway_harness::client::Response {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return sandbox_gateway_harness::client::parse(&buf[..end + 4 + len]).unwrap();
            }
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), c.read(&mut chunk))
            .await
            .expect("response timed out")
            .unwrap();
        assert!(n > 0, "connection closed before a whole response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Envoy re-enters the module. Measured on 1.40: a local reply sent from the `scheduled` hook
/// (a miss hold ending in 404) runs `stream_complete` inside `send_response`, with `scheduled`
/// still on the stack; a reply from `request_headers` does not, and Envoy skips the module's
/// response hooks after its own local reply. Hooks only ever share the filter, so this is
/// sound; the module counts re-entries (the test proves it drove one) and panics (none). With
/// a hook that takes the filter exclusively (as every hook of the old binding did), the slot
/// guard turns that re-entry into a counted panic and this test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_reenter_the_filter_without_a_panic() {
    use tokio::io::AsyncWriteExt;
    let sb = sandboxes_one().await;
    let mut gw = FilterGateway::start(
        &[RouteEntry::new("alpha", sb.addr)],
        json!({"miss_hold_ms": 50}),
    )
    .unwrap();
    let a = gw.envoy.listener;
    for (id, status) in [("Bad_Id", 400), ("unknown", 404)] {
        let mut c = tokio::net::TcpStream::connect(a).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: gateway.test\r\nx-sandbox-id: {id}\r\n\
             content-type: application/octet-stream\r\ncontent-length: 262144\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&[b'x'; 16384]).await.unwrap();
        let r = read_one_response(&mut c).await;
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.json()["error"].is_string());
        // The rest of the body after the reply: Envoy may take it or reset; either is fine.
        let _ = c.write_all(&[b'y'; 65536]).await;
    }
    let e = &mut gw.envoy;
    let reentries = e
        .wait_stat("dynamicmodulescustom.hook_reentries", |v| v >= 1)
        .unwrap();
    assert!(
        reentries >= 1,
        "the 404 sent from `scheduled` re-entered the filter"
    );
    assert_eq!(e.stat("dynamicmodulescustom.panics").unwrap(), Some(0));
    // Still serving.
    let r = sandbox_gateway_harness::client::get(a, "/", &[("x-sandbox-id", "alpha")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(e.alive());
}
