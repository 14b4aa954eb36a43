//! Pods as the controller sees them: a pool's pods built from its template, a pod read into the
//! decision's [`PodInfo`], and the one fenced patch that binds a warm pod to a sandbox.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, TestOperation};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use routing::contract::{PORT_ANNOTATION, SANDBOX_ID_LABEL, TOKEN_SHA256_ANNOTATION};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::context::time_ms;
use crate::crd::{
    Sandbox, SandboxPool, POOL_LABEL, SANDBOX_NAME_ANNOTATION, TEMPLATE_HASH_ANNOTATION,
};
use crate::decide::pool::PodInfo;
use crate::error::{Error, Result};

/// A short hash of a pool's template: pods carry it, so a template change is visible per pod.
pub fn template_hash(pool: &SandboxPool) -> Result<String> {
    let bytes = serde_json::to_vec(&pool.spec.template)?;
    Ok(hex::encode(&Sha256::digest(&bytes)[..8]))
}

/// Unix ms of a pod's Ready condition turning True (`None`: not Ready).
pub fn ready_since_ms(pod: &Pod) -> Option<u64> {
    let conds = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conds
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(c.last_transition_time.as_ref().map_or(1, time_ms))
}

/// Whether a pod is bound to a sandbox: the route label, or a `Sandbox` controller owner.
pub fn is_claimed(pod: &Pod) -> bool {
    pod.labels().contains_key(SANDBOX_ID_LABEL) || sandbox_owner(pod).is_some()
}

/// The UID of the `Sandbox` that controls a pod.
pub fn sandbox_owner(pod: &Pod) -> Option<&str> {
    pod.owner_references()
        .iter()
        .find(|o| o.kind == "Sandbox" && o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The decision's view of one pool pod.
pub fn pod_info(pod: &Pod, current_hash: &str) -> PodInfo {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    PodInfo {
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        resource_version: pod.resource_version().unwrap_or_default(),
        created_ms: pod.metadata.creation_timestamp.as_ref().map_or(0, time_ms),
        ready_since_ms: ready_since_ms(pod),
        terminated: matches!(phase, Some("Failed") | Some("Succeeded")),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        claimed: is_claimed(pod),
        current: pod
            .annotations()
            .get(TEMPLATE_HASH_ANNOTATION)
            .map(String::as_str)
            == Some(current_hash),
    }
}

/// `owner` as the controlling owner of an object it makes (pods, the token Secret, volumes),
/// blocking the owner's foreground deletion until the object is gone.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Result<OwnerReference> {
    let mut r = owner
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    r.block_owner_deletion = Some(true);
    Ok(r)
}

/// A new warm pod for `pool`: its template, the pool label and template hash, owned by the pool,
/// named `<pool>-<random>` by the API server. Never the route label.
pub fn warm_pod(pool: &SandboxPool, hash: &str) -> Result<Pod> {
    let t = &pool.spec.template;
    let mut meta = t.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.take().unwrap_or_default();
    labels.remove(SANDBOX_ID_LABEL);
    labels.insert(POOL_LABEL.to_string(), pool.name_any());
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(TEMPLATE_HASH_ANNOTATION.to_string(), hash.to_string());
    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", pool.name_any())),
            namespace: pool.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![controller_ref(pool)?]),
            ..meta
        },
        spec: t.spec.clone(),
        status: None,
    })
}

/// A pod started for one claim (`onEmpty: Cold`): a warm pod already bound to `sandbox`.
pub fn cold_pod(
    pool: &SandboxPool,
    hash: &str,
    sandbox: &Sandbox,
    id: &str,
    port: u16,
    token_sha256: Option<&str>,
) -> Result<Pod> {
    let mut pod = warm_pod(pool, hash)?;
    let m = &mut pod.metadata;
    m.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(SANDBOX_ID_LABEL.to_string(), id.to_string());
    let a = m.annotations.get_or_insert_with(BTreeMap::new);
    a.insert(PORT_ANNOTATION.to_string(), port.to_string());
    a.insert(SANDBOX_NAME_ANNOTATION.to_string(), sandbox.name_any());
    if let Some(h) = token_sha256 {
        a.insert(TOKEN_SHA256_ANNOTATION.to_string(), h.to_string());
    }
    m.owner_references = Some(vec![controller_ref(sandbox)?]);
    Ok(pod)
}

fn ptr(segments: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(segments.iter().copied())
}

/// The claim: one JSON patch, applied only if the pod is still at `resource_version` (the `test`
/// fails otherwise and nothing changes). It adds the route label, the port, token-hash and
/// sandbox-name annotations, and makes the `Sandbox` the pod's only owner (the pool no longer
/// deletes it; the sandbox's deletion does).
pub fn claim_patch(
    pod: &Pod,
    sandbox: &Sandbox,
    id: &str,
    port: u16,
    token_sha256: Option<&str>,
) -> Result<Patch> {
    let rv = pod
        .resource_version()
        .ok_or(Error::MissingField("metadata.resourceVersion"))?;
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: ptr(&["metadata", "resourceVersion"]),
        value: json!(rv),
    })];
    if pod.metadata.labels.is_none() {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "labels"]),
            value: json!({}),
        }));
    }
    ops.push(PatchOperation::Add(AddOperation {
        path: ptr(&["metadata", "labels", SANDBOX_ID_LABEL]),
        value: json!(id),
    }));
    if pod.metadata.annotations.is_none() {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "annotations"]),
            value: json!({}),
        }));
    }
    let mut annotate = |k: &str, v: &str| {
        ops.push(PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "annotations", k]),
            value: json!(v),
        }))
    };
    annotate(PORT_ANNOTATION, &port.to_string());
    annotate(SANDBOX_NAME_ANNOTATION, &sandbox.name_any());
    if let Some(h) = token_sha256 {
        annotate(TOKEN_SHA256_ANNOTATION, h);
    }
    let owner = serde_json::to_value(vec![controller_ref(sandbox)?])?;
    ops.push(if pod.metadata.owner_references.is_some() {
        PatchOperation::Replace(ReplaceOperation {
            path: ptr(&["metadata", "ownerReferences"]),
            value: owner,
        })
    } else {
        PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "ownerReferences"]),
            value: owner,
        })
    });
    Ok(Patch(ops))
}
