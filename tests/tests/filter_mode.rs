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
