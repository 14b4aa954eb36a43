//! Pause and resume on the in-process API server and the test kubelet, with the real
//! WakeService over gRPC (bearer token): idle → Paused (pod deleted, marker on the Sandbox) →
//! wake → Ready with the same ID and token on a new pod; explicit pause through `spec.paused`
//! (traffic cannot wake it) and resume by clearing it; a standby refuses wakes; bad callers
//! change nothing.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use routing::contract::{SANDBOX_ID_LABEL, TOKEN_SHA256_ANNOTATION};
use sandbox_controller::context::{Config, Replicas, WakeEndpoint};
use sandbox_controller::crd::{PauseReason, Phase, Sandbox, PAUSED_BY_ANNOTATION, PAUSED_LABEL};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use sandbox_gateway_harness::extproc::{file_source, ExtProc};
use sandbox_gateway_proto::v1::wake_response::Result as WakeResult;
use sandbox_gateway_proto::v1::wake_service_client::WakeServiceClient;
use sandbox_gateway_proto::v1::WakeRequest;
use serde_json::json;
use support::*;

const ACTIVITY_TOKEN: &str = "pause-test-activity-token";
const WAKE_TOKEN: &str = "pause-test-wake-token-0123";

fn replica() -> ExtProc {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.json");
    std::fs::write(&routes, r#"{"sandboxes": []}"#).unwrap();
    let e = ExtProc::start_with_token(
        &json!({ "route_source": file_source(&routes) }),
        ACTIVITY_TOKEN,
    )
    .unwrap();
    std::mem::forget(dir);
    e
}

/// A WakeService listener on a free port, and its `http://` endpoint.
fn wake_endpoint() -> (WakeEndpoint, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let token = routing::bearer::BearerToken::new(WAKE_TOKEN).unwrap();
    (WakeEndpoint::new(l, Some(token)), url)
}

fn cfg(activity: Option<&ExtProc>, wake: WakeEndpoint) -> Config {
    Config {
        replicas: activity.map(|a| Replicas::Static(vec![a.activity_endpoint()])),
        activity_token: Some(ACTIVITY_TOKEN.into()),
        idle_interval: Duration::from_millis(300),
        query_timeout: Duration::from_secs(2),
        wake: Some(wake),
        ..Config::default()
    }
}

async fn wake(
    client: &kube::Client,
    url: &str,
    id: &str,
    token: Option<&str>,
) -> Result<WakeResult, tonic::Status> {
    let hash = marker_hash(client, id).await;
    wake_checked(url, id, token, &hash).await
}

/// A wake as a gateway sends it: with the token hash it checked.
async fn wake_checked(
    url: &str,
    id: &str,
    token: Option<&str>,
    hash: &str,
) -> Result<WakeResult, tonic::Status> {
    let token_sha256 = hash.to_string();
    let mut c = WakeServiceClient::connect(url.to_string()).await.unwrap();
    let mut req = tonic::Request::new(WakeRequest {
        sandbox_id: id.into(),
        requester: "test".into(),
        token_sha256,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let r = c.wake(req).await?.into_inner();
    Ok(WakeResult::try_from(r.result).unwrap())
}

/// The token hash on the marker of the Sandbox whose ID is `id` (empty when none), as a
/// gateway reads it.
async fn marker_hash(client: &kube::Client, id: &str) -> String {
    let all = Api::<Sandbox>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    all.items
        .iter()
        .find(|s| s.labels().get(PAUSED_LABEL).map(String::as_str) == Some(id))
        .and_then(|s| s.annotations().get(TOKEN_SHA256_ANNOTATION).cloned())
        .unwrap_or_default()
}

fn status(s: &Sandbox) -> &sandbox_controller::crd::SandboxStatus {
    s.status.as_ref().expect("status")
}

async fn pod(client: &kube::Client, name: &str) -> Option<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pauses_and_a_wake_resumes_with_the_same_id_and_token() {
    let a = replica();
    let (endpoint, url) = wake_endpoint();
    let s = stack(cfg(Some(&a), endpoint)).await;
    make_pool(
        &s.client,
        "p",
        2,
        json!({ "idleTimeout": "2s", "idlePolicy": "Pause" }),
    )
    .await;
    wait_warm(&s.client, "p", 2).await;
    make_sandbox(&s.client, "user", "p", json!({})).await;
    let ready = wait_phase(&s.client, "user", Phase::Ready).await;
    let id = status(&ready).sandbox_id.clone().unwrap();
    let token = token_of(&s.client, &ready).await;
    let old_pod = pod_name(&ready);
    let old_hash =
        pod(&s.client, &old_pod).await.unwrap().annotations()[TOKEN_SHA256_ANNOTATION].clone();

    // Silence: paused, not released. The pod is gone, the marker names the ID and token hash.
    let paused = wait_phase(&s.client, "user", Phase::Paused).await;
    let st = status(&paused);
    assert_eq!(st.pause_reason, Some(PauseReason::Idle));
    assert!(st.paused_at.is_some() && st.pod_name.is_none() && st.pod_uid.is_none());
    assert_eq!(st.sandbox_id.as_deref(), Some(id.as_str()));
    assert_eq!(paused.labels().get(PAUSED_LABEL), Some(&id));
    assert_eq!(
        paused.annotations().get(TOKEN_SHA256_ANNOTATION),
        Some(&old_hash)
    );
    assert_eq!(
        paused
            .annotations()
            .get(PAUSED_BY_ANNOTATION)
            .map(String::as_str),
        Some("Idle")
    );
    wait_gone(Api::<Pod>::namespaced(s.client.clone(), NS), &old_pod).await;
    let ready_cond = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready_cond.status.as_str(), ready_cond.reason.as_str()),
        ("False", "Paused")
    );

    // Bad callers change nothing.
    let e = wake(&s.client, &url, &id, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = wake(&s.client, &url, &id, Some("wrong-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = wake(&s.client, &url, "Not_An_Id", Some(WAKE_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        wake(&s.client, &url, "nosuchsandbox00", Some(WAKE_TOKEN))
            .await
            .unwrap(),
        WakeResult::NotFound
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("user")
        .await
        .unwrap();
    assert_eq!(
        status(&still).phase,
        Phase::Paused,
        "a refused wake resumed it"
    );

    // A gateway that checked the token against another hash (a forged marker) wakes nothing.
    let forged = "00".repeat(32);
    assert_eq!(
        wake_checked(&url, &id, Some(WAKE_TOKEN), &forged)
            .await
            .unwrap(),
        WakeResult::NotFound
    );
    // A wake resumes it: same ID, same token (Secret and hash), a new pod from the pool.
    assert_eq!(
        wake(&s.client, &url, &id, Some(WAKE_TOKEN)).await.unwrap(),
        WakeResult::Accepted
    );
    let resumed = wait_phase(&s.client, "user", Phase::Ready).await;
    let st = status(&resumed);
    assert_eq!(st.sandbox_id.as_deref(), Some(id.as_str()));
    assert_eq!(token_of(&s.client, &resumed).await, token);
    let new_pod = pod_name(&resumed);
    assert_ne!(new_pod, old_pod);
    let p = pod(&s.client, &new_pod).await.unwrap();
    assert_eq!(p.labels().get(SANDBOX_ID_LABEL), Some(&id));
    assert_eq!(
        p.annotations().get(TOKEN_SHA256_ANNOTATION),
        Some(&old_hash)
    );
    assert!(st.resumed_at.is_some());
    // Activity restarts at the resume, so the idle rule gives it a whole timeout again.
    assert_eq!(st.last_active_at, st.resumed_at);
    // A second wake (another gateway) finds it running and writes nothing.
    assert_eq!(
        wake(&s.client, &url, &id, Some(WAKE_TOKEN)).await.unwrap(),
        WakeResult::Running
    );
    // The marker goes once it runs (the status write comes first).
    let api = Api::<Sandbox>::namespaced(s.client.clone(), NS);
    let unmarked = tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(api, "user", |s: Option<&Sandbox>| {
            s.is_some_and(|s| !s.labels().contains_key(PAUSED_LABEL))
        }),
    )
    .await
    .expect("marker removed")
    .unwrap()
    .unwrap();
    assert!(!unmarked.annotations().contains_key(PAUSED_BY_ANNOTATION));
    assert_eq!(s.metrics.wakes.with_label_values(&["accepted"]).get(), 1);
    assert_eq!(
        s.metrics
            .wakes
            .with_label_values(&["unauthenticated"])
            .get(),
        2
    );
    assert_eq!(s.metrics.wake_seconds.get_sample_count(), 1);
    // It pauses again after another idle timeout: the cycle repeats.
    wait_phase(&s.client, "user", Phase::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_pause_holds_until_spec_paused_is_cleared() {
    let (endpoint, url) = wake_endpoint();
    let s = stack(cfg(None, endpoint)).await;
    make_pool(&s.client, "p", 1, json!({})).await;
    wait_warm(&s.client, "p", 1).await;
    make_sandbox(&s.client, "owner", "p", json!({})).await;
    let ready = wait_phase(&s.client, "owner", Phase::Ready).await;
    let id = status(&ready).sandbox_id.clone().unwrap();
    let api = Api::<Sandbox>::namespaced(s.client.clone(), NS);
    let set = |v: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(
                "owner",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": { "paused": v } })),
            )
            .await
            .unwrap();
        }
    };
    set(json!(true)).await;
    let paused = wait_phase(&s.client, "owner", Phase::Paused).await;
    assert_eq!(status(&paused).pause_reason, Some(PauseReason::Spec));
    assert_eq!(
        paused
            .annotations()
            .get(PAUSED_BY_ANNOTATION)
            .map(String::as_str),
        Some("Spec")
    );
    // Traffic cannot wake what its owner paused.
    assert_eq!(
        wake(&s.client, &url, &id, Some(WAKE_TOKEN)).await.unwrap(),
        WakeResult::PausedBySpec
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(&api.get("owner").await.unwrap()).phase,
        Phase::Paused
    );
    set(serde_json::Value::Null).await;
    let resumed = wait_phase(&s.client, "owner", Phase::Ready).await;
    assert_eq!(status(&resumed).sandbox_id.as_deref(), Some(id.as_str()));
    assert_ne!(pod_name(&resumed), pod_name(&ready));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_refuses_wakes() {
    init_tracing();
    let api = sandbox_gateway_apiserver::FakeApiServer::start()
        .await
        .unwrap();
    let client = api.client().unwrap();
    let (endpoint, url) = wake_endpoint();
    let metrics = Metrics::new().unwrap();
    let _ctl = spawn_controller(
        client.clone(),
        cfg(None, endpoint),
        metrics.clone(),
        Leadership::standby(),
    );
    let e = loop {
        match WakeServiceClient::connect(url.clone()).await {
            Ok(_) => {
                break wake(&client, &url, "abcdefgh", Some(WAKE_TOKEN))
                    .await
                    .unwrap_err()
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(metrics.wakes.with_label_values(&["not_leader"]).get(), 1);
}

/// A pool without warm pods whose sandboxes each get a volume `data` (claim `<sandbox>-data`)
/// mounted at `/data`; `extra` adds spec fields.
async fn volume_pool(client: &kube::Client, name: &str, extra: serde_json::Value) {
    let mut template = template();
    template["spec"]["containers"][0]["volumeMounts"] =
        json!([{ "name": "data", "mountPath": "/data" }]);
    let mut spec = json!({
        "template": template,
        "volumeClaimTemplates": [{
            "metadata": { "name": "data" },
            "spec": { "accessModes": ["ReadWriteOnce"],
                      "resources": { "requests": { "storage": "1Gi" } } },
        }],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    make_pool(client, name, 0, spec).await;
}

/// An HTTP/1.1 request with a body to the pod's own server (`/files` reads and writes the
/// volumes the test kubelet mounted).
async fn send(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_a_per_sandbox_volume_survive_a_pause() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use sandbox_gateway_harness::kubelet::KubeletOptions;
    let volumes = tempfile::tempdir().unwrap();
    let (endpoint, url) = wake_endpoint();
    let s = stack_with(
        cfg(None, endpoint),
        KubeletOptions {
            volume_root: Some(volumes.path().to_path_buf()),
            ..KubeletOptions::default()
        },
    )
    .await;
    volume_pool(&s.client, "vol", json!({})).await;
    make_sandbox(&s.client, "notes", "vol", json!({})).await;
    let ready = wait_phase(&s.client, "notes", Phase::Ready).await;
    let id = status(&ready).sandbox_id.clone().unwrap();
    let claim = Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), NS)
        .get("notes-data")
        .await
        .expect("the sandbox's claim");
    assert_eq!(
        claim.owner_references()[0].uid,
        ready.uid().unwrap(),
        "owned by the Sandbox"
    );
    let addr = |sbx: &Sandbox| {
        let ip = s.kubelet.ip_of(NS, &pod_name(sbx)).expect("pod runs");
        std::net::SocketAddr::from((ip, 8080))
    };
    let put = send(
        addr(&ready),
        "PUT",
        "/files?path=/data/notes.txt",
        "kept across a pause",
    )
    .await;
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");

    Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .patch(
            "notes",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": { "paused": true } })),
        )
        .await
        .unwrap();
    wait_phase(&s.client, "notes", Phase::Paused).await;
    wait_gone(
        Api::<Pod>::namespaced(s.client.clone(), NS),
        &pod_name(&ready),
    )
    .await;
    assert!(
        Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), NS)
            .get_opt("notes-data")
            .await
            .unwrap()
            .is_some(),
        "the volume outlives the pod"
    );
    assert_eq!(
        wake(&s.client, &url, &id, Some(WAKE_TOKEN)).await.unwrap(),
        WakeResult::PausedBySpec
    );
    Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .patch(
            "notes",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": { "paused": null } })),
        )
        .await
        .unwrap();
    let resumed = wait_phase(&s.client, "notes", Phase::Ready).await;
    assert_ne!(pod_name(&resumed), pod_name(&ready));
    let got = send(addr(&resumed), "GET", "/files?path=/data/notes.txt", "").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("kept across a pause"), "{got}");
    // Deleting the sandbox deletes its volume (owner cascade).
    Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .delete("notes", &Default::default())
        .await
        .unwrap();
    wait_gone(
        Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), NS),
        "notes-data",
    )
    .await;
}

/// A paused sandbox whose pool is deleted is released, and its paused marker goes with it (a
/// released sandbox is a 404 at the gateway, never a held wake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_paused_sandbox_removes_its_marker() {
    let (endpoint, _url) = wake_endpoint();
    let s = stack(cfg(None, endpoint)).await;
    make_pool(&s.client, "p", 1, json!({})).await;
    wait_warm(&s.client, "p", 1).await;
    make_sandbox(&s.client, "gone", "p", json!({})).await;
    wait_phase(&s.client, "gone", Phase::Ready).await;
    let api = Api::<Sandbox>::namespaced(s.client.clone(), NS);
    api.patch(
        "gone",
        &PatchParams::default(),
        &Patch::Merge(&json!({ "spec": { "paused": true } })),
    )
    .await
    .unwrap();
    let paused = wait_phase(&s.client, "gone", Phase::Paused).await;
    assert!(paused.labels().contains_key(PAUSED_LABEL));
    Api::<sandbox_controller::crd::SandboxPool>::namespaced(s.client.clone(), NS)
        .delete("p", &Default::default())
        .await
        .unwrap();
    let released = wait_phase(&s.client, "gone", Phase::Released).await;
    assert!(
        !released.labels().contains_key(PAUSED_LABEL),
        "a released sandbox kept its paused marker"
    );
    assert!(!released.annotations().contains_key(PAUSED_BY_ANNOTATION));
}

/// A PersistentVolumeClaim that already has a sandbox's claim name but is not that sandbox's (a
/// deleted namesake's, not collected yet) is never mounted: the claim waits, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namesakes_volume_is_never_handed_on() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let (endpoint, _url) = wake_endpoint();
    let s = stack(cfg(None, endpoint)).await;
    let foreign: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": "heir-data", "namespace": NS },
        "spec": { "accessModes": ["ReadWriteOnce"],
                  "resources": { "requests": { "storage": "1Gi" } } },
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), NS)
        .create(&Default::default(), &foreign)
        .await
        .unwrap();
    volume_pool(&s.client, "vol", json!({})).await;
    make_sandbox(&s.client, "heir", "vol", json!({})).await;
    let deadline = std::time::Instant::now() + WAIT;
    while s
        .metrics
        .reconcile_errors
        .with_label_values(&["sandbox", "volume_not_owned"])
        .get()
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the foreign claim was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sbx = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("heir")
        .await
        .unwrap();
    let st = sbx.status.unwrap_or_default();
    assert!(
        st.pod_name.is_none(),
        "a pod was built on someone else's volume"
    );
    let pods = pool_pods(&s.client, "vol").await;
    assert!(pods.is_empty(), "{} pods", pods.len());
}

/// Waits until the sandbox's status satisfies `f`.
async fn wait_status(
    client: &kube::Client,
    name: &str,
    what: &str,
    f: impl Fn(&sandbox_controller::crd::SandboxStatus) -> bool + Send + 'static,
) -> Sandbox {
    let api = Api::<Sandbox>::namespaced(client.clone(), NS);
    let cond = move |s: Option<&Sandbox>| s.and_then(|s| s.status.as_ref()).is_some_and(&f);
    tokio::time::timeout(WAIT, kube::runtime::wait::await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("sandbox {name}: never {what}"))
        .unwrap()
        .unwrap()
}

fn resume_failed(
    st: &sandbox_controller::crd::SandboxStatus,
) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    st.conditions
        .iter()
        .find(|c| c.type_ == "ResumeFailed")
        .expect("the ResumeFailed condition")
}

/// Signed, so the test can subtract two of them.
fn time_ms(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_millisecond()
}

/// A resume whose pod fails, then one whose pod never turns Ready, each pause the sandbox again
/// (never a release: its ID, token hash and volume stay), and each next resume waits out the
/// backoff; the third resume ends Ready with the file written before the first pause. Owned by
/// `spec.paused` being cleared, the resume is retried on its own: without the backoff that loop
/// would build a pod every few milliseconds, so the test also counts every pod ever built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resume_pauses_again_and_retries_after_a_backoff() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use sandbox_gateway_harness::kubelet::{KubeletOptions, PodFate};
    use std::sync::{Arc, Mutex};
    let volumes = tempfile::tempdir().unwrap();
    let fate = Arc::new(Mutex::new(PodFate::Ready));
    // Each pod the kubelet saw, with the time it first saw it.
    let seen: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let (f, log) = (Arc::clone(&fate), Arc::clone(&seen));
    let (endpoint, _url) = wake_endpoint();
    let s = stack_with(
        cfg(None, endpoint),
        KubeletOptions {
            volume_root: Some(volumes.path().to_path_buf()),
            fate: Arc::new(move |name: &str| {
                let now = jiff::Timestamp::now().as_millisecond();
                log.lock().unwrap().push((name.to_string(), now));
                *f.lock().unwrap()
            }),
            ..KubeletOptions::default()
        },
    )
    .await;
    let set_fate = |to: PodFate| *fate.lock().unwrap() = to;
    volume_pool(&s.client, "flaky", json!({ "startupTimeout": "2s" })).await;
    make_sandbox(&s.client, "work", "flaky", json!({})).await;
    let ready = wait_phase(&s.client, "work", Phase::Ready).await;
    let id = status(&ready).sandbox_id.clone().unwrap();
    let ip = s.kubelet.ip_of(NS, &pod_name(&ready)).unwrap();
    let put = send(
        (ip, 8080).into(),
        "PUT",
        "/files?path=/data/work.txt",
        "survives failed resumes",
    )
    .await;
    assert!(put.starts_with("HTTP/1.1 201"), "{put}");
    let api = Api::<Sandbox>::namespaced(s.client.clone(), NS);
    let paused = |v: serde_json::Value| {
        let api = api.clone();
        async move {
            let patch = json!({ "spec": { "paused": v } });
            api.patch("work", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    paused(json!(true)).await;
    wait_phase(&s.client, "work", Phase::Paused).await;
    let hash = api.get("work").await.unwrap().annotations()[TOKEN_SHA256_ANNOTATION].clone();

    // First resume: the pod fails. Paused again, nothing lost.
    set_fate(PodFate::Fail);
    paused(serde_json::Value::Null).await;
    let first = wait_status(&s.client, "work", "failed a resume", |st| {
        st.resume_failures == Some(1)
    })
    .await;
    // Before the next pod is built (the backoff is 5 s): it never turns Ready.
    set_fate(PodFate::NeverReady);
    let st = status(&first);
    let cond = resume_failed(st);
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "PodFailed")
    );
    assert!(
        matches!(st.phase, Phase::Pausing | Phase::Paused | Phase::Resuming),
        "{:?}",
        st.phase
    );
    assert_eq!(st.sandbox_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        first.labels().get(PAUSED_LABEL),
        Some(&id),
        "the marker stays: gateways keep holding"
    );
    assert_eq!(
        first.annotations().get(TOKEN_SHA256_ANNOTATION),
        Some(&hash)
    );
    let failed_at = time_ms(st.resume_failed_at.as_ref().unwrap());

    // Second resume, after the backoff: its pod misses the 2 s startup timeout.
    let second = wait_status(&s.client, "work", "failed twice", |st| {
        st.resume_failures == Some(2)
    })
    .await;
    set_fate(PodFate::Ready);
    let st = status(&second);
    let cond = resume_failed(st);
    assert_eq!(cond.reason, "StartupTimeout", "{}", cond.message);
    let failed_again_at = time_ms(st.resume_failed_at.as_ref().unwrap());
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "one pod per resume: {seen:?}");
        assert!(
            seen[2].1 - failed_at >= 5_000,
            "the second resume's pod came {} ms after the first failure (backoff 5 s)",
            seen[2].1 - failed_at
        );
        // Status times are whole seconds: read the failure as the end of its second.
        assert!(
            failed_again_at + 1_000 - seen[2].1 >= 2_000,
            "timed out {} ms after its pod was seen (startupTimeout 2 s)",
            failed_again_at + 1_000 - seen[2].1
        );
    }

    // Third resume, after a 10 s backoff: Ready, the file is there, the failure record gone.
    let resumed = wait_status(&s.client, "work", "resumed", |st| st.phase == Phase::Ready).await;
    let st = status(&resumed);
    assert_eq!(st.sandbox_id.as_deref(), Some(id.as_str()));
    assert!(
        st.resume_failures.is_none() && st.resume_failed_at.is_none(),
        "{st:?}"
    );
    assert!(
        st.conditions.iter().all(|c| c.type_ != "ResumeFailed"),
        "{:?}",
        st.conditions
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4, "four pods in all: {seen:?}");
        assert!(seen[3].1 - failed_again_at >= 10_000, "{seen:?}");
    }
    let ip = s.kubelet.ip_of(NS, &pod_name(&resumed)).unwrap();
    let got = send((ip, 8080).into(), "GET", "/files?path=/data/work.txt", "").await;
    assert!(got.ends_with("survives failed resumes"), "{got}");
    assert!(
        Api::<PersistentVolumeClaim>::namespaced(s.client.clone(), NS)
            .get_opt("work-data")
            .await
            .unwrap()
            .is_some()
    );
    let failures = |r: &str| s.metrics.resume_failures.with_label_values(&[r]).get();
    assert_eq!((failures("PodFailed"), failures("StartupTimeout")), (1, 1));
    assert_eq!(
        s.metrics.releases.with_label_values(&["PodFailed"]).get(),
        0,
        "a failed resume never releases"
    );
    // Each failed pod was deleted by the pause that followed.
    let left: Vec<String> = Api::<Pod>::namespaced(s.client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(left, vec![pod_name(&resumed)]);
}
