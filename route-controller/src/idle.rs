//! The idle pass: every `idle_interval`, ask **every** sandbox-extproc replica for last-active
//! times, merge them with what the statuses remember, and mark sandboxes idle by the rule in
//! [`crate::decide::idle`]. A sandbox judged idle is re-checked just before it is marked: its
//! object is read again from the API server and every replica is asked again about it alone.
//! Marking writes `phase: Releasing, releaseReason: Idle` (or, with `idlePolicy: Pause`,
//! `phase: Pausing, pauseReason: Idle`) under the object's resourceVersion; the sandbox
//! reconcile then takes the route away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use sandbox_gateway_proto::v1::activity_service_client::ActivityServiceClient;
use sandbox_gateway_proto::v1::GetLastActiveRequest;
use serde_json::json;

use crate::context::{now_ms, time_ms, Context, Replicas};
use crate::crd::{IdlePolicy, PauseReason, Phase, ReleaseReason, Sandbox};
use crate::decide::idle::{judge, merge, should_store, Answer, Clock, Reply, Sight, Verdict};
use crate::error::{namespace_of, Result};
use crate::spec::{PoolSettings, SandboxSettings};

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs passes until the task is dropped (only while leading: see `run`).
pub async fn run(ctx: Arc<Context>) {
    let Some(replicas) = ctx.cfg.replicas.clone() else {
        tracing::info!("no activity replicas configured: idle reclaim is off");
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(ctx.cfg.idle_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.leader.check().is_err() {
            continue;
        }
        match pass(&ctx, &replicas).await {
            Ok(n) if n > 0 => tracing::info!(marked = n, "idle pass marked sandboxes idle"),
            Ok(_) => {}
            Err(e) => {
                ctx.metrics
                    .reconcile_errors
                    .with_label_values(&["idle", e.metric_label()])
                    .inc();
                tracing::warn!(error = %e, "idle pass failed");
            }
        }
    }
}

/// The endpoints to ask, each with whether it is ready.
async fn endpoints(ctx: &Context, replicas: &Replicas) -> Result<Vec<(String, bool)>> {
    match replicas {
        Replicas::Static(list) => Ok(list.iter().map(|e| (e.clone(), true)).collect()),
        Replicas::Service {
            namespace,
            name,
            port,
        } => {
            let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), namespace);
            let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
            let mut out = Vec::new();
            for slice in api.list(&lp).await? {
                for ep in slice.endpoints {
                    // Ready unset means ready (the API's rule); terminating endpoints are asked
                    // too, but an unready one makes the pass blind.
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    for addr in ep.addresses {
                        let host = if addr.contains(':') {
                            format!("[{addr}]")
                        } else {
                            addr
                        };
                        out.push((format!("http://{host}:{port}"), ready));
                    }
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        }
    }
}

/// Asks one replica, within the query timeout.
async fn query(ctx: &Context, endpoint: &str, ids: &[String]) -> Reply {
    let timeout = ctx.cfg.query_timeout;
    let fut = async {
        let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut req = tonic::Request::new(GetLastActiveRequest {
            sandbox_ids: ids.to_vec(),
        });
        if let Some(t) = &ctx.cfg.activity_token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| "the activity token is not a valid header value".to_string())?;
            req.metadata_mut().insert("authorization", v);
        }
        let r = ActivityServiceClient::new(ch)
            .get_last_active(req)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        Ok::<_, String>(Answer {
            replica: r.replica,
            collecting_since_ms: r.collecting_since_ms,
            evicted_total: r.evicted_total,
            last_active: r
                .entries
                .into_iter()
                .map(|e| (e.sandbox_id, e.last_active_ms))
                .collect(),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(a)) => Reply::Answered(a),
        Ok(Err(why)) => Reply::Failed(why),
        Err(_) => Reply::Failed("timed out".into()),
    }
}

/// Asks every endpoint (about `ids`, or everything when empty) and merges the answers.
async fn look(ctx: &Context, replicas: &Replicas, ids: &[String]) -> Result<Sight, String> {
    let eps = endpoints(ctx, replicas).await.map_err(|e| {
        ctx.metrics
            .idle_passes
            .with_label_values(&["replica_unreachable"])
            .inc();
        format!("listing replicas: {e}")
    })?;
    let replies = join_all(eps.iter().map(|(ep, ready)| async move {
        let reply = if *ready {
            query(ctx, ep, ids).await
        } else {
            Reply::NotReady
        };
        (ep.clone(), reply)
    }))
    .await;
    let mut seen = ctx.evicted_seen.lock().unwrap_or_else(|e| e.into_inner());
    merge(&replies, &mut seen).map_err(|b| {
        ctx.metrics
            .idle_passes
            .with_label_values(&[b.label()])
            .inc();
        format!("{b:?}")
    })
}

/// What idleness does to `sbx` (its override, else its pool's; `Release` if unresolvable).
fn idle_policy(ctx: &Context, sbx: &Sandbox) -> IdlePolicy {
    let Some(ns) = sbx.namespace() else {
        return IdlePolicy::Release;
    };
    ctx.pools
        .get(&ObjectRef::new(&sbx.spec.pool_ref).within(&ns))
        .and_then(|pool| {
            PoolSettings::resolve(&pool.spec)
                .and_then(|p| SandboxSettings::resolve(&sbx.spec, &p))
                .ok()
        })
        .map_or(IdlePolicy::Release, |s| s.idle_policy)
}

fn clock(ctx: &Context, sbx: &Sandbox) -> Option<Clock> {
    let st = sbx.status.as_ref()?;
    let ns = sbx.namespace()?;
    let pool = ctx
        .pools
        .get(&ObjectRef::new(&sbx.spec.pool_ref).within(&ns))?;
    let settings = PoolSettings::resolve(&pool.spec)
        .and_then(|p| SandboxSettings::resolve(&sbx.spec, &p))
        .ok()?;
    // Status times are whole seconds on the wire: read them as the end of their second, so
    // the rounding can only make a sandbox look more recently active, never less.
    let ceil = |t: &Time| time_ms(t) + 999;
    Some(Clock {
        claimed_ms: st.claimed_at.as_ref().map(time_ms)?,
        ready_ms: st.ready_at.as_ref().map(ceil),
        stored_last_active_ms: st.last_active_at.as_ref().map(ceil),
        idle_timeout_ms: settings.idle_timeout.map(millis),
        max_lifetime_ms: settings.max_lifetime.map(millis),
    })
}

/// One pass; returns how many sandboxes it marked idle. A blind pass marks none.
pub async fn pass(ctx: &Context, replicas: &Replicas) -> Result<usize> {
    let sight = match look(ctx, replicas, &[]).await {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(why = %why, "idle pass blind: releasing nothing");
            return Ok(0);
        }
    };
    ctx.metrics
        .idle_passes
        .with_label_values(&["sighted"])
        .inc();
    let now = now_ms();
    let mut marked = 0;
    for sbx in ctx.sandboxes.state() {
        let Some(st) = sbx.status.as_ref() else {
            continue;
        };
        if st.phase != Phase::Ready || sbx.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(id), Some(c)) = (st.sandbox_id.as_deref(), clock(ctx, &sbx)) else {
            continue;
        };
        match judge(&c, id, Some(&sight), now) {
            Verdict::Keep { .. } | Verdict::Expired => {
                let reported = sight.last_active.get(id).copied().unwrap_or(0);
                if should_store(c.stored_last_active_ms, reported, c.idle_timeout_ms) {
                    store_last_active(ctx, &sbx, reported).await?;
                }
            }
            Verdict::Idle { .. } => {
                if recheck_and_mark(ctx, replicas, &sbx, id).await? {
                    marked += 1;
                }
            }
        }
    }
    Ok(marked)
}

async fn store_last_active(ctx: &Context, sbx: &Sandbox, at_ms: u64) -> Result<()> {
    let ns = namespace_of(sbx)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let t = jiff::Timestamp::from_millisecond(i64::try_from(at_ms).unwrap_or(i64::MAX))
        .unwrap_or_else(|_| jiff::Timestamp::now());
    ctx.leader.check()?;
    let patch = json!({ "status": { "lastActiveAt": Time(t) } });
    api.patch_status(
        &sbx.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Re-reads the sandbox, asks every replica about it alone, and marks it idle only if it still
/// is. Returns whether it was marked.
async fn recheck_and_mark(
    ctx: &Context,
    replicas: &Replicas,
    cached: &Sandbox,
    id: &str,
) -> Result<bool> {
    let ns = namespace_of(cached)?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = api.get(&cached.name_any()).await?;
    let same = fresh
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Ready && s.sandbox_id.as_deref() == Some(id))
        && fresh.metadata.deletion_timestamp.is_none();
    let Some(c) = clock(ctx, &fresh).filter(|_| same) else {
        return Ok(false);
    };
    let sight = match look(ctx, replicas, &[id.to_string()]).await {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(sandbox = %id, why = %why, "idle re-check blind: keeping it");
            return Ok(false);
        }
    };
    let Verdict::Idle { last_active_ms } = judge(&c, id, Some(&sight), now_ms()) else {
        return Ok(false);
    };
    let status = if idle_policy(ctx, &fresh) == IdlePolicy::Pause {
        json!({ "phase": Phase::Pausing, "pauseReason": PauseReason::Idle })
    } else {
        json!({ "phase": Phase::Releasing, "releaseReason": ReleaseReason::Idle })
    };
    // Fenced on the re-read: changed since (a status write, a deletion) is judged again next
    // pass.
    let marked = ctx.fenced_status(&fresh, status).await?;
    if marked {
        tracing::info!(sandbox = %id, name = %fresh.name_any(), last_active_ms,
            policy = ?idle_policy(ctx, &fresh), "idle");
    }
    Ok(marked)
}

/// The sandboxes' last-active times by ID, as one pass would see them (for tests and the CLI).
pub async fn sight(ctx: &Context, replicas: &Replicas) -> Result<HashMap<String, u64>, String> {
    look(ctx, replicas, &[]).await.map(|s| s.last_active)
}
