//! Taking a sandbox's route away. The pod goes first, fenced on its UID and on still being this
//! sandbox's (so a pod that is not ours is never deleted); only then does the status (and, on
//! deletion, the finalizer) say it is gone. A used pod is never returned to a pool: the pool
//! refills instead, and the next user never inherits someone else's state.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::ResourceExt;
use serde_json::json;

use crate::context::Context;
use crate::crd::{Phase, ReleaseReason, Sandbox, FINALIZER};
use crate::error::{is_conflict, is_not_found, namespace_of, Error, Result};
use crate::pods::sandbox_owner;

/// Deletes the sandbox's pod if it is still its own. Retries a 409 (the pod changed between our
/// read and the delete) with a fresh read; a pod that is gone is fine.
pub async fn delete_route(ctx: &Context, sbx: &Sandbox) -> Result<()> {
    let ns = namespace_of(sbx)?;
    let uid = sbx.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // The pod named in the status, and any other pod this sandbox owns (a claim interrupted
    // before its status write leaves one).
    let mut names: Vec<String> = sbx
        .status
        .as_ref()
        .and_then(|s| s.pod_name.clone())
        .into_iter()
        .collect();
    for p in ctx.pods.state() {
        if sandbox_owner(&p) == Some(uid.as_str()) && p.namespace().as_deref() == Some(&ns) {
            names.push(p.name_any());
        }
    }
    names.sort();
    names.dedup();
    for name in names {
        let mut gone = false;
        for _ in 0..5 {
            ctx.leader.check()?;
            let pod = match pods.get(&name).await {
                Ok(p) => p,
                Err(e) if is_not_found(&e) => {
                    gone = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if sandbox_owner(&pod) != Some(uid.as_str()) {
                gone = true; // not ours (any more): never touch it
                break;
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.uid(),
                    resource_version: pod.resource_version(),
                }),
                ..Default::default()
            };
            match pods.delete(&name, &dp).await {
                Ok(_) => {
                    gone = true;
                    break;
                }
                Err(e) if is_not_found(&e) => {
                    gone = true;
                    break;
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !gone {
            // The pod kept changing under us: the route is still there, so the release is
            // not done (the reconcile retries; the status must not say Released).
            return Err(Error::RouteNotRemoved(name));
        }
    }
    Ok(())
}

/// Releases a sandbox for `reason`: route first, then the paused marker (a released sandbox is
/// a 404, never a held wake), then the status says Released.
pub async fn release(ctx: &Context, sbx: &Sandbox, reason: ReleaseReason) -> Result<()> {
    delete_route(ctx, sbx).await?;
    match crate::pause::clear_marker(ctx, sbx).await {
        Ok(()) => {}
        Err(Error::Kube(e)) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    if let Some(uid) = sbx.uid() {
        ctx.forget_pending_wake(&uid);
        ctx.take_wake_started(&uid);
    }
    let ns = namespace_of(sbx)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let from = sbx.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if let Some(id) = sbx.status.as_ref().and_then(|s| s.sandbox_id.as_deref()) {
        ctx.note_released(id);
    }
    if from != Phase::Released {
        ctx.leader.check()?;
        let patch = json!({ "status": {
            "phase": Phase::Released,
            "releaseReason": reason,
            "podIP": null,
        }});
        match api
            .patch_status(
                &sbx.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        ctx.metrics
            .releases
            .with_label_values(&[reason.as_str()])
            .inc();
        ctx.metrics
            .transitions
            .with_label_values(&[&format!("{from:?}"), "Released"])
            .inc();
        tracing::info!(sandbox = %sbx.name_any(), namespace = %ns, reason = reason.as_str(),
            "released sandbox");
        ctx.event(
            sbx,
            false,
            "Released",
            "Release",
            format!("released: {}", reason.as_str()),
        );
    }
    Ok(())
}

/// Removes the controller's finalizer (after the route is gone), so the deletion completes.
pub async fn drop_finalizer(ctx: &Context, sbx: &Sandbox) -> Result<()> {
    let ns = namespace_of(sbx)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let rest: Vec<&String> = sbx
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    ctx.leader.check()?;
    let patch = json!({ "metadata": {
        "finalizers": rest,
        "resourceVersion": sbx.resource_version(),
    }});
    match api
        .patch(
            &sbx.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
