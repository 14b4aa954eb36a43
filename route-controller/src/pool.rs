//! The `SandboxPool` reconcile: keep `replicas` warm pods, replace failed and outdated ones,
//! scale down by deleting unclaimed pods only, and report counts and conditions in the status.
//! The decisions are [`crate::decide::pool::plan`]'s; this file gathers its inputs and acts.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::ResourceExt;
use serde_json::json;

use crate::conditions::{clear_condition, set_condition};
use crate::context::{now_ms, Context};
use crate::crd::{SandboxPool, SandboxPoolStatus, POOL_LABEL};
use crate::decide::pool::{plan, PodInfo};
use crate::error::{is_conflict, is_not_found, namespace_of, Error, Result};
use crate::pods::{pod_info, template_hash, warm_pod};
use crate::spec::PoolSettings;

/// The pods of a pool, from a pod cache.
pub fn pool_pods(pods: &Store<Pod>, ns: &str, pool: &str) -> Vec<Arc<Pod>> {
    pods.state_filter(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.labels().get(POOL_LABEL).map(String::as_str) == Some(pool)
    })
}

/// Reconciles one pool.
pub async fn reconcile(pool: Arc<SandboxPool>, ctx: Arc<Context>) -> Result<Action> {
    let ns = namespace_of(&*pool)?;
    let name = pool.name_any();
    if pool.metadata.deletion_timestamp.is_some() {
        // Its warm pods go with it (owner references); its sandboxes see it missing.
        ctx.forget_pool(&ns, &name);
        return Ok(Action::await_change());
    }
    ctx.leader.check()?;
    if !ctx.metrics.is_ready() {
        // Until the pod caches have listed, the pool's pods look missing: creating for them
        // would over-create after every restart.
        return Ok(Action::requeue(std::time::Duration::from_millis(200)));
    }
    let api_pool: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
    let settings = match PoolSettings::resolve(&pool.spec) {
        Ok(s) => s,
        Err(invalid) => {
            let mut st = pool.status.clone().unwrap_or_default();
            let changed = set_condition(
                &mut st.conditions,
                pool.metadata.generation,
                "TemplateInvalid",
                true,
                "Invalid",
                &invalid.to_string(),
            );
            set_condition(
                &mut st.conditions,
                pool.metadata.generation,
                "Ready",
                false,
                "TemplateInvalid",
                &invalid.to_string(),
            );
            st.observed_generation = pool.metadata.generation;
            if changed {
                ctx.event(
                    &*pool,
                    true,
                    "TemplateInvalid",
                    "Validate",
                    invalid.to_string(),
                );
            }
            write_status(&ctx, &api_pool, &pool, st).await?;
            return Ok(Action::await_change());
        }
    };
    let hash = template_hash(&pool)?;
    let now = now_ms();
    let cached = pool_pods(&ctx.pool_pods, &ns, &name);
    let infos: Vec<PodInfo> = cached.iter().map(|p| pod_info(p, &hash)).collect();
    let startup_ms = u64::try_from(settings.startup_timeout.as_millis()).unwrap_or(u64::MAX);
    let (p, budget_wait) = ctx.with_pool(&ns, &name, |st| {
        st.expectations.observe(&infos, now);
        let budget = st.budget.available(now);
        let p = plan(
            settings.replicas as usize,
            &infos,
            &st.expectations,
            now,
            startup_ms,
            budget,
        );
        st.budget.spend(p.create);
        (p, st.budget.ms_until_next())
    });

    tracing::debug!(pool = %name, create = p.create, delete = p.delete.len(), warm = p.counts.warm,
        starting = p.counts.starting, claimed = p.counts.claimed, budget_wait, "pool plan");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let deadline = now + u64::try_from(ctx.cfg.expectation_timeout.as_millis()).unwrap_or(0);
    let mut created = 0usize;
    for _ in 0..p.create {
        ctx.leader.check()?;
        let pod = warm_pod(&pool, &hash)?;
        let got = pods.create(&PostParams::default(), &pod).await?;
        ctx.metrics.pool_writes.with_label_values(&["create"]).inc();
        created += 1;
        if let Some(uid) = got.uid() {
            ctx.with_pool(&ns, &name, |st| {
                st.expectations.expect_create(uid, deadline)
            });
        }
    }
    for (pod_name, uid, rv, why) in &p.delete {
        ctx.leader.check()?;
        // Fenced on the pod we judged: if a claim bound it meanwhile, its resourceVersion moved
        // and the delete is refused. A claimed pod is never deleted by its pool.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: Some(rv.clone()),
            }),
            ..Default::default()
        };
        match pods.delete(pod_name, &dp).await {
            Ok(_) => {
                ctx.metrics.pool_writes.with_label_values(&["delete"]).inc();
                tracing::info!(pool = %name, pod = %pod_name, reason = ?why, "deleted pool pod");
                ctx.with_pool(&ns, &name, |st| {
                    st.expectations.expect_delete(uid.clone(), deadline)
                });
            }
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }

    let c = p.counts;
    for (phase, n) in [
        ("warm", c.warm),
        ("starting", c.starting),
        ("claimed", c.claimed),
        ("failed", c.failed),
        ("outdated", c.outdated),
    ] {
        ctx.metrics
            .pool_pods
            .with_label_values(&[&name, phase])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let mut st = pool.status.clone().unwrap_or_default();
    let gen = pool.metadata.generation;
    st.observed_generation = gen;
    st.replicas = i32::try_from(c.warm).unwrap_or(i32::MAX);
    st.starting = i32::try_from(c.starting).unwrap_or(i32::MAX);
    st.claimed = i32::try_from(c.claimed).unwrap_or(i32::MAX);
    st.failed = i32::try_from(c.failed).unwrap_or(i32::MAX);
    st.outdated = i32::try_from(c.outdated).unwrap_or(i32::MAX);
    st.selector = Some(format!("{POOL_LABEL}={name}"));
    st.template_hash = Some(hash);
    clear_condition(&mut st.conditions, "TemplateInvalid");
    let full = c.warm >= settings.replicas as usize;
    set_condition(
        &mut st.conditions,
        gen,
        "Ready",
        full,
        if full { "Full" } else { "Filling" },
        &format!("{} of {} warm", c.warm, settings.replicas),
    );
    if c.failed > 0 {
        set_condition(
            &mut st.conditions,
            gen,
            "ReplicaFailure",
            true,
            "PodsFailed",
            &format!("{} pods failed or missed the startup timeout", c.failed),
        );
    } else {
        clear_condition(&mut st.conditions, "ReplicaFailure");
    }
    write_status(&ctx, &api_pool, &pool, st).await?;

    // Come back when the budget allows the rest, or to catch startup timeouts.
    let short = created < p.create || (c.warm + c.starting) < settings.replicas as usize;
    Ok(if short && budget_wait > 0 {
        Action::requeue(Duration::from_millis(budget_wait.max(10)))
    } else if c.starting > 0 {
        Action::requeue(settings.startup_timeout.min(Duration::from_secs(30)))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

/// Writes the status when it changed (a merge patch of `/status`).
async fn write_status(
    ctx: &Context,
    api: &Api<SandboxPool>,
    pool: &SandboxPool,
    st: SandboxPoolStatus,
) -> Result<()> {
    if pool.status.as_ref() == Some(&st) {
        return Ok(());
    }
    ctx.leader.check()?;
    let patch = json!({ "status": st });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// The error policy of the pool controller: count, log, retry soon.
pub fn error_policy(pool: Arc<SandboxPool>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["pool", err.metric_label()])
        .inc();
    if !matches!(err, Error::NotLeader) {
        tracing::warn!(pool = %pool.name_any(), error = %err, "pool reconcile failed");
    }
    Action::requeue(err.retry_after())
}
