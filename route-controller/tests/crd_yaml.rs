//! The committed CRDs (`deploy/crds/sandboxgateway.io.yaml`) are what `sandbox-controller crd`
//! prints from the Rust types. Regenerate with
//! `cargo run -q -p sandbox-gateway-controller -- crd > deploy/crds/sandboxgateway.io.yaml`
//! (or set `UPDATE_CRDS=1` and run this test).

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/sandboxgateway.io.yaml")
}

#[test]
fn committed_crds_are_generated_from_the_types() {
    let want = sandbox_controller::crds_yaml().expect("serialize");
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(committed(), &want).expect("write");
    }
    let have = std::fs::read_to_string(committed()).expect("read the committed CRDs");
    assert!(
        have == want,
        "deploy/crds/sandboxgateway.io.yaml is stale: run \
         `cargo run -q -p sandbox-gateway-controller -- crd > deploy/crds/sandboxgateway.io.yaml`"
    );
}

#[test]
fn crds_parse_and_carry_the_api_users_rely_on() {
    let text = std::fs::read_to_string(committed()).expect("read");
    let docs: Vec<CustomResourceDefinition> =
        serde_saphyr::from_multiple(&text).expect("every document is a CRD");
    assert_eq!(docs.len(), 2);
    let pool = &docs[0];
    assert_eq!(
        pool.metadata.name.as_deref(),
        Some("sandboxpools.sandboxgateway.io")
    );
    assert_eq!(pool.spec.names.short_names, Some(vec!["sbp".to_string()]));
    let v = &pool.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let sbx = &docs[1];
    assert_eq!(
        sbx.metadata.name.as_deref(),
        Some("sandboxes.sandboxgateway.io")
    );
    assert_eq!(sbx.spec.names.short_names, Some(vec!["sbx".to_string()]));
    assert_eq!(sbx.spec.scope, "Namespaced");
    let cols: Vec<_> = sbx.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert!(cols.contains(&"Phase") && cols.contains(&"ID"), "{cols:?}");
}
