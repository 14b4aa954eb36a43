//! What every reconcile shares: the client, the watch caches, the leader fence, the metrics and
//! the per-pool bookkeeping (expectations, refill budget, pods reserved by claims in flight).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};

use crate::crd::{Sandbox, SandboxPool};
use crate::decide::pool::{CreateBudget, Expectations};
use crate::leader::Leadership;
use crate::metrics::Metrics;

/// Where the sandbox-extproc replicas are.
#[derive(Debug, Clone)]
pub enum Replicas {
    /// A fixed list of gRPC endpoints (`http://host:port`).
    Static(Vec<String>),
    /// Every endpoint of a headless Service's EndpointSlices (ready, serving or terminating).
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
}

/// Controller settings (flags, parsed once).
#[derive(Debug, Clone)]
pub struct Config {
    /// Manage only this namespace (`None`: all).
    pub namespace: Option<String>,
    /// The gateway URL of a sandbox, with `{id}` and `{port}` (e.g.
    /// `https://{port}-{id}.sandboxes.example.com`); `None`: no `status.url`.
    pub url_template: Option<String>,
    /// How often the idle pass runs.
    pub idle_interval: Duration,
    /// The ActivityService replicas (`None`: no idle reclaim).
    pub replicas: Option<Replicas>,
    /// Bearer token for the ActivityService.
    pub activity_token: Option<String>,
    /// Deadline of one `GetLastActive` call.
    pub query_timeout: Duration,
    /// How long a pod created or deleted may stay unseen in the watch before it is assumed lost.
    pub expectation_timeout: Duration,
    /// Pool pod creations per second, per pool, and the burst.
    pub refill_rate: f64,
    pub refill_burst: usize,
    /// The WakeService listener and its token (`None`: no wake service).
    pub wake: Option<WakeEndpoint>,
}

/// Where the WakeService listens: a bound listener (taken once by `run`) and the bearer token
/// callers must present.
#[derive(Clone)]
pub struct WakeEndpoint {
    listener: Arc<Mutex<Option<std::net::TcpListener>>>,
    pub token: Option<routing::bearer::BearerToken>,
}

impl WakeEndpoint {
    /// `listener` must be non-blocking (tokio takes it as is).
    pub fn new(
        listener: std::net::TcpListener,
        token: Option<routing::bearer::BearerToken>,
    ) -> Self {
        WakeEndpoint {
            listener: Arc::new(Mutex::new(Some(listener))),
            token,
        }
    }

    /// The listener, the first time only.
    pub fn take_listener(&self) -> Option<std::net::TcpListener> {
        lock(&self.listener).take()
    }
}

impl std::fmt::Debug for WakeEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeEndpoint")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            url_template: None,
            idle_interval: Duration::from_secs(10),
            replicas: None,
            activity_token: None,
            query_timeout: Duration::from_secs(5),
            expectation_timeout: Duration::from_secs(30),
            refill_rate: 50.0,
            refill_burst: 100,
            wake: None,
        }
    }
}

/// A pool's bookkeeping between reconciles.
#[derive(Debug)]
pub struct PoolState {
    pub expectations: Expectations,
    pub budget: CreateBudget,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub cfg: Config,
    /// The claim cache: pool pods as the sandbox controller's pod trigger last saw them.
    pub pods: Store<Pod>,
    /// Pool pods as the pool controller's pod trigger last saw them. Each controller reads the
    /// cache its own trigger updated before firing, so a reconcile never sees older pods than
    /// the event that woke it.
    pub pool_pods: Store<Pod>,
    /// Pools as the sandbox controller's pool trigger last saw them.
    pub pools: Store<SandboxPool>,
    pub sandboxes: Store<Sandbox>,
    pub metrics: Arc<Metrics>,
    pub leader: Arc<Leadership>,
    pub recorder: Recorder,
    pools_state: Mutex<HashMap<(String, String), PoolState>>,
    /// UIDs of pods a claim in this process is binding (so concurrent claims pick different
    /// pods instead of racing to a 409).
    reserved: Mutex<HashSet<String>>,
    /// Statuses this replica recorded on claims, by Sandbox UID, until the watch cache shows
    /// them: a reconcile that reads a stale Sandbox must not claim a second pod for it.
    bound: Mutex<HashMap<String, crate::crd::SandboxStatus>>,
    /// IDs this replica drew or released (never drawn again while it runs).
    released_ids: Mutex<HashSet<String>>,
    /// IDs on pods and in Sandbox statuses, as of when it was built.
    id_index: Mutex<Option<(std::time::Instant, HashSet<String>)>>,
    /// Each activity endpoint's eviction count at the previous idle pass.
    pub evicted_seen: Mutex<HashMap<String, u64>>,
    /// Sandbox UIDs a wake asked for while they were still pausing: the pause ends in
    /// `Resuming` instead of `Paused`.
    pending_wakes: Mutex<HashSet<String>>,
    /// When this replica accepted a wake, by Sandbox UID (the wake-latency histogram).
    wake_started: Mutex<HashMap<String, std::time::Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A status or metadata time as Unix milliseconds (0 before the epoch).
pub fn time_ms(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        cfg: Config,
        pods: Store<Pod>,
        pool_pods: Store<Pod>,
        pools: Store<SandboxPool>,
        sandboxes: Store<Sandbox>,
        metrics: Arc<Metrics>,
        leader: Arc<Leadership>,
    ) -> Arc<Self> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "sandbox-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Context {
            client,
            cfg,
            pods,
            pool_pods,
            pools,
            sandboxes,
            metrics,
            leader,
            recorder,
            pools_state: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashSet::new()),
            bound: Mutex::new(HashMap::new()),
            released_ids: Mutex::new(HashSet::new()),
            id_index: Mutex::new(None),
            evicted_seen: Mutex::new(HashMap::new()),
            pending_wakes: Mutex::new(HashSet::new()),
            wake_started: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `f` on a pool's bookkeeping (created on first use).
    pub fn with_pool<R>(&self, ns: &str, name: &str, f: impl FnOnce(&mut PoolState) -> R) -> R {
        let mut all = lock(&self.pools_state);
        let cfg = &self.cfg;
        let st = all
            .entry((ns.to_string(), name.to_string()))
            .or_insert_with(|| PoolState {
                expectations: Expectations::default(),
                budget: CreateBudget::new(cfg.refill_rate, cfg.refill_burst, now_ms()),
            });
        f(st)
    }

    pub fn forget_pool(&self, ns: &str, name: &str) {
        lock(&self.pools_state).remove(&(ns.to_string(), name.to_string()));
    }

    /// Reserves a pod for a claim in flight; false when another claim has it.
    pub fn reserve(&self, uid: &str) -> bool {
        lock(&self.reserved).insert(uid.to_string())
    }

    pub fn unreserve(&self, uid: &str) {
        lock(&self.reserved).remove(uid);
    }

    pub fn reserved(&self) -> HashSet<String> {
        lock(&self.reserved).clone()
    }

    /// Remembers the status a claim recorded.
    pub fn note_bound(&self, sandbox_uid: &str, st: crate::crd::SandboxStatus) {
        lock(&self.bound).insert(sandbox_uid.to_string(), st);
    }

    /// The status to act on: the cached one, unless this replica recorded a claim the cache
    /// does not show yet (then that claim's status). Forgets entries the cache caught up with.
    pub fn current_status(
        &self,
        sandbox_uid: &str,
        cached: Option<&crate::crd::SandboxStatus>,
    ) -> crate::crd::SandboxStatus {
        let mut b = lock(&self.bound);
        match (cached, b.get(sandbox_uid)) {
            (Some(c), Some(_)) if c.pod_uid.is_some() => {
                b.remove(sandbox_uid);
                c.clone()
            }
            (_, Some(mine)) => mine.clone(),
            (c, None) => c.cloned().unwrap_or_default(),
        }
    }

    pub fn note_released(&self, id: &str) {
        lock(&self.released_ids).insert(id.to_string());
    }

    /// Whether an ID is in use or was: on a pod, in a `Sandbox`'s status, drawn or released
    /// here. The caches are indexed at most once a second (a scan per claim made a burst of
    /// 1,000 claims quadratic); an ID drawn by this process is in `released_ids` from the
    /// moment it is drawn, so the index's age never lets one ID be handed out twice here.
    pub fn id_taken(&self, id: &str) -> bool {
        use routing::contract::SANDBOX_ID_LABEL;
        if lock(&self.released_ids).contains(id) {
            return true;
        }
        let mut idx = lock(&self.id_index);
        let stale = idx
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > std::time::Duration::from_secs(1));
        if stale {
            let mut ids = HashSet::new();
            for p in self.pods.state() {
                if let Some(v) = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SANDBOX_ID_LABEL))
                {
                    ids.insert(v.clone());
                }
            }
            for s in self.sandboxes.state() {
                if let Some(v) = s.status.as_ref().and_then(|st| st.sandbox_id.clone()) {
                    ids.insert(v);
                }
            }
            *idx = Some((std::time::Instant::now(), ids));
        }
        idx.as_ref().is_some_and(|(_, ids)| ids.contains(id))
    }

    /// Records an ID this process just drew, so it is never drawn again while it runs.
    pub fn note_drawn(&self, id: &str) {
        lock(&self.released_ids).insert(id.to_string());
    }

    /// Forgets what this replica remembered of its own writes while it led before: another
    /// leader may have moved every sandbox on since (paused one whose claim this replica
    /// recorded, say), and a remembered status would then stand in for a newer cached one.
    /// Called when this replica wins the Lease (again). A write in flight meanwhile is still
    /// fenced by its resourceVersion.
    pub fn forget_own_writes(&self) {
        lock(&self.bound).clear();
        lock(&self.pending_wakes).clear();
        lock(&self.wake_started).clear();
    }

    /// A wake arrived while the sandbox was pausing: resume once the pause is done.
    pub fn request_wake_after_pause(&self, sandbox_uid: &str) {
        lock(&self.pending_wakes).insert(sandbox_uid.to_string());
    }

    /// Whether a wake is waiting for this sandbox's pause to end.
    pub fn pending_wake(&self, sandbox_uid: &str) -> bool {
        lock(&self.pending_wakes).contains(sandbox_uid)
    }

    /// The pause ended (in `Resuming` or `Paused`): any waiting wake is served or moot.
    pub fn forget_pending_wake(&self, sandbox_uid: &str) {
        lock(&self.pending_wakes).remove(sandbox_uid);
    }

    /// Starts the wake-latency clock of a sandbox (the first wake wins).
    pub fn note_wake_started(&self, sandbox_uid: &str) {
        lock(&self.wake_started)
            .entry(sandbox_uid.to_string())
            .or_insert_with(std::time::Instant::now);
    }

    /// Stops it: the time since the wake was accepted here, if it was.
    pub fn take_wake_started(&self, sandbox_uid: &str) -> Option<Duration> {
        lock(&self.wake_started)
            .remove(sandbox_uid)
            .map(|t| t.elapsed())
    }

    /// Merge-patches a Sandbox's `/status`, as the leader (a replica that does not lead writes
    /// nothing).
    pub async fn patch_sandbox_status(
        &self,
        sbx: &Sandbox,
        patch: &serde_json::Value,
    ) -> crate::error::Result<Sandbox> {
        use kube::api::{Api, Patch, PatchParams};
        use kube::ResourceExt;
        let ns = crate::error::namespace_of(sbx)?;
        self.leader.check()?;
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), &ns);
        Ok(api
            .patch_status(
                &sbx.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await?)
    }

    /// Writes `status` (merged) only if the Sandbox is still at `sbx`'s resourceVersion: false
    /// when it changed since (409), and nothing was written.
    pub async fn fenced_status(
        &self,
        sbx: &Sandbox,
        status: serde_json::Value,
    ) -> crate::error::Result<bool> {
        use kube::ResourceExt;
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": sbx.resource_version() },
            "status": status,
        });
        match self.patch_sandbox_status(sbx, &patch).await {
            Ok(_) => Ok(true),
            Err(crate::error::Error::Kube(e)) if crate::error::is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends an Event about `obj` from a background task (never on a claim's critical path).
    pub fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if self.leader.check().is_err() {
            return; // Events are writes too: a replica that does not lead sends none.
        }
        let reference = obj.object_ref(&());
        let recorder = self.recorder.clone();
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!(error = %e, "event not recorded");
            }
        });
    }
}
