//! The generic object store driven by the real `kube` client: CRUD of custom and built-in
//! resources, preconditions, patches, subresources, finalizers, owner cascade, watchers,
//! injected faults, watch lag and discovery.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions, WatchEvent, WatchParams,
};
use kube::runtime::watcher::{self, Event};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::FakeApiServer;

pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) fn ar(kind: &str, plural: &str) -> ApiResource {
    let gvk = GroupVersionKind::gvk("sandboxgateway.io", "v1alpha1", kind);
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

pub(super) async fn setup() -> (FakeApiServer, kube::Client) {
    let s = FakeApiServer::start().await.unwrap();
    let c = s.client().unwrap();
    (s, c)
}

pub(super) fn sandboxes(c: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(c.clone(), "ns", &ar("Sandbox", "sandboxes"))
}

pub(super) fn sandbox(name: &str, labels: Value) -> DynamicObject {
    let v = json!({
        "apiVersion": "sandboxgateway.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "labels": labels},
        "spec": {"image": "img:1"},
    });
    serde_json::from_value(v).unwrap()
}

/// The API error a kube call failed with: (code, reason).
pub(super) fn api_err<T: std::fmt::Debug>(r: kube::Result<T>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("want an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn custom_resource_crud_with_generate_name_and_stale_replace() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let mut obj = sandbox("", json!({}));
    obj.metadata.name = None;
    obj.metadata.generate_name = Some("sbx-".into());
    obj.data["status"] = json!({"phase": "Ready"});
    let created = api.create(&PostParams::default(), &obj).await.unwrap();
    let name = created.name_any();
    assert!(name.starts_with("sbx-") && name.len() == 9, "{name}");
    assert!(created.uid().is_some() && created.resource_version().is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.metadata.namespace.as_deref(), Some("ns"));
    assert!(created.data.get("status").is_none(), "create drops status");
    // A second generated name differs.
    let other = api.create(&PostParams::default(), &obj).await.unwrap();
    assert_ne!(other.name_any(), name);

    let got = api.get(&name).await.unwrap();
    assert_eq!(got.data["spec"]["image"], "img:1");
    assert_eq!(got.uid(), created.uid());
    // An object read back carries a resourceVersion, which a create must not.
    assert_eq!(
        api_err(api.create(&PostParams::default(), &got).await).0,
        400
    );
    let mut again = got.clone();
    again.metadata.resource_version = None;
    let (code, reason) = api_err(api.create(&PostParams::default(), &again).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut next = got.clone();
    next.data["spec"]["image"] = json!("img:2");
    let replaced = api
        .replace(&name, &PostParams::default(), &next)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_ne!(replaced.resource_version(), got.resource_version());
    // `next` still carries the old resourceVersion: stale.
    next.data["spec"]["image"] = json!("img:3");
    let (code, reason) = api_err(api.replace(&name, &PostParams::default(), &next).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.get_object("sandboxes", "ns", &name).unwrap()["spec"]["image"],
        "img:2"
    );

    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
    assert_eq!(api.list(&by_name).await.unwrap().items.len(), 1);
    assert_eq!(
        api_err(api.get("missing").await),
        (404, "NotFound".to_string())
    );
    let w = s.write_counts_for("sandboxes");
    assert_eq!((w.creates, w.updates), (4, 2));
}

#[tokio::test]
async fn json_patch_test_failure_is_422_and_changes_nothing() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let created = api
        .create(&PostParams::default(), &sandbox("a", json!({})))
        .await
        .unwrap();
    let rv = created.resource_version().unwrap();
    let bad: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": "999"},
        {"op": "replace", "path": "/spec/image", "value": "img:2"},
    ]))
    .unwrap();
    let pp = PatchParams::default();
    let (code, reason) = api_err(api.patch("a", &pp, &Patch::Json::<()>(bad)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    let now = s.get_object("sandboxes", "ns", "a").unwrap();
    assert_eq!(
        (
            now["spec"]["image"].as_str(),
            now["metadata"]["resourceVersion"].as_str()
        ),
        (Some("img:1"), Some(rv.as_str()))
    );

    let good: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/image", "value": "img:2"},
    ]))
    .unwrap();
    let patched = api.patch("a", &pp, &Patch::Json::<()>(good)).await.unwrap();
    assert_eq!(patched.data["spec"]["image"], "img:2");

    // A merge patch carrying a stale resourceVersion is a precondition that fails.
    let stale = json!({"metadata": {"resourceVersion": rv}, "spec": {"image": "img:3"}});
    assert_eq!(
        api_err(api.patch("a", &pp, &Patch::Merge(&stale)).await).0,
        409
    );
    // Server-side apply (merge semantics) creates a missing object and updates it.
    let applied = json!({"apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "b"}, "spec": {"image": "img:9"}});
    let ssa = PatchParams::apply("test").force();
    let b = api.patch("b", &ssa, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(
        (b.data["spec"]["image"].as_str(), b.metadata.generation),
        (Some("img:9"), Some(1))
    );
    // A no-op patch writes nothing: same resourceVersion.
    let again = api.patch("b", &ssa, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(again.resource_version(), b.resource_version());
}

#[tokio::test]
async fn status_subresource_splits_writes() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    api.create(&PostParams::default(), &sandbox("a", json!({})))
        .await
        .unwrap();
    let pp = PatchParams::default();
    let st = json!({"status": {"phase": "Ready"}, "spec": {"image": "ignored"}});
    let after = api
        .patch_status("a", &pp, &Patch::Merge(&st))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["phase"], "Ready");
    assert_eq!(
        after.data["spec"]["image"], "img:1",
        "status writes change only status"
    );
    assert_eq!(after.metadata.generation, Some(1));
    let main = json!({"status": {"phase": "Lost"}, "spec": {"image": "img:2"}});
    let after = api.patch("a", &pp, &Patch::Merge(&main)).await.unwrap();
    assert_eq!(
        after.data["status"]["phase"], "Ready",
        "object writes keep status"
    );
    assert_eq!(after.data["spec"]["image"], "img:2");
    assert_eq!(after.metadata.generation, Some(2));
    let stored = s.get_object("sandboxes", "ns", "a").unwrap();
    assert_eq!(stored["status"]["phase"], "Ready");
    let mut whole = api.get_status("a").await.unwrap();
    whole.data["status"]["phase"] = json!("Done");
    let replaced = api
        .replace_status("a", &PostParams::default(), &whole)
        .await
        .unwrap();
    assert_eq!(replaced.data["status"]["phase"], "Done");
}

pub(super) async fn next_raw(
    ev: &mut (impl futures_util::Stream<Item = kube::Result<WatchEvent<DynamicObject>>> + Unpin),
) -> String {
    let e = tokio::time::timeout(WAIT, ev.try_next())
        .await
        .expect("event in time");
    match e.unwrap().expect("stream open") {
        WatchEvent::Added(o) => format!("ADDED:{}", o.name_any()),
        WatchEvent::Modified(o) => format!(
            "MODIFIED:{}:{}",
            o.name_any(),
            o.metadata.deletion_timestamp.is_some()
        ),
        WatchEvent::Deleted(o) => format!("DELETED:{}", o.name_any()),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn finalizers_hold_a_delete_until_removed() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let mut obj = sandbox("a", json!({}));
    obj.metadata.finalizers = Some(vec!["sandboxgateway.io/cleanup".into()]);
    api.create(&PostParams::default(), &obj).await.unwrap();
    let wp = WatchParams::default()
        .fields("metadata.name=a")
        .disable_bookmarks();
    let mut events = api
        .watch(&wp, &s.resource_version().to_string())
        .await
        .unwrap()
        .boxed();

    let held = api.delete("a", &DeleteParams::background()).await.unwrap();
    let held = held
        .left()
        .expect("the object stays while finalizers remain");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(next_raw(&mut events).await, "MODIFIED:a:true");
    assert!(api
        .get("a")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());

    let clear = json!({"metadata": {"finalizers": null}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();
    assert_eq!(next_raw(&mut events).await, "DELETED:a");
    assert!(s.get_object("sandboxes", "ns", "a").is_none());
    assert_eq!(api_err(api.get("a").await).0, 404);

    // Without finalizers a delete removes at once and answers a Success Status.
    api.create(&PostParams::default(), &sandbox("b", json!({})))
        .await
        .unwrap();
    let gone = api.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(gone.right().is_some_and(|st| st.is_success()));
    assert!(s.get_object("sandboxes", "ns", "b").is_none());
}

#[tokio::test]
async fn deleting_an_owner_deletes_what_it_owns() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let owner = api
        .create(&PostParams::default(), &sandbox("a", json!({})))
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.clone(), "ns");
    let configmaps: Api<ConfigMap> = Api::namespaced(c.clone(), "ns");
    let owned: Secret = serde_json::from_value(json!({
        "metadata": {"name": "a-token", "ownerReferences": [{
            "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox", "name": "a",
            "uid": owner.uid().unwrap(), "controller": true}]},
        "stringData": {"token": "t"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();
    let unowned: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "keep"}})).unwrap();
    configmaps
        .create(&PostParams::default(), &unowned)
        .await
        .unwrap();

    // A precondition that does not hold refuses the delete.
    let wrong = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(api_err(api.delete("a", &wrong).await).0, 409);
    assert!(s.get_object("secrets", "ns", "a-token").is_some());

    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: owner.uid(),
            resource_version: owner.resource_version(),
        }),
        ..DeleteParams::background()
    };
    api.delete("a", &right).await.unwrap();
    assert_eq!(
        api_err(secrets.get("a-token").await).0,
        404,
        "the owned secret is collected"
    );
    assert!(configmaps.get("keep").await.is_ok());
}

#[tokio::test]
async fn watcher_on_a_crd_with_a_label_selector() {
    let (s, c) = setup().await;
    let api = sandboxes(&c);
    let cfg = watcher::Config::default().labels("pool=a");
    let mut w = watcher::watcher(api.clone(), cfg).boxed();
    let mut next = async || {
        let item = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("event in time");
        match item.expect("stream open").expect("no error") {
            Event::Init => "Init".to_string(),
            Event::InitApply(o) => format!("InitApply:{}", o.name_any()),
            Event::InitDone => "InitDone".to_string(),
            Event::Apply(o) => format!("Apply:{}:{}", o.name_any(), o.data["spec"]["image"]),
            Event::Delete(o) => format!("Delete:{}", o.name_any()),
        }
    };
    assert_eq!(next().await, "Init");
    assert_eq!(next().await, "InitDone");
    api.create(
        &PostParams::default(),
        &sandbox("other", json!({"pool": "b"})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &sandbox("x", json!({"pool": "a"})))
        .await
        .unwrap();
    assert_eq!(next().await, "Apply:x:\"img:1\"");
    let change = json!({"spec": {"image": "img:2"}});
    api.patch("x", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    assert_eq!(next().await, "Apply:x:\"img:2\"");
    api.delete("x", &DeleteParams::default()).await.unwrap();
    assert_eq!(next().await, "Delete:x");
    assert!(s
        .request_log()
        .iter()
        .any(|r| r
            .starts_with("/apis/sandboxgateway.io/v1alpha1/namespaces/ns/sandboxes?&watch=true")));
}

#[tokio::test]
async fn lease_get_create_and_stale_replace() {
    let (_s, c) = setup().await;
    let leases: Api<Lease> = Api::namespaced(c, "ns");
    assert_eq!(api_err(leases.get("leader").await).0, 404);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    // Another candidate still holding the first version loses.
    let mut theirs = created;
    theirs.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let (code, reason) = api_err(
        leases
            .replace("leader", &PostParams::default(), &theirs)
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let now = leases.get("leader").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

#[tokio::test]
async fn scale_subresource_reads_and_writes_replicas() {
    let (s, c) = setup().await;
    let pools: Api<DynamicObject> =
        Api::namespaced_with(c, "ns", &ar("SandboxPool", "sandboxpools"));
    s.apply_object(
        "sandboxpools",
        json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"replicas": 2},
            "status": {"replicas": 1, "selector": "pool=p"},
        }),
    );
    let scale = pools.get_scale("p").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let status = scale.status.unwrap();
    assert_eq!(
        (status.replicas, status.selector.as_deref()),
        (1, Some("pool=p"))
    );
    let patch = json!({"spec": {"replicas": 5}});
    let scaled = pools
        .patch_scale("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let pool = s.get_object("sandboxpools", "ns", "p").unwrap();
    assert_eq!(
        (
            pool["spec"]["replicas"].as_i64(),
            pool["metadata"]["generation"].as_i64()
        ),
        (Some(5), Some(2))
    );
    let mut stale = scale_from(&pools, "p").await;
    stale.metadata.resource_version = Some("1".into());
    assert_eq!(
        api_err(
            pools
                .replace_scale("p", &PostParams::default(), &stale)
                .await
        )
        .0,
        409
    );
}

async fn scale_from(
    api: &Api<DynamicObject>,
    name: &str,
) -> k8s_openapi::api::autoscaling::v1::Scale {
    api.get_scale(name).await.unwrap()
}
