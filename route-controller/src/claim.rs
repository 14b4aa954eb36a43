//! The claim: bind a warm pod to a `Sandbox` in three writes on the critical path.
//!
//! 1. the Secret with the access token (created, or read back when a previous attempt made it);
//! 2. the pod: one JSON patch under a `test` of its resourceVersion that adds the route label,
//!    the port, token-hash and sandbox annotations and makes the Sandbox its owner. A conflict
//!    means another writer touched the pod first: the next candidate is tried. This is the only
//!    write that binds, so a stale cache can lose a race but never bind one pod twice;
//! 3. the Sandbox status, under the Sandbox's resourceVersion. If another claim for the same
//!    Sandbox already recorded a different pod, ours is deleted: one sandbox never keeps two.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::ResourceExt;
use routing::contract::token_sha256_hex;
use serde_json::json;

use crate::context::Context;
use crate::crd::{Launch, Phase, Sandbox, SandboxPool, SandboxStatus};
use crate::decide::claim::candidates;
use crate::error::{is_conflict, is_not_found, namespace_of, Error, Result};
use crate::pods::{claim_patch, cold_pod, pod_info, template_hash};
use crate::pool::pool_pods;
use crate::spec::SandboxSettings;

/// The key of the token in the Secret.
pub const TOKEN_KEY: &str = "token";

/// The Secret's name for a sandbox.
pub fn secret_name(sbx: &Sandbox) -> String {
    format!("{}-token", sbx.name_any())
}

/// Creates the sandbox's token Secret (owned by the Sandbox), or reads the existing one.
pub async fn ensure_token(ctx: &Context, sbx: &Sandbox) -> Result<String> {
    let ns = namespace_of(sbx)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = secret_name(sbx);
    let token = crate::ids::new_token()?;
    let owner = crate::pods::controller_ref(sbx)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            owner_references: Some(vec![owner]),
            labels: Some(BTreeMap::from([(
                crate::crd::SANDBOX_NAME_ANNOTATION.to_string(),
                sbx.name_any(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.clone().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    ctx.leader.check()?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(token),
        Err(e) if is_conflict(&e) => read_token(&api, &name).await,
        Err(e) => Err(e.into()),
    }
}

async fn read_token(api: &Api<Secret>, name: &str) -> Result<String> {
    let s = api.get(name).await?;
    s.data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or(Error::MissingField("the token Secret's data.token"))
}

/// The result of trying to bind a pod.
pub enum Bound {
    /// This pod is now the sandbox's.
    Pod(Box<Pod>, Launch),
    /// No warm pod was free.
    Empty,
}

/// The pool's pods in the claim cache, and the UIDs of those a claim may take, best first.
fn warm_candidates(
    ctx: &Context,
    ns: &str,
    pool: &SandboxPool,
) -> Result<(Vec<Arc<Pod>>, Vec<String>)> {
    let hash = template_hash(pool)?;
    let cached = pool_pods(&ctx.pods, ns, &pool.name_any());
    let infos: Vec<_> = cached.iter().map(|p| pod_info(p, &hash)).collect();
    let reserved = ctx.reserved();
    let order = ctx.with_pool(ns, &pool.name_any(), |st| {
        candidates(&infos, &reserved, |uid| {
            st.expectations.is_pending_delete(uid)
        })
        .into_iter()
        .map(|p| p.uid.clone())
        .collect()
    });
    Ok((cached, order))
}

/// Whether the cache shows a warm pod a claim could take (so an empty pool costs no writes).
pub fn has_candidates(ctx: &Context, sbx: &Sandbox, pool: &SandboxPool) -> Result<bool> {
    let ns = namespace_of(sbx)?;
    Ok(!warm_candidates(ctx, &ns, pool)?.1.is_empty())
}

/// Tries the pool's warm pods in order until one binds.
pub async fn bind_warm(
    ctx: &Arc<Context>,
    sbx: &Sandbox,
    pool: &SandboxPool,
    settings: &SandboxSettings,
    id: &str,
    token_sha: Option<&str>,
) -> Result<Bound> {
    let ns = namespace_of(sbx)?;
    let (cached, order) = warm_candidates(ctx, &ns, pool)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for uid in order {
        if !ctx.reserve(&uid) {
            continue;
        }
        let Some(pod) = cached
            .iter()
            .find(|p| p.uid().as_deref() == Some(uid.as_str()))
        else {
            ctx.unreserve(&uid);
            continue;
        };
        let res = async {
            ctx.leader.check()?;
            let patch = claim_patch(pod, sbx, id, settings.port, token_sha)?;
            pods.patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
            .map_err(Error::from)
        }
        .await;
        ctx.unreserve(&uid);
        match res {
            Ok(p) => return Ok(Bound::Pod(Box::new(p), Launch::Warm)),
            // Lost the race for this pod (409, or the `test` failed: 422): take the next.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 || s.code == 422 => {
                ctx.metrics
                    .claims
                    .with_label_values(&[&pool.name_any(), "warm", "conflict"])
                    .inc();
            }
            Err(Error::Kube(e)) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Bound::Empty)
}

/// A live pod this sandbox already owns that carries a route label: one an earlier attempt
/// bound (a warm patch or a cold create) before its status write failed. A retry takes it
/// instead of binding another (two pods with one ID, both mounting its volumes). The cache only
/// nominates it: the pod is read from the API server, so a pod whose deletion the cache has not
/// seen yet (the one a pause just deleted) is never taken.
pub async fn owned_live_pod(ctx: &Context, sbx: &Sandbox) -> Result<Option<(Box<Pod>, String)>> {
    let (Some(uid), Some(ns)) = (sbx.uid(), sbx.namespace()) else {
        return Ok(None);
    };
    let live = |p: &Pod| {
        p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed") | Some("Succeeded")
            )
            && crate::pods::sandbox_owner(p) == Some(uid.as_str())
            && p.labels().contains_key(routing::contract::SANDBOX_ID_LABEL)
    };
    let nominee = ctx
        .pods
        .state()
        .into_iter()
        .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && live(p));
    let Some(nominee) = nominee else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = match pods.get(&nominee.name_any()).await {
        Ok(p) if p.uid() == nominee.uid() && live(&p) => p,
        Ok(_) => return Ok(None),
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(id) = fresh
        .labels()
        .get(routing::contract::SANDBOX_ID_LABEL)
        .cloned()
    else {
        return Ok(None);
    };
    Ok(Some((Box::new(fresh), id)))
}

/// Starts a pod for this claim alone (`onEmpty: Cold`).
pub async fn bind_cold(
    ctx: &Context,
    sbx: &Sandbox,
    pool: &SandboxPool,
    settings: &SandboxSettings,
    id: &str,
    token_sha: Option<&str>,
) -> Result<Bound> {
    let ns = namespace_of(sbx)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut pod = cold_pod(
        pool,
        &template_hash(pool)?,
        sbx,
        id,
        settings.port,
        token_sha,
    )?;
    crate::pause::mount_volumes(&mut pod, sbx, pool);
    ctx.leader.check()?;
    let p = pods.create(&PostParams::default(), &pod).await?;
    Ok(Bound::Pod(Box::new(p), Launch::Cold))
}

/// The token's hash for the pod, when the sandbox requires one.
pub fn token_hash(settings: &SandboxSettings, token: Option<&str>) -> Option<String> {
    settings
        .require_token
        .then(|| token.map(|t| token_sha256_hex(t.as_bytes())))
        .flatten()
}

/// Records the bound pod in the Sandbox's status (write 3). Returns false when another claim
/// recorded a different pod first; ours has then been deleted.
pub async fn record(
    ctx: &Context,
    sbx: &Sandbox,
    pod: &Pod,
    status: SandboxStatus,
) -> Result<bool> {
    let ns = namespace_of(sbx)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let mut rv = sbx.resource_version();
    for _ in 0..5 {
        ctx.leader.check()?;
        let patch = json!({ "metadata": { "resourceVersion": rv }, "status": status });
        match api
            .patch_status(
                &sbx.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_conflict(&e) => {
                let fresh = api.get(&sbx.name_any()).await?;
                let theirs = fresh.status.as_ref().and_then(|s| s.pod_uid.clone());
                if theirs.is_some() && theirs != pod.uid() {
                    unbind(ctx, &ns, pod).await?;
                    return Ok(false);
                }
                rv = fresh.resource_version();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::MissingField("a status write that does not conflict"))
}

async fn unbind(ctx: &Context, ns: &str, pod: &Pod) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    ctx.leader.check()?;
    match pods.delete(&pod.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The status of a sandbox bound to `pod`.
pub fn bound_status(
    ctx: &Context,
    prev: &SandboxStatus,
    pod: &Pod,
    launch: Launch,
    id: &str,
    settings: &SandboxSettings,
    secret: Option<String>,
) -> SandboxStatus {
    let ready = crate::pods::ready_since_ms(pod).is_some();
    let now = Time(jiff::Timestamp::now());
    SandboxStatus {
        phase: if ready { Phase::Ready } else { Phase::Pending },
        sandbox_id: Some(id.to_string()),
        pod_name: Some(pod.name_any()),
        pod_uid: pod.uid(),
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        launch: Some(launch),
        claimed_at: Some(prev.claimed_at.clone().unwrap_or_else(|| now.clone())),
        ready_at: ready.then_some(now),
        token_secret: secret,
        url: ctx.cfg.url_template.as_ref().map(|t| {
            t.replace("{id}", id)
                .replace("{port}", &settings.port.to_string())
        }),
        ..prev.clone()
    }
}
