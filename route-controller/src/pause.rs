//! Pause and resume (docs/controller.md#pause-and-wake). A paused sandbox keeps its ID, its
//! token and its per-sandbox volumes, and holds no pod.
//!
//! Pause (`Pausing` → `Paused`): (1) the paused marker goes on the Sandbox (label
//! [`PAUSED_LABEL`] = its ID, the token hash, who paused it), so a gateway that sees the route
//! vanish finds the marker; (2) the pod is deleted, fenced on its uid and resourceVersion (the
//! route disappears with the deletion timestamp); (3) the status says `Paused` and names no pod.
//! Each step is idempotent, so a retry (or a new leader) simply redoes what is left.
//!
//! Resume (`Resuming` → `Ready`): a pod is bound with the same ID and token hash (a warm pod by
//! the claim's fenced patch, or one built for the sandbox when it has volumes or the pool is
//! empty). The old pod's delete committed before the pause ended, so the gateway's oldest-pod
//! rule never prefers it. The watch of the bound pod turns it `Ready` ([`finish_resume`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use routing::contract::TOKEN_SHA256_ANNOTATION;
use serde_json::json;

use crate::claim::{bind_cold, bind_warm, bound_status, has_candidates, record, Bound};
use crate::conditions::set_condition;
use crate::context::{now_ms, time_ms, Context};
use crate::crd::{
    Launch, PauseReason, Phase, Sandbox, SandboxPool, PAUSED_BY_ANNOTATION, PAUSED_LABEL,
};
use crate::error::{is_conflict, namespace_of, Error, Result};
use crate::release::delete_route;
use crate::spec::{PoolSettings, SandboxSettings};

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// The claim name of a sandbox's volume `template` (`<sandbox>-<template>`).
pub fn claim_name(sbx: &Sandbox, template: &str) -> String {
    format!("{}-{template}", sbx.name_any())
}

/// The token hash a sandbox's routes carry: from the marker, else its pod's annotation, else
/// the token Secret itself (a retried pause whose pod is gone, read from a cache that has not
/// seen the marker yet, must not write the marker without its hash: that would open the
/// sandbox). `None` only for a sandbox without a token Secret (`requireToken: false`).
async fn token_hash_of(ctx: &Context, sbx: &Sandbox, ns: &str) -> Result<Option<String>> {
    if let Some(h) = sbx.annotations().get(TOKEN_SHA256_ANNOTATION) {
        return Ok(Some(h.clone()));
    }
    let st = sbx.status.clone().unwrap_or_default();
    let pod = st
        .pod_name
        .as_ref()
        .and_then(|name| ctx.pods.get(&ObjectRef::<Pod>::new(name).within(ns)));
    if let Some(h) = pod.and_then(|p| p.annotations().get(TOKEN_SHA256_ANNOTATION).cloned()) {
        return Ok(Some(h));
    }
    let Some(secret) = st.token_secret else {
        return Ok(None);
    };
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    let token = api
        .get(&secret)
        .await?
        .data
        .and_then(|d| d.get(crate::claim::TOKEN_KEY).map(|b| b.0.clone()))
        .ok_or(Error::MissingField("the token Secret's data.token"))?;
    Ok(Some(routing::contract::token_sha256_hex(&token)))
}

/// Writes the paused marker; returns the Sandbox as written (its new resourceVersion).
async fn mark_paused(
    ctx: &Context,
    sbx: &Sandbox,
    id: &str,
    by: PauseReason,
    token_sha: Option<&str>,
) -> Result<Sandbox> {
    let ns = namespace_of(sbx)?;
    let has = |k: &str, v: &str| sbx.labels().get(k).map(String::as_str) == Some(v);
    let annotated = sbx
        .annotations()
        .get(PAUSED_BY_ANNOTATION)
        .map(String::as_str)
        == Some(by.as_str())
        && sbx
            .annotations()
            .get(TOKEN_SHA256_ANNOTATION)
            .map(String::as_str)
            == token_sha;
    if has(PAUSED_LABEL, id) && annotated {
        return Ok(sbx.clone());
    }
    let patch = json!({ "metadata": {
        "labels": { PAUSED_LABEL: id },
        "annotations": { PAUSED_BY_ANNOTATION: by.as_str(), TOKEN_SHA256_ANNOTATION: token_sha },
    }});
    ctx.leader.check()?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    Ok(api
        .patch(
            &sbx.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

/// Removes the paused marker (the sandbox runs again).
pub async fn clear_marker(ctx: &Context, sbx: &Sandbox) -> Result<()> {
    if !sbx.labels().contains_key(PAUSED_LABEL)
        && !sbx.annotations().contains_key(PAUSED_BY_ANNOTATION)
    {
        return Ok(());
    }
    let ns = namespace_of(sbx)?;
    let patch = json!({ "metadata": {
        "labels": { PAUSED_LABEL: null },
        "annotations": { PAUSED_BY_ANNOTATION: null, TOKEN_SHA256_ANNOTATION: null },
    }});
    ctx.leader.check()?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch(
        &sbx.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// A `Pausing` sandbox: marker, pod deleted, then `Paused` (or `Resuming` when a wake came in).
pub async fn pause(ctx: &Context, sbx: &Sandbox) -> Result<Action> {
    let ns = namespace_of(sbx)?;
    let uid = sbx.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let st = sbx.status.clone().unwrap_or_default();
    let id = st
        .sandbox_id
        .clone()
        .ok_or(Error::MissingField("status.sandboxId"))?;
    let by = st.pause_reason.unwrap_or(PauseReason::Idle);
    let token_sha = token_hash_of(ctx, sbx, &ns).await?;
    let marked = mark_paused(ctx, sbx, &id, by, token_sha.as_deref()).await?;
    delete_route(ctx, &marked).await?;
    // Read now, forgotten only once the status is written: a retried write still honours it.
    let wake = by == PauseReason::Idle && sbx.spec.paused != Some(true) && ctx.pending_wake(&uid);
    let phase = if wake { Phase::Resuming } else { Phase::Paused };
    let mut conds = st.conditions.clone();
    set_condition(
        &mut conds,
        sbx.metadata.generation,
        "Ready",
        false,
        "Paused",
        "paused: no pod; the ID, token and volumes are kept",
    );
    let status = json!({
        "phase": phase, "pausedAt": now(), "podName": null, "podUid": null, "podIP": null,
        "launch": null, "conditions": conds,
    });
    if !ctx.fenced_status(&marked, status).await? {
        // Changed since the marker write (a deletion, a spec change): look again.
        return Ok(Action::requeue(Duration::from_millis(50)));
    }
    ctx.forget_pending_wake(&uid);
    ctx.metrics
        .transitions
        .with_label_values(&["Pausing", "Paused"])
        .inc();
    tracing::info!(sandbox = %sbx.name_any(), namespace = %ns, reason = by.as_str(), "paused");
    ctx.event(
        sbx,
        false,
        "Paused",
        "Pause",
        format!("paused ({}): pod deleted, ID {id} kept", by.as_str()),
    );
    if wake {
        ctx.metrics
            .transitions
            .with_label_values(&["Paused", "Resuming"])
            .inc();
    }
    Ok(Action::await_change())
}

/// Creates the sandbox's PersistentVolumeClaims from the pool's templates (owned by the
/// Sandbox: deleting it deletes them). Ones that exist are kept as they are.
pub async fn ensure_volumes(ctx: &Context, sbx: &Sandbox, pool: &SandboxPool) -> Result<()> {
    let ns = namespace_of(sbx)?;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = crate::pods::controller_ref(sbx)?;
    for t in &pool.spec.volume_claim_templates {
        let tpl = t.metadata.name.as_deref().unwrap_or_default();
        let mut claim = t.clone();
        claim.metadata = kube::api::ObjectMeta {
            name: Some(claim_name(sbx, tpl)),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([(
                crate::crd::SANDBOX_NAME_ANNOTATION.to_string(),
                sbx.name_any(),
            )])),
            owner_references: Some(vec![owner.clone()]),
            ..t.metadata.clone()
        };
        claim.status = None;
        ctx.leader.check()?;
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => {}
            Err(e) if is_conflict(&e) => {
                // It exists: ours from an earlier attempt, or a previous sandbox's of the same
                // name that the garbage collector has not deleted yet (its files are not ours).
                let name = claim_name(sbx, tpl);
                let existing = api.get(&name).await?;
                let ours = existing
                    .owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == sbx.uid().as_ref());
                if !ours || existing.metadata.deletion_timestamp.is_some() {
                    return Err(Error::VolumeNotOwned(name));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Adds the sandbox's volumes to a pod built for it: one `persistentVolumeClaim` volume per
/// template, named as the template (what the containers' `volumeMounts` name).
pub fn mount_volumes(pod: &mut Pod, sbx: &Sandbox, pool: &SandboxPool) {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimVolumeSource, Volume};
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for t in &pool.spec.volume_claim_templates {
        let tpl = t.metadata.name.clone().unwrap_or_default();
        volumes.push(Volume {
            name: tpl.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(sbx, &tpl),
                read_only: None,
            }),
            ..Default::default()
        });
    }
}

/// A `Resuming` sandbox without a pod: bind one with its ID and token hash.
pub async fn resume(ctx: &Arc<Context>, sbx: &Sandbox, pool: &SandboxPool) -> Result<Action> {
    let st = sbx.status.clone().unwrap_or_default();
    let id = st
        .sandbox_id
        .clone()
        .ok_or(Error::MissingField("status.sandboxId"))?;
    let pool_settings = PoolSettings::resolve(&pool.spec);
    let settings = pool_settings
        .clone()
        .and_then(|p| SandboxSettings::resolve(&sbx.spec, &p));
    let (Ok(pool_settings), Ok(settings)) = (pool_settings, settings) else {
        // An invalid pool or override after the pause: wait for a fix, keep the sandbox.
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let token_sha = sbx.annotations().get(TOKEN_SHA256_ANNOTATION).cloned();
    if settings.require_token && token_sha.is_none() {
        return Err(Error::MissingField(
            "the paused marker's access-token-sha256 annotation",
        ));
    }
    // After failed resumes, nothing is bound until the backoff has passed (so a pod left by an
    // earlier attempt of this resume can only exist once it has).
    let failed_at = st.resume_failed_at.as_ref().map(time_ms);
    let failures = st.resume_failures.unwrap_or(0);
    let wait = crate::decide::resume::wait_before_binding(failures, failed_at, now_ms());
    if !wait.is_zero() {
        return Ok(Action::requeue(wait));
    }
    // A pod an earlier attempt bound with this ID (its status write failed) is the resume's.
    let mut bound = match crate::claim::owned_live_pod(ctx, sbx).await? {
        Some((pod, owned_id)) if owned_id == id => Bound::Pod(pod, Launch::Cold),
        _ => Bound::Empty,
    };
    if matches!(bound, Bound::Empty)
        && !pool_settings.per_sandbox_volumes
        && has_candidates(ctx, sbx, pool)?
    {
        bound = bind_warm(ctx, sbx, pool, &settings, &id, token_sha.as_deref()).await?;
    }
    if matches!(bound, Bound::Empty) {
        if pool_settings.per_sandbox_volumes {
            ensure_volumes(ctx, sbx, pool).await?;
        }
        // A resume never fails for want of a warm pod: the sandbox exists, build it a pod.
        bound = bind_cold(ctx, sbx, pool, &settings, &id, token_sha.as_deref()).await?;
    }
    let Bound::Pod(pod, launch) = bound else {
        return Ok(Action::requeue(Duration::from_millis(100)));
    };
    let mut next = bound_status(
        ctx,
        &st,
        &pod,
        launch,
        &id,
        &settings,
        st.token_secret.clone(),
    );
    // Resuming until the pod is Ready (`finish_resume`), whatever the pod says now.
    next.phase = Phase::Resuming;
    next.ready_at = st.ready_at.clone();
    next.observed_generation = sbx.metadata.generation;
    if !record(ctx, sbx, &pod, next.clone()).await? {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    ctx.note_bound(&sbx.uid().unwrap_or_default(), next);
    let launch = if launch == Launch::Warm {
        "warm"
    } else {
        "cold"
    };
    ctx.metrics
        .claims
        .with_label_values(&[&pool.name_any(), launch, "resumed"])
        .inc();
    ctx.event(
        sbx,
        false,
        "Resuming",
        "Resume",
        format!("bound pod {} ({launch}) to sandbox {id}", pod.name_any()),
    );
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The resumed pod is Ready: the status says so (activity reset, so the idle rule gives it a
/// full timeout), then the marker goes.
pub async fn finish_resume(
    ctx: &Context,
    sbx: &Sandbox,
    st: &mut crate::crd::SandboxStatus,
) -> Result<()> {
    let t = now();
    st.phase = Phase::Ready;
    st.resumed_at = Some(t.clone());
    st.resume_failures = None;
    st.resume_failed_at = None;
    crate::conditions::clear_condition(&mut st.conditions, "ResumeFailed");
    st.last_active_at = Some(t.clone());
    if st.ready_at.is_none() {
        st.ready_at = Some(t);
    }
    set_condition(
        &mut st.conditions,
        sbx.metadata.generation,
        "Ready",
        true,
        "Resumed",
        "resumed: bound and routed",
    );
    let mut patch = json!({ "status": st });
    // A merge patch keeps what it omits: clear the failure record explicitly.
    patch["status"]["resumeFailures"] = serde_json::Value::Null;
    patch["status"]["resumeFailedAt"] = serde_json::Value::Null;
    ctx.patch_sandbox_status(sbx, &patch).await?;
    clear_marker(ctx, sbx).await?;
    ctx.metrics
        .transitions
        .with_label_values(&["Resuming", "Ready"])
        .inc();
    if let Some(d) = ctx.take_wake_started(&sbx.uid().unwrap_or_default()) {
        ctx.metrics.wake_seconds.observe(d.as_secs_f64());
    }
    ctx.event(sbx, false, "Resumed", "Resume", "resumed and routed".into());
    Ok(())
}

/// A resume that did not end Ready (`reason`: `PodFailed`, its pod failed or went; or
/// `StartupTimeout`, not Ready within the pool's `startupTimeout`): back to `Pausing`, so the
/// pause deletes the pod and the sandbox is `Paused` again with its ID, token and volumes. Never
/// a release: the sandbox's state is on its volumes, and the pod is what failed. The marker
/// never went, so gateways keep holding; the next wake resumes it after the backoff
/// (`decide::resume`), counted in `resumeFailures` and told by the `ResumeFailed` condition.
pub async fn resume_failed(
    ctx: &Context,
    sbx: &Sandbox,
    reason: &str,
    message: String,
) -> Result<Action> {
    let st = sbx.status.clone().unwrap_or_default();
    let failures = st.resume_failures.unwrap_or(0).saturating_add(1);
    let mut conds = st.conditions.clone();
    set_condition(
        &mut conds,
        sbx.metadata.generation,
        "ResumeFailed",
        true,
        reason,
        &message,
    );
    let status = json!({
        "phase": Phase::Pausing, "resumeFailures": failures, "resumeFailedAt": now(),
        "conditions": conds,
    });
    if !ctx.fenced_status(sbx, status).await? {
        return Ok(Action::requeue(Duration::from_millis(50)));
    }
    // The wake-latency histogram measures wakes that ended Ready.
    ctx.take_wake_started(&sbx.uid().unwrap_or_default());
    ctx.metrics
        .transitions
        .with_label_values(&["Resuming", "Pausing"])
        .inc();
    ctx.metrics
        .resume_failures
        .with_label_values(&[reason])
        .inc();
    let backoff = crate::decide::resume::backoff(failures);
    tracing::warn!(sandbox = %sbx.name_any(), reason, failures, %message, "resume failed; pausing again");
    ctx.event(
        sbx,
        true,
        "ResumeFailed",
        "Resume",
        format!(
            "{message}; paused again (failure {failures} in a row, the next resume waits {}s)",
            backoff.as_secs()
        ),
    );
    Ok(Action::await_change())
}

/// Marks a Ready sandbox `Pausing` (its reconcile then pauses it), under its resourceVersion.
/// Returns false when it changed meanwhile.
pub async fn mark_pausing(ctx: &Context, sbx: &Sandbox, by: PauseReason) -> Result<bool> {
    let status = json!({ "phase": Phase::Pausing, "pauseReason": by });
    let written = ctx.fenced_status(sbx, status).await?;
    if written {
        ctx.metrics
            .transitions
            .with_label_values(&["Ready", "Pausing"])
            .inc();
        let note = format!("pausing ({})", by.as_str());
        ctx.event(sbx, false, "Pausing", "Pause", note);
    }
    Ok(written)
}

/// Marks a Paused sandbox `Resuming`, under its resourceVersion. Returns false when it changed
/// meanwhile.
pub async fn mark_resuming(ctx: &Context, sbx: &Sandbox, extra: serde_json::Value) -> Result<bool> {
    let mut status = json!({ "phase": Phase::Resuming });
    if let (Some(s), Some(e)) = (status.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let written = ctx.fenced_status(sbx, status).await?;
    if written {
        ctx.metrics
            .transitions
            .with_label_values(&["Paused", "Resuming"])
            .inc();
    }
    Ok(written)
}
