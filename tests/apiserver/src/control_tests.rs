//! The fake API server's test controls and discovery, driven by the real `kube` client (and
//! kubectl, when installed): injected conflicts and errors, write counters, latency, watch lag,
//! discovery documents, registering resources.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchParams,
};
use serde_json::json;

use crate::store_tests::{api_err, next_raw, sandbox, sandboxes, setup};

#[tokio::test]
async fn injected_conflicts_and_errors_refuse_writes() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    s.inject_conflicts("sandboxes", 2);
    s.inject_errors("sandboxes.sandboxgateway.io", 1);
    let pp = PostParams::default();
    let obj = sandbox("a", json!({}));
    assert_eq!(
        api_err(api.create(&pp, &obj).await),
        (409, "Conflict".to_string())
    );
    assert_eq!(
        api_err(api.create(&pp, &obj).await),
        (409, "Conflict".to_string())
    );
    assert_eq!(
        api_err(api.create(&pp, &obj).await),
        (500, "InternalError".to_string())
    );
    assert!(
        s.list_objects("sandboxes").is_empty(),
        "refused writes apply nothing"
    );
    api.create(&pp, &obj).await.unwrap();
    // Reads are not affected; other resources neither.
    s.inject_conflicts("sandboxes", 1);
    api.get("a").await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "ns");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    cms.create(&pp, &cm).await.unwrap();
    let change = json!({"spec": {"image": "img:2"}});
    let patch = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&change))
        .await;
    assert_eq!(api_err(patch).0, 409);
    api.patch("a", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    let counts = s.write_counts();
    let sbx = counts["sandboxes.sandboxgateway.io"];
    assert_eq!((sbx.creates, sbx.patches, sbx.total()), (4, 2, 6));
    assert_eq!(counts["configmaps"].creates, 1);
}

#[tokio::test]
async fn watch_lag_delays_live_events_but_not_reads() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let wp = WatchParams::default().disable_bookmarks();
    let mut events = api
        .watch(&wp, &s.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.set_watch_lag(Duration::from_millis(400));
    let started = tokio::time::Instant::now();
    api.create(&PostParams::default(), &sandbox("a", json!({})))
        .await
        .unwrap();
    assert!(api.get("a").await.is_ok(), "reads are current");
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let early = tokio::time::timeout(Duration::from_millis(200), events.try_next()).await;
    assert!(early.is_err(), "no event before the lag: {early:?}");
    assert_eq!(next_raw(&mut events).await, "ADDED:a");
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Back to no lag: the next event comes at once.
    s.set_watch_lag(Duration::ZERO);
    s.set_latency(Duration::from_millis(100));
    let before = tokio::time::Instant::now();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(
        before.elapsed() >= Duration::from_millis(100),
        "latency applies to requests"
    );
    let ev = tokio::time::timeout(Duration::from_millis(300), next_raw(&mut events)).await;
    assert_eq!(ev.unwrap(), "DELETED:a");
}

#[tokio::test]
async fn discovery_names_the_registered_resources() {
    let (s, c) = setup().await;
    let core = c.list_core_api_versions().await.unwrap();
    assert_eq!(core.versions, ["v1"]);
    let v1 = c.list_core_api_resources("v1").await.unwrap();
    let names: Vec<&str> = v1.resources.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "pods",
        "pods/status",
        "secrets",
        "events",
        "services",
        "configmaps",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let groups = c.list_api_groups().await.unwrap();
    let group_names: Vec<&str> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    for want in [
        "coordination.k8s.io",
        "discovery.k8s.io",
        "events.k8s.io",
        "sandboxgateway.io",
    ] {
        assert!(group_names.contains(&want), "{want} in {group_names:?}");
    }
    let sg = c
        .list_api_group_resources("sandboxgateway.io/v1alpha1")
        .await
        .unwrap();
    let sg: Vec<(String, Option<Vec<String>>)> = sg
        .resources
        .into_iter()
        .map(|r| (r.name, r.short_names))
        .collect();
    assert!(
        sg.contains(&("sandboxpools/scale".to_string(), None)),
        "{sg:?}"
    );
    assert!(
        sg.contains(&("sandboxes".to_string(), Some(vec!["sbx".to_string()]))),
        "{sg:?}"
    );

    // kube's own discovery resolves the custom resources and their subresources.
    let d = kube::discovery::Discovery::new(c.clone())
        .run()
        .await
        .unwrap();
    let (res, caps) = d
        .resolve_gvk(&GroupVersionKind::gvk(
            "sandboxgateway.io",
            "v1alpha1",
            "SandboxPool",
        ))
        .unwrap();
    assert_eq!(res.plural, "sandboxpools");
    let subs: Vec<&str> = caps
        .subresources
        .iter()
        .map(|(r, _)| r.plural.as_str())
        .collect();
    assert!(
        subs.contains(&"scale") && subs.contains(&"status"),
        "{subs:?}"
    );

    // A resource tests register is served; an unknown one is a 404 Status.
    let widgets = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let api: Api<DynamicObject> = Api::all_with(c.clone(), &widgets);
    assert_eq!(
        api_err(api.list(&ListParams::default()).await),
        (404, "NotFound".to_string())
    );
    s.register_resource(crate::ResourceType::new(
        "example.com",
        "v1",
        "widgets",
        "Widget",
        false,
    ));
    let w: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    )
    .unwrap();
    api.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(s.list_objects("widgets").len(), 1);
    assert!(c.list_api_group_resources("example.com/v1").await.is_ok());
}

/// `kubectl get sbp,sbx` against the server, when kubectl is installed (skipped otherwise).
#[tokio::test]
async fn kubectl_gets_custom_resources_by_short_name() {
    let Ok(out) = std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
    else {
        eprintln!("kubectl not installed: skipped");
        return;
    };
    assert!(out.status.success());
    let (s, _c) = setup().await;
    s.apply_object(
        "sandboxes",
        json!({"metadata": {"name": "sbx-one", "namespace": "default"}}),
    );
    s.apply_object(
        "sandboxpools",
        json!({"metadata": {"name": "pool-one", "namespace": "default"}, "spec": {"replicas": 1}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kubeconfig");
    s.kubeconfig(&cfg).unwrap();
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&cfg)
        .args(["get", "sbp,sbx", "-o", "name"])
        .env("KUBECACHEDIR", dir.path().join("cache"))
        .env("HOME", dir.path())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sandboxpool.sandboxgateway.io/pool-one"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sandbox.sandboxgateway.io/sbx-one"),
        "{stdout}"
    );
}
