//! Leader election on a `coordination.k8s.io/v1` Lease, with resourceVersion-guarded replaces.
//!
//! Chosen over `kube-lease-manager` (which needs server-side apply with strategic merge from the
//! API server and a newer Rust than the workspace's): the protocol is small, and owning it lets
//! every write be fenced by the same clock. A replica leads while its last successful renewal
//! is younger than the renew deadline (two thirds of the lease duration), measured on the
//! monotonic clock, which keeps running while the process is stopped: a leader frozen past its
//! lease (SIGSTOP) finds its deadline passed when it resumes and refuses its own writes
//! ([`Leadership::check`]) before it learns it lost the Lease. A standby takes a Lease only after
//! seeing its `renewTime` and holder unchanged for a whole lease duration on its own clock (no
//! clock skew between replicas enters the decision).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;

use crate::error::{is_conflict, is_not_found, Error, Result};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub duration: Duration,
}

impl LeaseConfig {
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    fn retry_period(&self) -> Duration {
        self.duration / 4
    }
}

/// Whether this replica may write, shared by everything that writes.
#[derive(Debug)]
pub struct Leadership {
    /// Writes are allowed until this instant (`None`: not leading).
    until: Mutex<Option<Instant>>,
    changed: watch::Sender<bool>,
}

impl Leadership {
    /// A replica that leads forever (leader election off: a single replica).
    pub fn always() -> Self {
        let (changed, _) = watch::channel(true);
        Leadership {
            until: Mutex::new(Some(
                Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
            )),
            changed,
        }
    }

    /// A replica that does not lead until [`run`] wins the Lease.
    pub fn standby() -> Self {
        let (changed, _) = watch::channel(false);
        Leadership {
            until: Mutex::new(None),
            changed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` while this replica leads; every write calls it first.
    pub fn check(&self) -> Result<()> {
        match *self.lock() {
            Some(t) if Instant::now() < t => Ok(()),
            _ => Err(Error::NotLeader),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.check().is_ok()
    }

    /// Watches leadership changes (true: leading).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changed.subscribe()
    }

    fn set(&self, until: Option<Instant>) {
        *self.lock() = until;
        let leading = until.is_some();
        self.changed.send_if_modified(|v| {
            let changed = *v != leading;
            *v = leading;
            changed
        });
    }
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What a standby remembers of the Lease it watches.
struct Observed {
    holder: Option<String>,
    renew: Option<MicroTime>,
    since: Instant,
}

/// Runs the election until the task is dropped. `leadership` is updated as the Lease is won,
/// renewed and lost. Returns only on a lost Lease (callers exit: a replica that lost it must
/// not keep caches that assumed it led).
pub async fn run(client: Client, cfg: LeaseConfig, leadership: &Leadership) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut observed: Option<Observed> = None;
    let mut led = false;
    loop {
        let attempt = Instant::now();
        match try_acquire_or_renew(&api, &cfg, &mut observed, attempt).await {
            Ok(true) => {
                leadership.set(Some(attempt + cfg.renew_deadline()));
                if !led {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
                    led = true;
                }
            }
            Ok(false) if led => {
                leadership.set(None);
                tracing::warn!(identity = %cfg.identity, "lost the lease to another replica");
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, identity = %cfg.identity, "lease renewal failed");
                if led && leadership.check().is_err() {
                    leadership.set(None);
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(cfg.retry_period()).await;
    }
}

/// One round: `Ok(true)` when this replica holds the Lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
    now: Instant,
) -> Result<bool> {
    let dur_s = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let lease = match api.get(&cfg.name).await {
        Ok(l) => l,
        Err(e) if is_not_found(&e) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(dur_s),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let mine = holder.as_deref() == Some(cfg.identity.as_str());
    if !mine {
        // Has the holder renewed since we last looked? Judge on our own clock.
        let same = observed
            .as_ref()
            .is_some_and(|o| o.holder == holder && o.renew == spec.renew_time);
        if !same {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew: spec.renew_time.clone(),
                since: now,
            });
        }
        let expired = holder.is_none()
            || observed
                .as_ref()
                .is_some_and(|o| now.duration_since(o.since) >= cfg.duration);
        if !expired {
            return Ok(false);
        }
    }
    let mut next = lease.clone();
    let s = next.spec.get_or_insert_with(LeaseSpec::default);
    if !mine {
        s.holder_identity = Some(cfg.identity.clone());
        s.acquire_time = Some(now_micro());
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.lease_duration_seconds = Some(dur_s);
    s.renew_time = Some(now_micro());
    // `replace` sends the resourceVersion we read: a concurrent writer makes it a 409.
    match api.replace(&cfg.name, &PostParams::default(), &next).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_fenced_by_the_monotonic_deadline() {
        let l = Leadership::standby();
        assert!(l.check().is_err());
        l.set(Some(Instant::now() + Duration::from_secs(60)));
        assert!(l.check().is_ok());
        l.set(Some(Instant::now() - Duration::from_millis(1)));
        assert!(matches!(l.check(), Err(Error::NotLeader)));
        assert!(Leadership::always().check().is_ok());
    }
}
