//! Bad input and interference: each gets a clear condition (and Event), changes nothing else,
//! and never stops the controller.

mod support;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams};
use kube::ResourceExt;
use routing::contract::SANDBOX_ID_LABEL;
use sandbox_controller::context::Config;
use sandbox_controller::crd::{Phase, ReleaseReason, Sandbox, SandboxPool};
use serde_json::json;
use std::time::Duration;
use support::*;

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

async fn wait_sandbox_condition(s: &Stack, name: &str, type_: &'static str) -> Sandbox {
    let api = Api::<Sandbox>::namespaced(s.client.clone(), NS);
    let cond = move |o: Option<&Sandbox>| {
        o.and_then(|o| o.status.as_ref())
            .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == type_))
    };
    tokio::time::timeout(WAIT, kube::runtime::wait::await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("{name} never got condition {type_}"))
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_template_is_a_condition_and_creates_no_pods() {
    let s = stack(Config::default()).await;
    let routable = json!({
        "metadata": { "labels": { SANDBOX_ID_LABEL: "everyone" } },
        "spec": { "containers": [{ "name": "x", "image": "example/x:1" }] }
    });
    make_pool(&s.client, "bad", 3, json!({ "template": routable })).await;
    let api = Api::<SandboxPool>::namespaced(s.client.clone(), NS);
    let cond = |p: Option<&SandboxPool>| {
        p.and_then(|p| p.status.as_ref())
            .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "TemplateInvalid"))
    };
    let pool = tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(api.clone(), "bad", cond),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    let st = pool.status.unwrap();
    let c = condition(&st.conditions, "TemplateInvalid").unwrap();
    assert_eq!(c.status, "True");
    assert!(c.message.contains(SANDBOX_ID_LABEL), "{}", c.message);
    assert_eq!(condition(&st.conditions, "Ready").unwrap().status, "False");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.api.write_counts_for("pods").creates, 0);
    assert!(pool_pods(&s.client, "bad").await.is_empty());
    // Fixing the template clears the condition and fills the pool.
    api.patch(
        "bad",
        &Default::default(),
        &kube::api::Patch::Merge(json!({ "spec": { "template": {
            "metadata": { "labels": { SANDBOX_ID_LABEL: null } }
        } } })),
    )
    .await
    .unwrap();
    let pool = wait_warm(&s.client, "bad", 3).await;
    assert!(condition(&pool.status.unwrap().conditions, "TemplateInvalid").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pool_and_a_bad_override_wait_with_a_condition() {
    let s = stack(Config::default()).await;
    make_sandbox(&s.client, "early", "later", json!({})).await;
    let sbx = wait_sandbox_condition(&s, "early", "PoolMissing").await;
    assert_eq!(sbx.status.unwrap().phase, Phase::Pending);
    make_sandbox(&s.client, "silly", "later", json!({ "idleTimeout": "1ms" })).await;
    // The pool appears: the first claims, the second stays Pending with Invalid.
    make_pool(&s.client, "later", 2, json!({})).await;
    let ok = wait_phase(&s.client, "early", Phase::Ready).await;
    assert!(condition(&ok.status.unwrap().conditions, "PoolMissing").is_none());
    let bad = wait_sandbox_condition(&s, "silly", "Invalid").await;
    let st = bad.status.unwrap();
    assert_eq!(st.phase, Phase::Pending);
    assert!(st.pod_name.is_none() && st.sandbox_id.is_none());
    let msg = &condition(&st.conditions, "Invalid").unwrap().message;
    assert!(msg.contains("spec.idleTimeout"), "{msg}");
    // Nothing was written for it: one Secret (early's) in all.
    assert_eq!(s.api.write_counts_for("secrets").creates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_by_someone_else_releases_its_sandbox_and_the_pool_refills() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "p", 1, json!({})).await;
    wait_warm(&s.client, "p", 1).await;
    make_sandbox(&s.client, "victim", "p", json!({})).await;
    let sbx = wait_phase(&s.client, "victim", Phase::Ready).await;
    Api::<Pod>::namespaced(s.client.clone(), NS)
        .delete(&pod_name(&sbx), &DeleteParams::default())
        .await
        .unwrap();
    let sbx = wait_phase(&s.client, "victim", Phase::Released).await;
    assert_eq!(
        sbx.status.unwrap().release_reason,
        Some(ReleaseReason::PodFailed)
    );
    wait_warm(&s.client, "p", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_token_secret_is_a_condition_and_the_sandbox_keeps_running() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "p", 1, json!({})).await;
    wait_warm(&s.client, "p", 1).await;
    make_sandbox(&s.client, "keep", "p", json!({})).await;
    let sbx = wait_phase(&s.client, "keep", Phase::Ready).await;
    let secret = sbx.status.as_ref().unwrap().token_secret.clone().unwrap();
    Api::<Secret>::namespaced(s.client.clone(), NS)
        .delete(&secret, &DeleteParams::default())
        .await
        .unwrap();
    let after = wait_sandbox_condition(&s, "keep", "TokenMissing").await;
    let st = after.status.unwrap();
    assert_eq!(st.phase, Phase::Ready);
    let pod = Api::<Pod>::namespaced(s.client.clone(), NS)
        .get(&pod_name(&sbx))
        .await
        .unwrap();
    assert_eq!(pod.labels().get(SANDBOX_ID_LABEL), st.sandbox_id.as_ref());
    assert!(pod.metadata.deletion_timestamp.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_errors_during_claims_are_retried() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "p", 5, json!({})).await;
    wait_warm(&s.client, "p", 5).await;
    s.api.inject_errors("pods", 3);
    s.api.inject_errors("secrets", 2);
    for i in 0..5 {
        make_sandbox(&s.client, &format!("r{i}"), "p", json!({})).await;
    }
    for i in 0..5 {
        wait_phase(&s.client, &format!("r{i}"), Phase::Ready).await;
    }
    let errors: u64 = ["kube"]
        .iter()
        .map(|e| {
            s.metrics
                .reconcile_errors
                .with_label_values(&["sandbox", e])
                .get()
        })
        .sum();
    assert!(errors > 0, "the injected errors were seen");
}

/// A cold claim whose status write fails after its pod was built: the retry records that pod
/// (the sandbox owns it and it carries the drawn ID) instead of building a second one, which
/// would give one sandbox two pods (and, with volumes, two writers on one claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_status_write_failed_adopts_its_pod() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "cold", 0, json!({ "onEmpty": "Cold" })).await;
    // Created with the finalizer already on, so the claim's status write is the reconcile's
    // first write to a Sandbox, and the injected error hits exactly it.
    s.api.inject_errors("sandboxes", 1);
    s.api.apply_object(
        "sandboxes",
        json!({
            "apiVersion": "sandboxgateway.io/v1alpha1",
            "kind": "Sandbox",
            "metadata": { "name": "retry", "namespace": NS,
                          "finalizers": [sandbox_controller::crd::FINALIZER] },
            "spec": { "poolRef": "cold" },
        }),
    );
    let ready = wait_phase(&s.client, "retry", Phase::Ready).await;
    let failed = s
        .metrics
        .reconcile_errors
        .with_label_values(&["sandbox", "kube"])
        .get();
    assert_eq!(failed, 1, "the injected error hit the claim");
    let writes = s.api.write_counts();
    assert_eq!(writes["pods"].creates, 1, "one pod built: {writes:?}");
    let pods = Api::<Pod>::namespaced(s.client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1);
    assert_eq!(pods.items[0].name_any(), pod_name(&ready));
    assert_eq!(
        pods.items[0].labels().get(SANDBOX_ID_LABEL),
        ready.status.as_ref().unwrap().sandbox_id.as_ref()
    );
}
