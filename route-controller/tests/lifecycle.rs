//! The controller against the in-process API server and the test kubelet, through the real
//! kube client: pools fill, claims bind with at most three writes, releases take the route away
//! first, and the invariants hold under conflicts and watch lag.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::join_all;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams};
use kube::ResourceExt;
use routing::contract::{
    token_sha256_hex, PORT_ANNOTATION, SANDBOX_ID_LABEL, TOKEN_SHA256_ANNOTATION,
};
use sandbox_controller::context::Config;
use sandbox_controller::crd::{Launch, Phase, ReleaseReason, Sandbox, SandboxPool};
use sandbox_controller::pods::sandbox_owner;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_fills_claim_binds_with_three_writes_and_delete_releases() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "py", 3, json!({})).await;
    let pool = wait_warm(&s.client, "py", 3).await;
    let st = pool.status.clone().unwrap();
    assert_eq!(st.selector.as_deref(), Some("sandboxgateway.io/pool=py"));
    for p in pool_pods(&s.client, "py").await {
        assert!(
            !p.labels().contains_key(SANDBOX_ID_LABEL),
            "a warm pod must never be routable: {:?}",
            p.labels()
        );
    }

    let counts = |api: &sandbox_gateway_apiserver::FakeApiServer| {
        ["secrets", "pods", "sandboxes"].map(|r| api.write_counts_for(r))
    };
    let before = counts(&s.api);
    make_sandbox(&s.client, "alice", "py", json!({})).await;
    let sbx = wait_phase(&s.client, "alice", Phase::Ready).await;
    let after = counts(&s.api);
    let st = sbx.status.clone().unwrap();
    let id = st.sandbox_id.clone().unwrap();
    assert!(routing::key::validate_id(id.as_bytes()).is_ok());
    assert_eq!(st.launch, Some(Launch::Warm));
    assert!(st.claimed_at.is_some() && st.ready_at.is_some());

    // The pod: labelled with the ID, the token's hash, owned by the Sandbox alone.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let pod = pods.get(&pod_name(&sbx)).await.unwrap();
    assert_eq!(pod.labels().get(SANDBOX_ID_LABEL), Some(&id));
    let token = token_of(&s.client, &sbx).await;
    assert_eq!(token.len(), 64);
    assert_eq!(
        pod.annotations().get(TOKEN_SHA256_ANNOTATION),
        Some(&token_sha256_hex(token.as_bytes()))
    );
    assert_eq!(
        pod.annotations().get(PORT_ANNOTATION).map(String::as_str),
        Some("8080")
    );
    assert_eq!(sandbox_owner(&pod), sbx.uid().as_deref());
    assert_eq!(pod.owner_references().len(), 1);
    // The kubelet really runs it.
    let ip = st.pod_ip.clone().unwrap();
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let body = get(addr, "/hello").await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    // Writes on the claim's path: the finalizer, then Secret, pod patch, status.
    let delta = |i: usize| {
        let (b, a) = (before[i], after[i]);
        (
            a.creates - b.creates,
            a.patches - b.patches + a.updates - b.updates,
        )
    };
    assert_eq!(delta(0), (1, 0), "one Secret");
    let (pod_creates, pod_patches) = delta(1);
    assert!(pod_patches >= 1, "the claim patch");
    // Pod creates are the pool's refill, not the claim; the kubelet's status patches are pods'.
    let _ = pod_creates;
    let sbx_writes = delta(2);
    assert_eq!(sbx_writes.0, 1, "the Sandbox itself");
    assert_eq!(
        sbx_writes.1, 2,
        "exactly two writes to the Sandbox: finalizer and status"
    );

    // The pool refills: three warm again, plus the claimed one.
    wait_counts(&s.client, "py", 3, 1).await;

    // Deletion: route first, then the object; the Secret goes with it.
    let sandboxes: Api<Sandbox> = Api::namespaced(s.client.clone(), NS);
    sandboxes
        .delete("alice", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(sandboxes.clone(), "alice").await;
    wait_gone(pods.clone(), &pod.name_any()).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), NS);
    wait_gone(secrets, st.token_secret.as_deref().unwrap()).await;
    let released = s
        .metrics
        .releases
        .with_label_values(&[ReleaseReason::Deleted.as_str()])
        .get();
    assert_eq!(released, 1);
    wait_counts(&s.client, "py", 3, 0).await;
    // The used pod never went back to the pool.
    assert!(pool_pods(&s.client, "py")
        .await
        .iter()
        .all(|p| p.uid() != pod.uid()));
}

/// 200 claims at once while the API server answers 409 to pod writes now and then: every
/// sandbox ends with exactly one pod, and no pod serves two sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_with_conflicts_never_share_a_pod() {
    const N: usize = 200;
    let s = stack(Config::default()).await;
    make_pool(&s.client, "burst", N as i32, json!({ "onEmpty": "Cold" })).await;
    wait_warm(&s.client, "burst", N as i32).await;
    s.api.inject_conflicts("pods", 40);
    join_all((0..N).map(|i| {
        make_sandbox(
            &s.client,
            Box::leak(format!("c{i}").into_boxed_str()),
            "burst",
            json!({}),
        )
    }))
    .await;
    let mut pod_of = HashMap::new();
    for i in 0..N {
        let sbx = wait_phase(&s.client, &format!("c{i}"), Phase::Ready).await;
        let st = sbx.status.unwrap();
        pod_of.insert(
            sbx.metadata.uid.unwrap(),
            (st.pod_uid.unwrap(), st.sandbox_id.unwrap()),
        );
    }
    let pods: Vec<Pod> = Api::<Pod>::namespaced(s.client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    // From the pods' side: each Sandbox owns exactly one live pod, the one its status names.
    let mut owned: HashMap<String, Vec<&Pod>> = HashMap::new();
    for p in &pods {
        if let Some(o) = sandbox_owner(p) {
            owned.entry(o.to_string()).or_default().push(p);
        }
    }
    assert_eq!(owned.len(), N, "every sandbox owns a pod");
    let mut ids = HashSet::new();
    for (sbx_uid, (pod_uid, id)) in &pod_of {
        let mine = &owned[sbx_uid];
        assert_eq!(mine.len(), 1, "sandbox {sbx_uid} owns {} pods", mine.len());
        assert_eq!(mine[0].uid().as_ref(), Some(pod_uid));
        assert_eq!(mine[0].labels().get(SANDBOX_ID_LABEL), Some(id));
        assert!(ids.insert(id.clone()), "ID {id} used twice");
    }
    let distinct: HashSet<_> = pod_of.values().map(|(p, _)| p.clone()).collect();
    assert_eq!(distinct.len(), N, "a pod serves two sandboxes");
    let conflicts: u64 = ["warm"]
        .iter()
        .map(|l| {
            s.metrics
                .claims
                .with_label_values(&["burst", l, "conflict"])
                .get()
        })
        .sum();
    assert!(conflicts > 0, "the injected conflicts were exercised");
}

/// Watch events arrive late: pods the controller created are not in its cache yet. It must
/// not create them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lag_never_over_creates() {
    let s = stack(Config::default()).await;
    s.api.set_watch_lag(Duration::from_millis(1500));
    make_pool(&s.client, "lag", 10, json!({})).await;
    wait_warm(&s.client, "lag", 10).await;
    // Several more reconciles while events still lag.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let creates = s.api.write_counts_for("pods").creates;
    assert_eq!(creates, 10, "created {creates} pods for a pool of 10");
    assert_eq!(pool_pods(&s.client, "lag").await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_releases_and_pool_deletion_releases() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "life", 1, json!({ "maxLifetime": "2s" })).await;
    wait_warm(&s.client, "life", 1).await;
    make_sandbox(&s.client, "short", "life", json!({})).await;
    let sbx = wait_phase(&s.client, "short", Phase::Ready).await;
    let pod = pod_name(&sbx);
    let sbx = wait_phase(&s.client, "short", Phase::Released).await;
    assert_eq!(
        sbx.status.unwrap().release_reason,
        Some(ReleaseReason::Expired)
    );
    wait_gone(Api::<Pod>::namespaced(s.client.clone(), NS), &pod).await;

    make_pool(&s.client, "doomed", 1, json!({})).await;
    wait_warm(&s.client, "doomed", 1).await;
    make_sandbox(&s.client, "orphan", "doomed", json!({})).await;
    let sbx = wait_phase(&s.client, "orphan", Phase::Ready).await;
    let pod = pod_name(&sbx);
    Api::<SandboxPool>::namespaced(s.client.clone(), NS)
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let sbx = wait_phase(&s.client, "orphan", Phase::Released).await;
    assert_eq!(
        sbx.status.unwrap().release_reason,
        Some(ReleaseReason::PoolDeleted)
    );
    wait_gone(Api::<Pod>::namespaced(s.client.clone(), NS), &pod).await;
}

/// A template change replaces the warm pods, never the claimed one, and the status shows the
/// rollout's progress until no outdated pod is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_replaces_warm_pods_and_never_claimed_ones() {
    let s = stack(Config::default()).await;
    make_pool(&s.client, "roll", 2, json!({})).await;
    let before = wait_warm(&s.client, "roll", 2).await;
    let old_hash = before.status.unwrap().template_hash.unwrap();
    make_sandbox(&s.client, "busy", "roll", json!({})).await;
    let busy = wait_phase(&s.client, "busy", Phase::Ready).await;
    wait_counts(&s.client, "roll", 2, 1).await;
    let claimed_uid = Api::<Pod>::namespaced(s.client.clone(), NS)
        .get(&pod_name(&busy))
        .await
        .unwrap()
        .uid();
    let old_warm: Vec<_> = pool_pods(&s.client, "roll")
        .await
        .into_iter()
        .filter(|p| p.uid() != claimed_uid)
        .map(|p| p.uid())
        .collect();
    Api::<SandboxPool>::namespaced(s.client.clone(), NS)
        .patch(
            "roll",
            &Default::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "template": { "spec": {
                "containers": [{ "name": "sandbox", "image": "example/sandbox:2" }] } } } })),
        )
        .await
        .unwrap();
    let api = Api::<SandboxPool>::namespaced(s.client.clone(), NS);
    let old = old_hash.clone();
    let done = move |p: Option<&SandboxPool>| {
        p.and_then(|p| p.status.as_ref()).is_some_and(|st| {
            st.template_hash.as_deref() != Some(old.as_str())
                && st.outdated == 0
                && st.replicas == 2
                && st.claimed == 1
        })
    };
    tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(api, "roll", done),
    )
    .await
    .expect("the rollout never finished")
    .unwrap();
    let pods = pool_pods(&s.client, "roll").await;
    assert!(
        pods.iter()
            .any(|p| p.uid() == claimed_uid && p.metadata.deletion_timestamp.is_none()),
        "the claimed pod was replaced"
    );
    for p in &pods {
        assert!(
            !old_warm.contains(&p.uid()),
            "an old warm pod survived the rollout"
        );
    }
    let cur = Api::<Sandbox>::namespaced(s.client.clone(), NS)
        .get("busy")
        .await
        .unwrap();
    assert_eq!(cur.status.unwrap().phase, Phase::Ready);
}
