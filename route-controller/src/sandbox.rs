//! The `Sandbox` reconcile: add the finalizer, claim a pod, watch it turn Ready, and release
//! the sandbox when it is deleted, expires, loses its pod or its pool, or the idle pass marked it
//! idle (`Releasing`); pause it (`Pausing`, by the idle pass or `spec.paused`) and resume it
//! (`Resuming`, by a wake, `spec.paused` cleared or the resume annotation): see `pause.rs`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use serde_json::json;

use crate::claim::{
    bind_cold, bind_warm, bound_status, ensure_token, has_candidates, record, token_hash, Bound,
};
use crate::conditions::{clear_condition, set_condition};
use crate::context::{now_ms, time_ms, Context};
use crate::crd::{
    Launch, OnEmpty, PauseReason, Phase, ReleaseReason, Sandbox, SandboxPool, FINALIZER,
    RESUME_ANNOTATION,
};
use crate::error::{is_not_found, namespace_of, Error, Result};
use crate::pods::{ready_since_ms, sandbox_owner};
use crate::release::{drop_finalizer, release};
use crate::spec::{PoolSettings, SandboxSettings};

/// Reconciles one sandbox.
pub async fn reconcile(sbx: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change()); // a standby only keeps its caches warm
    }
    if !ctx.metrics.is_ready() {
        // Until every cache has listed, a missing pool or pod proves nothing: a restarted
        // controller must not release a sandbox (PoolDeleted, PodFailed) it has not seen yet.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let ns = namespace_of(&*sbx)?;
    if sbx.metadata.deletion_timestamp.is_some() {
        if sbx.finalizers().iter().any(|f| f == FINALIZER) {
            ctx.leader.check()?;
            release(&ctx, &sbx, ReleaseReason::Deleted).await?;
            drop_finalizer(&ctx, &sbx).await?;
        }
        return Ok(Action::await_change());
    }
    ctx.leader.check()?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let sbx: Arc<Sandbox> = if sbx.finalizers().iter().any(|f| f == FINALIZER) {
        sbx
    } else {
        let mut f = sbx.finalizers().to_vec();
        f.push(FINALIZER.to_string());
        let patch = json!({ "metadata": {
            "finalizers": f, "resourceVersion": sbx.resource_version() }});
        Arc::new(
            api.patch(
                &sbx.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?,
        )
    };
    let status = ctx.current_status(&sbx.uid().unwrap_or_default(), sbx.status.as_ref());
    let sbx: Arc<Sandbox> = if sbx.status.as_ref() == Some(&status) {
        sbx
    } else {
        let mut s = (*sbx).clone();
        s.status = Some(status.clone());
        Arc::new(s)
    };
    match status.phase {
        Phase::Released | Phase::Failed => Ok(Action::await_change()),
        Phase::Releasing => {
            let reason = status.release_reason.unwrap_or(ReleaseReason::Idle);
            release(&ctx, &sbx, reason).await?;
            Ok(Action::await_change())
        }
        Phase::Pausing => crate::pause::pause(&ctx, &sbx).await,
        Phase::Paused => paused(&ctx, &sbx).await,
        Phase::Resuming if status.pod_uid.is_none() => {
            let ns = namespace_of(&*sbx)?;
            match pool_of(&ctx, &sbx, &ns) {
                Some(pool) => crate::pause::resume(&ctx, &sbx, &pool).await,
                None => release_if_pool_gone(&ctx, &sbx, &ns).await,
            }
        }
        Phase::Pending if status.pod_uid.is_none() => claim(&ctx, &sbx).await,
        Phase::Pending | Phase::Ready | Phase::Resuming => watch_bound(&ctx, &sbx).await,
    }
}

/// A paused sandbox: stays paused until a wake (the WakeService), `spec.paused` cleared after
/// an explicit pause, or a new `sandboxgateway.io/resume-requested` value; released when its
/// pool goes or its lifetime ends.
async fn paused(ctx: &Arc<Context>, sbx: &Sandbox) -> Result<Action> {
    let ns = namespace_of(sbx)?;
    let st = sbx.status.clone().unwrap_or_default();
    let Some(pool) = pool_of(ctx, sbx, &ns) else {
        return release_if_pool_gone(ctx, sbx, &ns).await;
    };
    let settings =
        PoolSettings::resolve(&pool.spec).and_then(|p| SandboxSettings::resolve(&sbx.spec, &p));
    if let (Ok(s), Some(at)) = (&settings, st.claimed_at.as_ref()) {
        if let Some(max) = s.max_lifetime {
            let end = time_ms(at) + u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
            if now_ms() >= end {
                release(ctx, sbx, ReleaseReason::Expired).await?;
                return Ok(Action::await_change());
            }
        }
    }
    let by_spec = sbx.spec.paused == Some(true);
    if by_spec && st.pause_reason != Some(PauseReason::Spec) {
        // Paused for idleness, then by its owner: traffic must no longer wake it. Redo the
        // marker with the new reason (the pause steps are idempotent).
        let ns_api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
        ctx.leader.check()?;
        let patch =
            json!({ "status": { "phase": Phase::Pausing, "pauseReason": PauseReason::Spec }});
        ns_api
            .patch_status(
                &sbx.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        return Ok(Action::await_change());
    }
    let requested = sbx.annotations().get(RESUME_ANNOTATION).cloned();
    let new_request = requested.is_some() && requested != st.resume_request;
    let unpaused = !by_spec && st.pause_reason == Some(PauseReason::Spec);
    if (unpaused || new_request) && !by_spec {
        let extra = json!({ "resumeRequest": requested });
        if crate::pause::mark_resuming(ctx, sbx, extra).await? {
            ctx.note_wake_started(&sbx.uid().unwrap_or_default());
            ctx.metrics.wakes.with_label_values(&["requested"]).inc();
        }
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn pool_of(ctx: &Context, sbx: &Sandbox, ns: &str) -> Option<Arc<SandboxPool>> {
    ctx.pools
        .get(&ObjectRef::new(&sbx.spec.pool_ref).within(ns))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
}

/// Releases a bound (or paused) sandbox whose pool the cache misses, once the API server
/// confirms the pool is gone or going: a release decided from a cache alone could end a live
/// session over a lagging watch. Otherwise looks again soon.
async fn release_if_pool_gone(ctx: &Context, sbx: &Sandbox, ns: &str) -> Result<Action> {
    let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), ns);
    let gone = match api.get(&sbx.spec.pool_ref).await {
        Ok(p) => p.metadata.deletion_timestamp.is_some(),
        Err(e) if is_not_found(&e) => true,
        Err(e) => return Err(e.into()),
    };
    if !gone {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    release(ctx, sbx, ReleaseReason::PoolDeleted).await?;
    Ok(Action::await_change())
}

/// Writes conditions onto a sandbox that stays where it is (nothing else changes).
async fn hold(
    ctx: &Context,
    sbx: &Sandbox,
    phase: Phase,
    (cond, holds): (&str, bool),
    reason: &str,
    msg: String,
) -> Result<()> {
    let mut st = sbx.status.clone().unwrap_or_default();
    let changed = set_condition(
        &mut st.conditions,
        sbx.metadata.generation,
        cond,
        holds,
        reason,
        &msg,
    ) || st.phase != phase
        || st.observed_generation != sbx.metadata.generation;
    st.observed_generation = sbx.metadata.generation;
    if !changed {
        return Ok(());
    }
    st.phase = phase;
    ctx.event(sbx, true, reason, "Claim", msg);
    let ns = namespace_of(sbx)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.leader.check()?;
    api.patch_status(
        &sbx.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": st })),
    )
    .await?;
    Ok(())
}

async fn claim(ctx: &Arc<Context>, sbx: &Sandbox) -> Result<Action> {
    let ns = namespace_of(sbx)?;
    let pool_name = sbx.spec.pool_ref.clone();
    let Some(pool) = pool_of(ctx, sbx, &ns) else {
        let msg = format!("SandboxPool {ns}/{pool_name} does not exist");
        hold(
            ctx,
            sbx,
            Phase::Pending,
            ("PoolMissing", true),
            "PoolMissing",
            msg,
        )
        .await?;
        return Ok(Action::await_change());
    };
    let settings = match PoolSettings::resolve(&pool.spec)
        .and_then(|p| SandboxSettings::resolve(&sbx.spec, &p).map(|s| (p, s)))
    {
        Ok(s) => s,
        Err(invalid) => {
            hold(
                ctx,
                sbx,
                Phase::Pending,
                ("Invalid", true),
                "Invalid",
                invalid.to_string(),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let (pool_settings, settings) = settings;
    let warm = !pool_settings.per_sandbox_volumes && has_candidates(ctx, sbx, &pool)?;
    // A pool with per-sandbox volumes builds each sandbox's pod (with its volumes).
    let cold = pool_settings.on_empty == OnEmpty::Cold || pool_settings.per_sandbox_volumes;
    if !warm && !cold {
        // Nothing to bind: wait (watch-driven) or fail, with no write on the way.
        let age_ms =
            now_ms().saturating_sub(sbx.metadata.creation_timestamp.as_ref().map_or(0, time_ms));
        let wait_ms = u64::try_from(pool_settings.claim_wait.as_millis()).unwrap_or(u64::MAX);
        if pool_settings.on_empty == OnEmpty::Wait && age_ms < wait_ms {
            ctx.metrics
                .claims
                .with_label_values(&[&pool_name, "none", "empty"])
                .inc();
            // A pool pod turning warm re-triggers this reconcile (the pod watch maps it to the
            // pool's pending sandboxes); the requeue is the claimWait bound.
            // Pod events wake only the oldest few waiters (see run.rs), so look again within a
            // second as well.
            return Ok(Action::requeue(Duration::from_millis(
                (wait_ms - age_ms).min(1000),
            )));
        }
        ctx.metrics
            .claims
            .with_label_values(&[&pool_name, "none", "failed"])
            .inc();
        let msg = format!("pool {pool_name} had no warm sandbox");
        hold(ctx, sbx, Phase::Failed, ("Ready", false), "PoolEmpty", msg).await?;
        return Ok(Action::await_change());
    }
    let token = if settings.require_token {
        Some(ensure_token(ctx, sbx).await?)
    } else {
        None
    };
    let token_sha = token_hash(&settings, token.as_deref());
    // A pod an earlier attempt built (its status write failed) is this claim's: never a second
    // one with the same volumes. Only where a claim builds pods (a scan of the pod cache per
    // warm claim would make a burst of claims quadratic; a warm retry is fenced by the patch).
    let adopted = if cold && !warm {
        crate::claim::owned_live_pod(ctx, sbx).await?
    } else {
        None
    };
    let id = match &adopted {
        Some((_, id)) => id.clone(),
        None => crate::ids::new_unique_id(|c| ctx.id_taken(c))?,
    };
    ctx.note_drawn(&id);
    let mut bound = match adopted {
        Some((pod, _)) => Bound::Pod(pod, Launch::Cold),
        None => Bound::Empty,
    };
    if warm && matches!(bound, Bound::Empty) {
        bound = bind_warm(ctx, sbx, &pool, &settings, &id, token_sha.as_deref()).await?;
    }
    if matches!(bound, Bound::Empty) {
        if !cold {
            // Every candidate was taken meanwhile: try again (the cache catches up).
            return Ok(Action::requeue(Duration::from_millis(20)));
        }
        if pool_settings.per_sandbox_volumes {
            crate::pause::ensure_volumes(ctx, sbx, &pool).await?;
        }
        bound = bind_cold(ctx, sbx, &pool, &settings, &id, token_sha.as_deref()).await?;
    }
    let Bound::Pod(pod, launch) = bound else {
        return Ok(Action::await_change());
    };
    let prev = sbx.status.clone().unwrap_or_default();
    let secret = token.as_ref().map(|_| crate::claim::secret_name(sbx));
    let mut st = bound_status(ctx, &prev, &pod, launch, &id, &settings, secret);
    clear_condition(&mut st.conditions, "PoolMissing");
    clear_condition(&mut st.conditions, "Invalid");
    st.observed_generation = sbx.metadata.generation;
    ready_condition(&mut st, sbx.metadata.generation);
    if !record(ctx, sbx, &pod, st.clone()).await? {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    ctx.note_bound(&sbx.uid().unwrap_or_default(), st.clone());
    let launch_label = if launch == Launch::Warm {
        "warm"
    } else {
        "cold"
    };
    ctx.metrics
        .claims
        .with_label_values(&[&pool_name, launch_label, "bound"])
        .inc();
    if st.phase == Phase::Ready {
        observe_ready(ctx, sbx, launch_label);
    }
    ctx.metrics
        .transitions
        .with_label_values(&["Pending", &format!("{:?}", st.phase)])
        .inc();
    ctx.event(
        sbx,
        false,
        "Claimed",
        "Claim",
        format!(
            "bound pod {} ({launch_label}) as sandbox {id}",
            pod.name_any()
        ),
    );
    Ok(next_check(&settings, &st))
}

/// The `Ready` condition of a bound sandbox: True once its pod is Ready (routed).
fn ready_condition(st: &mut crate::crd::SandboxStatus, generation: Option<i64>) {
    let ready = st.phase == Phase::Ready;
    let (reason, msg) = if ready {
        ("PodReady", "bound and routed")
    } else {
        ("PodStarting", "bound; waiting for the pod to be Ready")
    };
    set_condition(&mut st.conditions, generation, "Ready", ready, reason, msg);
}

fn observe_ready(ctx: &Context, sbx: &Sandbox, launch: &str) {
    let created = sbx.metadata.creation_timestamp.as_ref().map_or(0, time_ms);
    let secs = now_ms().saturating_sub(created) as f64 / 1000.0;
    ctx.metrics
        .claim_seconds
        .with_label_values(&[launch])
        .observe(secs);
}

/// When to look again: at the lifetime's end (pod and pool changes trigger on their own).
fn next_check(settings: &SandboxSettings, st: &crate::crd::SandboxStatus) -> Action {
    match (settings.max_lifetime, st.claimed_at.as_ref()) {
        (Some(max), Some(at)) => {
            let end = time_ms(at) + u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
            Action::requeue(Duration::from_millis(end.saturating_sub(now_ms()).max(10)))
        }
        _ => Action::requeue(Duration::from_secs(300)),
    }
}

/// A bound sandbox: turn Ready with its pod, expire, or release when the pod or pool is gone.
async fn watch_bound(ctx: &Arc<Context>, sbx: &Sandbox) -> Result<Action> {
    let ns = namespace_of(sbx)?;
    let mut st = sbx.status.clone().unwrap_or_default();
    let Some(pool) = pool_of(ctx, sbx, &ns) else {
        return release_if_pool_gone(ctx, sbx, &ns).await;
    };
    let settings = PoolSettings::resolve(&pool.spec)
        .and_then(|p| SandboxSettings::resolve(&sbx.spec, &p).map(|s| (p, s)));
    let Ok((pool_settings, settings)) = settings else {
        // The pool or the overrides became invalid after the claim: keep serving as bound.
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    if let (Some(max), Some(at)) = (settings.max_lifetime, st.claimed_at.as_ref()) {
        if now_ms().saturating_sub(time_ms(at))
            >= u64::try_from(max.as_millis()).unwrap_or(u64::MAX)
        {
            release(ctx, sbx, ReleaseReason::Expired).await?;
            return Ok(Action::await_change());
        }
    }
    if st.phase == Phase::Ready && settings.paused {
        crate::pause::mark_pausing(ctx, sbx, PauseReason::Spec).await?;
        return Ok(Action::await_change());
    }
    let name = st.pod_name.clone().unwrap_or_default();
    let pod: Option<Arc<Pod>> = ctx.pods.get(&ObjectRef::new(&name).within(&ns));
    let uid = sbx.uid();
    let alive = pod.as_ref().filter(|p| {
        p.uid() == st.pod_uid
            && sandbox_owner(p) == uid.as_deref()
            && p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed") | Some("Succeeded")
            )
    });
    let Some(pod) = alive else {
        // Confirm with the API server before releasing: the cache may lag our own claim.
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        match pods.get(&name).await {
            Ok(p)
                if p.uid() == st.pod_uid
                    && p.metadata.deletion_timestamp.is_none()
                    && !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Failed") | Some("Succeeded")
                    ) =>
            {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        // The cache may also lag a pause or resume of this sandbox (its pod deleted or replaced
        // on purpose): release only if the API server still binds it to this pod.
        let fresh = Api::<Sandbox>::namespaced(ctx.client.clone(), &ns)
            .get(&sbx.name_any())
            .await?;
        let same = fresh
            .status
            .as_ref()
            .is_some_and(|f| f.phase == st.phase && f.pod_uid == st.pod_uid);
        if !same {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        if st.phase == Phase::Resuming {
            let msg = format!("pod {name} failed or was deleted before it was Ready");
            return crate::pause::resume_failed(ctx, sbx, "PodFailed", msg).await;
        }
        release(ctx, sbx, ReleaseReason::PodFailed).await?;
        return Ok(Action::await_change());
    };
    let mut changed = false;
    if st.phase == Phase::Resuming {
        use crate::decide::resume::{progress, Progress};
        let created = pod.metadata.creation_timestamp.as_ref().map_or(0, time_ms);
        let ready = ready_since_ms(pod).is_some();
        match progress(ready, created, pool_settings.startup_timeout, now_ms()) {
            Progress::Ready => {
                st.pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                crate::pause::finish_resume(ctx, sbx, &mut st).await?;
                return Ok(next_check(&settings, &st));
            }
            // The pod's changes trigger this reconcile; the requeue is the deadline.
            Progress::Starting(left) => return Ok(Action::requeue(left)),
            Progress::TimedOut => {
                let msg = format!(
                    "pod {name} was not Ready within the pool's startupTimeout ({}s)",
                    pool_settings.startup_timeout.as_secs()
                );
                return crate::pause::resume_failed(ctx, sbx, "StartupTimeout", msg).await;
            }
        }
    }
    if st.phase == Phase::Pending && ready_since_ms(pod).is_some() {
        st.phase = Phase::Ready;
        st.ready_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
        st.pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        ready_condition(&mut st, sbx.metadata.generation);
        changed = true;
        let launch = if st.launch == Some(Launch::Cold) {
            "cold"
        } else {
            "warm"
        };
        observe_ready(ctx, sbx, launch);
        ctx.metrics
            .transitions
            .with_label_values(&["Pending", "Ready"])
            .inc();
    }
    if settings.require_token {
        if let Some(secret) = st.token_secret.clone() {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let missing = matches!(secrets.get(&secret).await, Err(ref e) if is_not_found(e));
            if missing {
                let msg = format!(
                    "the token Secret {secret} was deleted: the sandbox keeps its token, \
                     which nobody can read back; delete the Sandbox to get a new one"
                );
                if set_condition(
                    &mut st.conditions,
                    sbx.metadata.generation,
                    "TokenMissing",
                    true,
                    "SecretDeleted",
                    &msg,
                ) {
                    ctx.event(sbx, true, "TokenMissing", "Check", msg);
                    changed = true;
                }
            } else {
                changed |= clear_condition(&mut st.conditions, "TokenMissing");
            }
        }
    }
    if changed {
        ctx.leader.check()?;
        let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &sbx.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": st })),
        )
        .await?;
    }
    Ok(next_check(&settings, &st))
}

/// The error policy of the sandbox controller: count, log, retry soon.
pub fn error_policy(sbx: Arc<Sandbox>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["sandbox", err.metric_label()])
        .inc();
    match err {
        Error::NotLeader => {}
        // A lost race on a resourceVersion: retried in 50 ms, expected under load.
        Error::Kube(kube::Error::Api(s)) if s.code == 409 => {
            tracing::debug!(sandbox = %sbx.name_any(), error = %err, "sandbox reconcile conflict");
        }
        _ => tracing::warn!(sandbox = %sbx.name_any(), error = %err, "sandbox reconcile failed"),
    }
    Action::requeue(err.retry_after())
}
