//! The idle rule, which must never release early, and the lifetime rule. No I/O: the idle pass
//! asks every sandbox-extproc replica and feeds the answers here.
//!
//! A pass is **sighted** only when every replica answered, none was unready, and none dropped
//! entries since the previous pass; otherwise it is **blind** and releases nothing for idleness.
//! In a sighted pass a sandbox is idle when
//! `now - max(every replica's last-active, status.lastActiveAt, readyAt) > idleTimeout` and every
//! replica has been collecting for at least `idleTimeout` (one that restarted recently cannot
//! vouch for the time before it started). Expiry (`maxLifetime` from `claimedAt`) needs no
//! traffic data and applies in blind passes too.

use std::collections::HashMap;

/// One replica's answer to `GetLastActive`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub replica: String,
    pub collecting_since_ms: u64,
    /// Entries the replica has dropped since it started (0 when it never did, or predates the
    /// field).
    pub evicted_total: u64,
    pub last_active: HashMap<String, u64>,
}

/// What was learnt from one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// It answered.
    Answered(Answer),
    /// It is listed but not ready (it may hold the only copy of some gateway's reports).
    NotReady,
    /// It failed or timed out.
    Failed(String),
}

/// Why a pass releases nothing for idleness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blind {
    /// No replica is known at all.
    NoReplicas,
    /// An endpoint failed, timed out or was not ready.
    Unreachable { endpoint: String, why: String },
    /// A replica dropped entries since the previous pass (or before the first one we saw).
    Evicted { endpoint: String },
}

impl Blind {
    /// The metric label of the pass result.
    pub fn label(&self) -> &'static str {
        match self {
            Blind::NoReplicas => "no_replicas",
            Blind::Unreachable { .. } => "replica_unreachable",
            Blind::Evicted { .. } => "replica_evicted",
        }
    }
}

/// The merged view of a sighted pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sight {
    /// Per sandbox ID, the latest last-active any replica reported.
    pub last_active: HashMap<String, u64>,
    /// The latest `collecting_since_ms` of any replica: nothing idle for longer than
    /// `now - this` can be proven.
    pub collecting_since_ms: u64,
}

/// Merges the endpoints' replies. `evicted_seen` holds each endpoint's `evicted_total` from
/// the previous pass and is updated; a change (or a non-zero count never seen before) is blind.
pub fn merge(
    replies: &[(String, Reply)],
    evicted_seen: &mut HashMap<String, u64>,
) -> Result<Sight, Blind> {
    if replies.is_empty() {
        return Err(Blind::NoReplicas);
    }
    let mut sight = Sight::default();
    let mut blind = None;
    for (endpoint, reply) in replies {
        let answer = match reply {
            Reply::Answered(a) => a,
            Reply::NotReady => {
                blind.get_or_insert(Blind::Unreachable {
                    endpoint: endpoint.clone(),
                    why: "not ready".into(),
                });
                continue;
            }
            Reply::Failed(why) => {
                blind.get_or_insert(Blind::Unreachable {
                    endpoint: endpoint.clone(),
                    why: why.clone(),
                });
                continue;
            }
        };
        // Record the count whatever happens, so the next pass compares with this one.
        let before = evicted_seen.insert(endpoint.clone(), answer.evicted_total);
        if before.unwrap_or(0) != answer.evicted_total {
            blind.get_or_insert(Blind::Evicted {
                endpoint: endpoint.clone(),
            });
        }
        sight.collecting_since_ms = sight.collecting_since_ms.max(answer.collecting_since_ms);
        for (id, &ms) in &answer.last_active {
            let e = sight.last_active.entry(id.clone()).or_insert(0);
            *e = (*e).max(ms);
        }
    }
    match blind {
        Some(b) => Err(b),
        None => Ok(sight),
    }
}

/// What the idle rule needs about one sandbox (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    pub claimed_ms: u64,
    pub ready_ms: Option<u64>,
    /// `status.lastActiveAt`.
    pub stored_last_active_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_lifetime_ms: Option<u64>,
}

/// The verdict on one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// In use (or not provably idle). `last_active_ms` is the merged value.
    Keep { last_active_ms: u64 },
    /// No traffic anywhere for its idle timeout, proven by every replica.
    Idle { last_active_ms: u64 },
    /// Past its maximum lifetime.
    Expired,
}

/// Judges one sandbox. `sight` is `None` in a blind pass: only expiry can release then.
pub fn judge(c: &Clock, id: &str, sight: Option<&Sight>, now_ms: u64) -> Verdict {
    if let Some(max) = c.max_lifetime_ms {
        if now_ms.saturating_sub(c.claimed_ms) >= max {
            return Verdict::Expired;
        }
    }
    let reported = sight
        .and_then(|s| s.last_active.get(id).copied())
        .unwrap_or(0);
    let last = reported
        .max(c.stored_last_active_ms.unwrap_or(0))
        .max(c.ready_ms.unwrap_or(c.claimed_ms));
    let (Some(sight), Some(idle)) = (sight, c.idle_timeout_ms) else {
        return Verdict::Keep {
            last_active_ms: last,
        };
    };
    let quiet = now_ms.saturating_sub(last) > idle;
    let vouched = sight.collecting_since_ms <= now_ms.saturating_sub(idle);
    if quiet && vouched {
        Verdict::Idle {
            last_active_ms: last,
        }
    } else {
        Verdict::Keep {
            last_active_ms: last,
        }
    }
}

/// Whether `status.lastActiveAt` should be written: it only moves forward, and only by enough
/// to matter (a quarter of the idle timeout, at most a minute), so busy sandboxes do not cost a
/// status write every pass. Safety does not rest on it: a replica that restarts cannot vouch for
/// anything before its start (see [`judge`]), and gateways resend a full snapshot on reconnect.
pub fn should_store(stored_ms: Option<u64>, merged_ms: u64, idle_timeout_ms: Option<u64>) -> bool {
    let step = idle_timeout_ms.map_or(60_000, |i| (i / 4).min(60_000));
    match stored_ms {
        None => merged_ms > 0,
        Some(s) => merged_ms > s && merged_ms - s >= step,
    }
}

#[cfg(test)]
#[path = "idle_tests.rs"]
mod tests;
