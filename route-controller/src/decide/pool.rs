//! How many pods a pool creates and which it deletes, from what the watch cache shows and what
//! the controller is still expecting to see. No I/O: the pool reconcile feeds it and acts on the
//! plan.
//!
//! Two rules carry the safety argument:
//! - **No over-creation under informer lag.** A pod the controller created but has not seen yet
//!   counts as supply (an *expectation*, keyed by the UID the create returned, dropped when the
//!   watch shows the pod or its deadline passes); a pod it deleted but still sees counts as gone.
//!   Creations per pass are also capped by a refill budget.
//! - **Claimed pods are never touched.** Only unclaimed pods are ever in the delete list.

use std::collections::HashMap;

/// What the pool decision needs to know about one of its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// Unix ms of `creationTimestamp`.
    pub created_ms: u64,
    /// Unix ms since which it is Ready (`None`: not Ready).
    pub ready_since_ms: Option<u64>,
    /// Its phase is `Failed` or `Succeeded`: it will never serve.
    pub terminated: bool,
    /// `deletionTimestamp` is set.
    pub deleting: bool,
    /// Bound to a `Sandbox` (carries the route label or a Sandbox owner).
    pub claimed: bool,
    /// Created from the pool's current template.
    pub current: bool,
}

impl PodInfo {
    /// Ready, unclaimed, alive: a pod a claim may take.
    pub fn is_warm(&self) -> bool {
        !self.claimed && !self.deleting && !self.terminated && self.ready_since_ms.is_some()
    }
}

/// Pods the controller acted on and has not yet seen the result of in its cache.
#[derive(Debug, Default, Clone)]
pub struct Expectations {
    /// UID → deadline (Unix ms) of pods created and not yet seen.
    creates: HashMap<String, u64>,
    /// UID → deadline of pods deleted and still seen.
    deletes: HashMap<String, u64>,
}

impl Expectations {
    pub fn expect_create(&mut self, uid: String, deadline_ms: u64) {
        self.creates.insert(uid, deadline_ms);
    }

    pub fn expect_delete(&mut self, uid: String, deadline_ms: u64) {
        self.deletes.insert(uid, deadline_ms);
    }

    /// Settles what the cache now shows, and drops expectations past their deadline (a pod
    /// whose create event never came is assumed lost; the next pass may create again).
    /// Returns how many expired.
    pub fn observe(&mut self, pods: &[PodInfo], now_ms: u64) -> usize {
        let seen: HashMap<&str, &PodInfo> = pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        self.creates
            .retain(|uid, _| !seen.contains_key(uid.as_str()));
        self.deletes
            .retain(|uid, _| seen.get(uid.as_str()).is_some_and(|p| !p.deleting));
        let before = self.creates.len() + self.deletes.len();
        self.creates.retain(|_, d| *d > now_ms);
        self.deletes.retain(|_, d| *d > now_ms);
        before - self.creates.len() - self.deletes.len()
    }

    pub fn pending_creates(&self) -> usize {
        self.creates.len()
    }

    pub fn is_pending_delete(&self, uid: &str) -> bool {
        self.deletes.contains_key(uid)
    }

    pub fn is_empty(&self) -> bool {
        self.creates.is_empty() && self.deletes.is_empty()
    }
}

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// Failed, or not Ready within the startup timeout: replaced.
    Failed,
    /// From an older template: replaced once a current one is warm.
    Outdated,
    /// More unclaimed pods than `replicas`.
    ScaleDown,
}

/// What a pass does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolPlan {
    /// Pods to create now.
    pub create: usize,
    /// Unclaimed pods to delete (name, uid, resourceVersion, why).
    pub delete: Vec<(String, String, String, DeleteReason)>,
    pub counts: PoolCounts,
}

/// The pool's pods by phase, for its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// Warm from the current template.
    pub warm: usize,
    /// Warm from an older template.
    pub outdated: usize,
    /// Unclaimed, alive, not Ready yet (within the startup timeout).
    pub starting: usize,
    pub claimed: usize,
    /// Terminated or past the startup timeout.
    pub failed: usize,
}

/// Plans one pass. `budget` caps creations (the refill rate limit); `startup_timeout_ms` marks a
/// pod that is not Ready in time as failed.
pub fn plan(
    replicas: usize,
    pods: &[PodInfo],
    exp: &Expectations,
    now_ms: u64,
    startup_timeout_ms: u64,
    budget: usize,
) -> PoolPlan {
    let mut counts = PoolCounts::default();
    let mut delete = Vec::new();
    let mut warm_current = Vec::new();
    let mut warm_outdated = Vec::new();
    let mut starting = Vec::new();
    for p in pods {
        if p.claimed {
            counts.claimed += 1;
            continue;
        }
        if p.deleting || exp.is_pending_delete(&p.uid) {
            continue; // already going: neither supply nor a candidate
        }
        let late =
            p.ready_since_ms.is_none() && now_ms.saturating_sub(p.created_ms) > startup_timeout_ms;
        if p.terminated || late {
            counts.failed += 1;
            delete.push((p, DeleteReason::Failed));
        } else if p.ready_since_ms.is_none() {
            if p.current {
                starting.push(p);
            } else {
                // A pod of an old template that is not serving yet has no value: replace now.
                delete.push((p, DeleteReason::Outdated));
            }
        } else if p.current {
            warm_current.push(p);
        } else {
            warm_outdated.push(p);
        }
    }
    counts.warm = warm_current.len();
    counts.outdated = warm_outdated.len();
    counts.starting = starting.len();

    let supply = warm_current.len() + starting.len() + exp.pending_creates();
    let create = replicas.saturating_sub(supply).min(budget);

    // Scale down: the surplus of current pods, not-yet-Ready ones first, then the most recently
    // Ready (the longest-warm stay, they are the first a claim takes).
    let mut surplus = supply.saturating_sub(replicas);
    starting.sort_by_key(|p| std::cmp::Reverse(p.created_ms));
    warm_current.sort_by_key(|p| std::cmp::Reverse(p.ready_since_ms));
    for p in starting.iter().chain(warm_current.iter()) {
        if surplus == 0 {
            break;
        }
        delete.push((p, DeleteReason::ScaleDown));
        surplus -= 1;
    }

    // Rollout: an outdated warm pod goes once the warm pods without it still reach `replicas`,
    // so claims never find the pool emptier than asked during a template change.
    let warm_total = warm_current.len() + warm_outdated.len();
    let removable = warm_total.saturating_sub(replicas).min(warm_outdated.len());
    warm_outdated.sort_by_key(|p| p.ready_since_ms);
    for p in warm_outdated.iter().take(removable) {
        delete.push((p, DeleteReason::Outdated));
    }

    PoolPlan {
        create,
        delete: delete
            .into_iter()
            .map(|(p, r)| (p.name.clone(), p.uid.clone(), p.resource_version.clone(), r))
            .collect(),
        counts,
    }
}

/// A token bucket for pod creations: `rate` per second, up to `burst` at once. Refill never
/// takes the whole API server: claims (three writes each) keep their share.
#[derive(Debug, Clone)]
pub struct CreateBudget {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl CreateBudget {
    pub fn new(rate_per_s: f64, burst: usize, now_ms: u64) -> Self {
        let burst = burst.max(1) as f64;
        CreateBudget {
            rate_per_s,
            burst,
            tokens: burst,
            last_ms: now_ms,
        }
    }

    /// Whole creations available now.
    pub fn available(&mut self, now_ms: u64) -> usize {
        let dt = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + dt * self.rate_per_s).min(self.burst);
        self.last_ms = now_ms.max(self.last_ms);
        self.tokens.floor() as usize
    }

    /// Spends `n` (after [`available`](Self::available)).
    pub fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// Milliseconds until one more creation is available.
    pub fn ms_until_next(&self) -> u64 {
        if self.tokens >= 1.0 || self.rate_per_s <= 0.0 {
            return 0;
        }
        (((1.0 - self.tokens) / self.rate_per_s) * 1000.0).ceil() as u64
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
