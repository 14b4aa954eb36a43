//! Against a real cluster from the current kubeconfig (not run by `make test`; there is no
//! cluster here). Needs the CRDs installed (`kubectl apply --server-side -f
//! deploy/crds/sandboxgateway.io.yaml`) and permission to manage pods, Secrets and the CRDs in a
//! scratch namespace:
//!
//! ```text
//! SANDBOX_TEST_NAMESPACE=sbx-test cargo test -p sandbox-gateway-controller \
//!   --test real_cluster -- --ignored --nocapture
//! ```
//!
//! It runs the controller in-process (no leader election, that namespace only), creates a pool
//! of one `python:3.12-slim` pod serving HTTP on 8080 (override with SANDBOX_TEST_IMAGE), claims
//! it, checks the pod's route label and token hash, deletes the Sandbox and checks the pod is
//! gone and the pool refilled, then deletes the pool.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::ResourceExt;
use routing::contract::SANDBOX_ID_LABEL;
use sandbox_controller::context::Config;
use sandbox_controller::crd::{Phase, Sandbox, SandboxPool};
use sandbox_controller::leader::Leadership;
use sandbox_controller::metrics::Metrics;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster in the current kubeconfig, with the CRDs installed"]
async fn claim_and_release_on_a_real_cluster() {
    let ns = std::env::var("SANDBOX_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let image = std::env::var("SANDBOX_TEST_IMAGE").unwrap_or_else(|_| "python:3.12-slim".into());
    let client = kube::Client::try_default()
        .await
        .expect("a kubeconfig (or in-cluster credentials)");
    let pools: Api<SandboxPool> = Api::namespaced(client.clone(), &ns);
    pools.list(&Default::default()).await.expect(
        "the SandboxPool CRD is not installed: kubectl apply --server-side -f \
         deploy/crds/sandboxgateway.io.yaml",
    );
    let cfg = Config {
        namespace: Some(ns.clone()),
        ..Config::default()
    };
    let (c, m) = (client.clone(), Metrics::new().unwrap());
    let ctl = tokio::spawn(async move {
        let _ = sandbox_controller::run::run(c, cfg, m, Arc::new(Leadership::always())).await;
    });

    let pool: SandboxPool = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "SandboxPool",
        "metadata": { "name": "real-cluster-test", "namespace": ns },
        "spec": { "replicas": 1, "port": 8080, "startupTimeout": "5m", "template": { "spec": {
            "containers": [{ "name": "sandbox", "image": image,
                "command": ["python", "-m", "http.server", "8080"],
                "readinessProbe": { "tcpSocket": { "port": 8080 } } }] } } }
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let warm = |n: i32| {
        move |p: Option<&SandboxPool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.replicas == n)
        }
    };
    tokio::time::timeout(
        WAIT,
        await_condition(pools.clone(), "real-cluster-test", warm(1)),
    )
    .await
    .expect("the pool never had a warm pod")
    .unwrap();

    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let sbx: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": { "name": "real-cluster-test", "namespace": ns },
        "spec": { "poolRef": "real-cluster-test" }
    }))
    .unwrap();
    sandboxes
        .create(&PostParams::default(), &sbx)
        .await
        .unwrap();
    let ready = |s: Option<&Sandbox>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.phase == Phase::Ready)
    };
    let sbx = tokio::time::timeout(
        WAIT,
        await_condition(sandboxes.clone(), "real-cluster-test", ready),
    )
    .await
    .expect("never Ready")
    .unwrap()
    .unwrap();
    let st = sbx.status.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods.get(st.pod_name.as_deref().unwrap()).await.unwrap();
    assert_eq!(pod.labels().get(SANDBOX_ID_LABEL), st.sandbox_id.as_ref());
    eprintln!(
        "claimed {} on pod {} ({:?})",
        st.sandbox_id.unwrap(),
        pod.name_any(),
        st.pod_ip
    );

    sandboxes
        .delete("real-cluster-test", &DeleteParams::default())
        .await
        .unwrap();
    let gone = |s: Option<&Sandbox>| s.is_none();
    tokio::time::timeout(
        WAIT,
        await_condition(sandboxes.clone(), "real-cluster-test", gone),
    )
    .await
    .expect("the Sandbox was never deleted")
    .unwrap();
    tokio::time::timeout(
        WAIT,
        await_condition(pools.clone(), "real-cluster-test", warm(1)),
    )
    .await
    .expect("the pool never refilled")
    .unwrap();
    pools
        .delete("real-cluster-test", &DeleteParams::default())
        .await
        .unwrap();
    ctl.abort();
}
