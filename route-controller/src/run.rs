//! Wiring: the shared watch caches, the two controllers, the idle pass and leader election.
//!
//! A pod watch (every pod carrying the pool label) feeds the claim cache, and each controller
//! watches pods for its triggers: a pool reconciles when its pods change; a sandbox reconciles when its pod
//! changes and, while it waits for a warm pod, when a pod of its pool changes (waiting is
//! watch-driven, never a poll). Every replica runs the caches and the controllers (so a standby
//! is ready to take over at once); reconciles on a standby return without acting, and winning
//! the Lease reconciles everything.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};

use crate::context::{Config, Context};
use crate::crd::{Phase, Sandbox, SandboxPool, POOL_LABEL};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::pods::{is_claimed, sandbox_owner};

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Waiting sandboxes woken by one pool pod's event.
const WAKE_PER_POD_EVENT: usize = 8;

/// Sandboxes to reconcile when a pod changes: its owner, and the pending sandboxes of its pool
/// when it may have become warm.
fn pod_to_sandboxes(pod: &Pod, sandboxes: &Store<Sandbox>) -> Vec<ObjectRef<Sandbox>> {
    let ns = pod.namespace().unwrap_or_default();
    if let Some(uid) = sandbox_owner(pod) {
        return sandboxes
            .find(|s| s.uid().as_deref() == Some(uid))
            .map(|s| ObjectRef::from_obj(&*s))
            .into_iter()
            .collect();
    }
    if is_claimed(pod) {
        return Vec::new();
    }
    let Some(pool) = pod.labels().get(POOL_LABEL) else {
        return Vec::new();
    };
    let mut waiting = sandboxes.state_filter(|s| {
        s.namespace().as_deref() == Some(&ns)
            && &s.spec.pool_ref == pool
            && s.status
                .as_ref()
                .is_none_or(|st| st.phase == Phase::Pending && st.pod_uid.is_none())
    });
    // A pod that turned warm serves one claim: wake the oldest few waiters, not all of them
    // (waking every waiter on every pod event made a 1,000-claim burst quadratic). The rest
    // look again on their own within a second.
    waiting.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    waiting
        .iter()
        .take(WAKE_PER_POD_EVENT)
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

/// Fires each time this replica wins leadership: every object is then reconciled, since a
/// standby's reconciles did nothing but keep its caches warm.
fn leadership_gained(leader: &Leadership) -> impl futures_util::Stream<Item = ()> + Send + 'static {
    let rx = leader.subscribe();
    futures_util::stream::unfold((rx, false), |(mut rx, mut was)| async move {
        loop {
            let now = *rx.borrow_and_update();
            if now && !was {
                return Some(((), (rx, true)));
            }
            was = now;
            if rx.changed().await.is_err() {
                return None;
            }
        }
    })
}

/// Runs the controllers until they stop. `ready` fires once every cache has synced.
pub async fn run(
    client: Client,
    cfg: Config,
    metrics: Arc<Metrics>,
    leader: Arc<Leadership>,
) -> anyhow::Result<()> {
    let ns = cfg.namespace.clone();
    let ns = ns.as_deref();
    let pod_cfg = watcher::Config::default().labels(POOL_LABEL);

    // Each trigger is a reflector: its cache is updated before the object is handed on, and
    // unlike kube's shared streams it also hands on deletions (a deleted pod must wake its pool
    // and its sandbox). The sandbox side and the pool side keep one pod cache each.
    let (pods, w) = reflector::store::<Pod>();
    let pods_for_sandboxes = reflector(w, watcher(api::<Pod>(&client, ns), pod_cfg.clone()))
        .default_backoff()
        .touched_objects();
    let (pool_pods, w) = reflector::store::<Pod>();
    let pods_for_pools = reflector(w, watcher(api::<Pod>(&client, ns), pod_cfg))
        .default_backoff()
        .touched_objects();
    let (pools, w) = reflector::store::<SandboxPool>();
    let pools_for_sandboxes = reflector(
        w,
        watcher(api::<SandboxPool>(&client, ns), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();

    let ctl_cfg = ControllerConfig::default().concurrency(64);
    let pool_ctl = Controller::new(api::<SandboxPool>(&client, ns), watcher::Config::default())
        .with_config(ctl_cfg.clone());
    let sbx_ctl = Controller::new(api::<Sandbox>(&client, ns), watcher::Config::default())
        .with_config(ctl_cfg);
    let sandboxes = sbx_ctl.store();

    let ctx = Context::new(
        client.clone(),
        cfg.clone(),
        pods.clone(),
        pool_pods.clone(),
        pools.clone(),
        sandboxes.clone(),
        metrics.clone(),
        leader.clone(),
    );

    let pool_ctl = pool_ctl
        .reconcile_all_on(leadership_gained(&leader))
        .watches_stream(pods_for_pools, |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            pod.labels()
                .get(POOL_LABEL)
                .map(|p| ObjectRef::<SandboxPool>::new(p).within(&ns))
        })
        .run(
            crate::pool::reconcile,
            crate::pool::error_policy,
            ctx.clone(),
        )
        .for_each(|_| std::future::ready(()));

    let sbx_store = sandboxes.clone();
    let sbx_store2 = sandboxes.clone();
    let secret_cfg = watcher::Config::default().labels(crate::crd::SANDBOX_NAME_ANNOTATION);
    let sbx_ctl = sbx_ctl
        .reconcile_all_on(leadership_gained(&leader))
        .watches_stream(pods_for_sandboxes, move |pod: Pod| {
            pod_to_sandboxes(&pod, &sbx_store)
        })
        .watches_stream(pools_for_sandboxes, move |pool: SandboxPool| {
            let ns = pool.namespace().unwrap_or_default();
            let name = pool.name_any();
            sbx_store2
                .state_filter(|s| s.namespace().as_deref() == Some(&ns) && s.spec.pool_ref == name)
                .iter()
                .map(|s| ObjectRef::from_obj(&**s))
                .collect::<Vec<_>>()
        })
        .owns(api::<Secret>(&client, ns), secret_cfg)
        .run(
            crate::sandbox::reconcile,
            crate::sandbox::error_policy,
            ctx.clone(),
        )
        .for_each(|_| std::future::ready(()));

    let ready = {
        let (pods, pool_pods) = (pods.clone(), pool_pods.clone());
        let (pools, sandboxes) = (pools.clone(), sandboxes.clone());
        let metrics = metrics.clone();
        async move {
            let _ = pods.wait_until_ready().await;
            let _ = pool_pods.wait_until_ready().await;
            let _ = pools.wait_until_ready().await;
            let _ = sandboxes.wait_until_ready().await;
            metrics.set_ready();
            tracing::info!("caches synced");
            std::future::pending::<()>().await
        }
    };
    let idle = crate::idle::run(ctx.clone());
    let wake = {
        let ctx = ctx.clone();
        async move {
            match cfg
                .wake
                .as_ref()
                .map(|w| (w.take_listener(), w.token.clone()))
            {
                Some((Some(listener), token)) => crate::wake::serve(listener, ctx, token).await,
                _ => std::future::pending().await,
            }
        }
    };
    let forget_on_gain = {
        let ctx = ctx.clone();
        let gained = leadership_gained(&leader);
        async move {
            futures_util::pin_mut!(gained);
            while gained.next().await.is_some() {
                ctx.forget_own_writes();
            }
            std::future::pending::<()>().await
        }
    };
    let paused_gauge = {
        let (sandboxes, metrics) = (sandboxes.clone(), metrics.clone());
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                let n = sandboxes
                    .state()
                    .iter()
                    .filter(|s| {
                        s.status
                            .as_ref()
                            .is_some_and(|st| st.phase == Phase::Paused)
                    })
                    .count();
                metrics.paused.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    };
    tokio::select! {
        _ = pool_ctl => {}
        _ = sbx_ctl => {}
        _ = idle => {}
        _ = ready => {}
        _ = paused_gauge => {}
        _ = forget_on_gain => {}
        r = wake => r?,
    }
    Ok(())
}
