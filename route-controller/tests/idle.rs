//! Idle reclaim against real sandbox-extproc replicas (the binary, over gRPC with its bearer
//! token): activity on any one replica keeps a sandbox, silence releases it no earlier than its
//! idle timeout, and a replica that is unreachable or dropped entries blocks every idle release.
//! Needs `cargo build -p sandbox-gateway-extproc` (make test builds it first).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use sandbox_controller::context::{Config, Replicas};
use sandbox_controller::crd::{Phase, ReleaseReason, Sandbox};
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_harness::refused::RefusedPort;
use sandbox_gateway_proto::v1::activity_service_client::ActivityServiceClient;
use sandbox_gateway_proto::v1::{ReportRequest, SandboxActivity};
use serde_json::json;
use support::*;

const TOKEN: &str = "idle-test-token-0123456789";

fn replica() -> ExtProc {
    // No routes of its own: this replica only aggregates reports.
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"sandboxes": []}"#).unwrap();
    let cfg = json!({ "route_source": file_source(&routes) });
    let e = ExtProc::start_with_token(&cfg, TOKEN).unwrap();
    std::mem::forget(dir);
    e
}

fn now_ms() -> u64 {
    sandbox_controller::context::now_ms()
}

/// Reports `ids` as active now to one replica (one batch on one Report stream).
async fn report(endpoint: &str, ids: &[&str]) {
    let mut c = ActivityServiceClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let now = now_ms();
    let batch = ReportRequest {
        reporter: "test".into(),
        full_snapshot: false,
        entries: ids
            .iter()
            .map(|id| SandboxActivity {
                sandbox_id: id.to_string(),
                last_active_ms: now,
            })
            .collect(),
    };
    let mut req = tonic::Request::new(futures_util::stream::iter(vec![batch]));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    c.report(req).await.unwrap();
}

fn cfg(endpoints: Vec<String>) -> Config {
    Config {
        replicas: Some(Replicas::Static(endpoints)),
        activity_token: Some(TOKEN.into()),
        idle_interval: Duration::from_millis(300),
        query_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

async fn claimed(s: &Stack, pool: &str, idle: &str) -> (Sandbox, String) {
    make_pool(&s.client, pool, 1, json!({ "idleTimeout": idle })).await;
    wait_warm(&s.client, pool, 1).await;
    make_sandbox(&s.client, "user", pool, json!({})).await;
    let sbx = wait_phase(&s.client, "user", Phase::Ready).await;
    let id = sbx.status.as_ref().unwrap().sandbox_id.clone().unwrap();
    (sbx, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_on_any_replica_keeps_it_and_silence_releases_it_no_earlier_than_the_timeout() {
    let (a, b) = (replica(), replica());
    let s = stack(cfg(vec![a.activity_endpoint(), b.activity_endpoint()])).await;
    let (sbx, id) = claimed(&s, "idle", "3s").await;
    // Twice the idle timeout of traffic, seen by replica B only.
    let until = Instant::now() + Duration::from_secs(6);
    let mut last_report = now_ms();
    while Instant::now() < until {
        report(&b.activity_endpoint(), &[&id]).await;
        last_report = now_ms();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cur = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("user")
        .await
        .unwrap();
    assert_eq!(
        cur.status.as_ref().unwrap().phase,
        Phase::Ready,
        "released while in use"
    );
    assert!(s.metrics.idle_passes.with_label_values(&["sighted"]).get() > 5);
    // Silence: released, but never before the timeout has passed since the last activity.
    let released = wait_phase(&s.client, "user", Phase::Released).await;
    let at = now_ms();
    assert!(
        at >= last_report + 3_000,
        "released {} ms after the last activity",
        at - last_report
    );
    assert_eq!(
        released.status.unwrap().release_reason,
        Some(ReleaseReason::Idle)
    );
    wait_gone(
        Api::<Pod>::namespaced(s.client.clone(), NS),
        &pod_name(&sbx),
    )
    .await;
    wait_warm(&s.client, "idle", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_blocks_every_idle_release() {
    let a = replica();
    // The second replica is listed but nothing listens there.
    let dead_port = RefusedPort::new().unwrap();
    let dead = format!("http://{}", dead_port.addr);
    let s = stack(cfg(vec![a.activity_endpoint(), dead])).await;
    let (_sbx, _id) = claimed(&s, "blind", "2s").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cur = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("user")
        .await
        .unwrap();
    assert_eq!(cur.status.as_ref().unwrap().phase, Phase::Ready);
    assert_eq!(s.metrics.releases.with_label_values(&["Idle"]).get(), 0);
    let blind = s
        .metrics
        .idle_passes
        .with_label_values(&["replica_unreachable"])
        .get();
    assert!(blind >= 5, "{blind} blind passes");
    assert_eq!(
        s.metrics.idle_passes.with_label_values(&["sighted"]).get(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dropping_entries_blocks_idle_releases_while_it_drops() {
    // A replica that can hold one sandbox: every other reported ID evicts one.
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"sandboxes": []}"#).unwrap();
    let small = ExtProc::start_with_args_and_token(
        &json!({ "route_source": file_source(&routes) }),
        &["--max-sandboxes", "1"],
        TOKEN,
    )
    .unwrap();
    let s = stack(cfg(vec![small.activity_endpoint()])).await;
    let (_sbx, _id) = claimed(&s, "evict", "2s").await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while Instant::now() < until {
        report(&small.activity_endpoint(), &[&format!("junk{n}")]).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cur = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("user")
        .await
        .unwrap();
    assert_eq!(
        cur.status.as_ref().unwrap().phase,
        Phase::Ready,
        "released while the only replica was losing data"
    );
    assert!(
        s.metrics
            .idle_passes
            .with_label_values(&["replica_evicted"])
            .get()
            > 0
    );
    // Once it stops dropping, the rule applies again.
    let released = wait_phase(&s.client, "user", Phase::Released).await;
    assert_eq!(
        released.status.unwrap().release_reason,
        Some(ReleaseReason::Idle)
    );
}

fn slice(port: u16, unready: bool) -> serde_json::Value {
    let mut endpoints =
        vec![json!({ "addresses": ["127.0.0.1"], "conditions": { "ready": true } })];
    if unready {
        // A terminating replica: it may still hold the only copy of some gateway's reports.
        endpoints.push(json!({ "addresses": ["127.0.0.2"],
            "conditions": { "ready": false, "serving": true, "terminating": true } }));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "sandbox-extproc-abc12", "namespace": NS,
            "labels": { "kubernetes.io/service-name": "sandbox-extproc" } },
        "addressType": "IPv4",
        "ports": [{ "name": "activity", "port": port }],
        "endpoints": endpoints,
    })
}

/// The replicas come from the headless Service's EndpointSlices: every endpoint is asked, and
/// one that is not ready (here: terminating) makes every pass blind until it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_are_followed_and_an_unready_replica_blocks_idle_releases() {
    let a = replica();
    let port = a.activity.port();
    let s = stack(Config {
        replicas: Some(Replicas::Service {
            namespace: NS.into(),
            name: "sandbox-extproc".into(),
            port,
        }),
        ..cfg(vec![])
    })
    .await;
    s.api.apply_object("endpointslices", slice(port, true));
    let (_sbx, _id) = claimed(&s, "slices", "2s").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cur = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("user")
        .await
        .unwrap();
    assert_eq!(cur.status.as_ref().unwrap().phase, Phase::Ready);
    assert!(
        s.metrics
            .idle_passes
            .with_label_values(&["replica_unreachable"])
            .get()
            > 3
    );
    assert_eq!(
        s.metrics.idle_passes.with_label_values(&["sighted"]).get(),
        0
    );
    // The terminating replica is gone from the slice: the pass sees, and releases.
    s.api.apply_object("endpointslices", slice(port, false));
    let released = wait_phase(&s.client, "user", Phase::Released).await;
    assert_eq!(
        released.status.unwrap().release_reason,
        Some(ReleaseReason::Idle)
    );
    assert!(s.metrics.idle_passes.with_label_values(&["sighted"]).get() > 0);
}
