//! The Kubernetes route contract as plain data: pods in, route changes out.
//!
//! Kept free of the watcher so the rules that keep traffic on the right pod are unit-tested:
//! - a pod is a route when it satisfies the route contract (`contract::PodFacts::routable`);
//! - events older than what we hold for a pod (by resourceVersion) are ignored, and a removed pod's
//!   UID keeps a tombstone at its removal's resourceVersion, so a replayed or stale event can never
//!   resurrect it;
//! - an IP belongs to the newest pod that claims it: an older claimant (its delete not seen yet) is
//!   fenced off at once, so a reused IP never receives another sandbox's traffic;
//! - two live pods claiming one sandbox ID: the oldest keeps it (a newcomer cannot take over a
//!   running sandbox's traffic), ties broken by namespace/name; the conflict is counted and logged.

use crate::contract::PodFacts;
use crate::table::RouteSpec;
use std::collections::{BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

/// What the index needs from a Pod (parsed from the API object by the watcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: Arc<str>,
    /// `namespace/name`
    pub key: Arc<str>,
    pub namespace: Arc<str>,
    /// Parsed `metadata.resourceVersion`; 0 if it is not a number (then ordering is not checked).
    pub resource_version: u64,
    /// Seconds since the epoch (`metadata.creationTimestamp`).
    pub created: i64,
    pub sandbox_id: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub ready: bool,
    pub deleting: bool,
    pub token_sha256: Option<[u8; 32]>,
}

impl PodInfo {
    fn facts(&self) -> PodFacts {
        PodFacts {
            has_valid_id: self.sandbox_id.is_some(),
            has_ip: self.ip.is_some(),
            ready: self.ready,
            deleting: self.deleting,
        }
    }
}

/// A change to apply to the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(RouteSpec),
    Remove(String),
}

/// Counters the source publishes as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub stale_ignored: u64,
    pub conflicts: u64,
    pub ip_fenced: u64,
}

const MAX_TOMBSTONES: usize = 100_000;

// ahash, not SipHash: the first list of 100k pods hashes each pod into four of these maps, and
// SipHash was the largest single cost of it in a profile (`make bench-kube`). Keys are pod UIDs,
// IPs and sandbox IDs from the API server; ahash is randomized per process all the same.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;

/// (creation time, namespace/name, uid): the order in which claimants win.
type Claim = (i64, Arc<str>, Arc<str>);

#[derive(Default)]
pub struct PodIndex {
    pods: HashMap<Arc<str>, PodInfo>,
    /// sandbox id → claimants, ordered by the conflict rule.
    claims: HashMap<String, BTreeSet<Claim>>,
    /// IP → (resourceVersion, uid) of its newest claimant.
    ip_owner: HashMap<IpAddr, (u64, Arc<str>)>,
    /// Pods we stopped tracking: uid → the resourceVersion of their removal. Only newer events
    /// for that UID are accepted. A filtered watch reports "left the label selector" exactly like
    /// a deletion (DELETED with the previous object), so the two can't be told apart; a truly
    /// deleted UID never has a newer event, and relists are consistent reads, so RV order alone
    /// keeps it dead while a relabelled pod can come back.
    tombstones: HashMap<Arc<str>, u64>,
    tombstone_order: VecDeque<Arc<str>>,
    /// Relists in progress, by scope (a namespace, or None for all): the UIDs seen so far.
    /// Several watchers (one per namespace) may relist at once.
    relists: HashMap<Option<Arc<str>>, HashSet<Arc<str>>>,
    pub stats: IndexStats,
}

impl PodIndex {
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// A pod was added or modified.
    pub fn apply(&mut self, pod: PodInfo) -> Vec<Change> {
        for (scope, seen) in self.relists.iter_mut() {
            if scope.as_ref().is_none_or(|ns| *ns == pod.namespace) {
                seen.insert(Arc::clone(&pod.uid));
            }
        }
        match self.tombstones.get(&pod.uid) {
            Some(rv) if pod.resource_version <= *rv => {
                self.stats.stale_ignored += 1;
                return Vec::new();
            }
            Some(_) => {
                self.tombstones.remove(&pod.uid);
            }
            None => {}
        }
        if let Some(old) = self.pods.get(&pod.uid) {
            if pod.resource_version != 0 && pod.resource_version < old.resource_version {
                self.stats.stale_ignored += 1;
                return Vec::new();
            }
        }
        let mut touched = Vec::new();
        if let Some(old) = self.pods.remove(&pod.uid) {
            self.unclaim(&old);
            touched.extend(old.sandbox_id.clone());
        }
        if let (Some(ip), true) = (pod.ip, pod.facts().routable()) {
            let newer = match self.ip_owner.get(&ip) {
                Some((rv, uid)) => *uid == pod.uid || pod.resource_version >= *rv,
                None => true,
            };
            if newer {
                if let Some((_, prev)) = self
                    .ip_owner
                    .insert(ip, (pod.resource_version, Arc::clone(&pod.uid)))
                {
                    if prev != pod.uid {
                        if let Some(fenced) = self.pods.get(&prev) {
                            self.stats.ip_fenced += 1;
                            tracing::warn!(ip = %ip, old_pod = %fenced.key, new_pod = %pod.key,
                                "pod IP reused: the older claimant stops receiving traffic");
                            touched.extend(fenced.sandbox_id.clone());
                        }
                    }
                }
            }
        }
        if let Some(id) = &pod.sandbox_id {
            let set = self.claims.entry(id.clone()).or_default();
            set.insert((pod.created, Arc::clone(&pod.key), Arc::clone(&pod.uid)));
            touched.push(id.clone());
        }
        self.pods.insert(Arc::clone(&pod.uid), pod);
        self.recompute(touched)
    }

    /// A pod was deleted, or left the watch's label selector, at `resource_version`.
    pub fn delete(&mut self, uid: &str, resource_version: u64) -> Vec<Change> {
        let Some(old) = self.pods.remove(uid) else {
            self.tombstone(uid.into(), resource_version);
            return Vec::new();
        };
        self.unclaim(&old);
        self.tombstone(
            Arc::clone(&old.uid),
            resource_version.max(old.resource_version),
        );
        self.recompute(old.sandbox_id.into_iter().collect())
    }

    /// A relist of `namespace` (None = every namespace) begins: until `end_relist`, the current
    /// view keeps serving.
    pub fn begin_relist(&mut self, namespace: Option<&str>) {
        self.relists
            .insert(namespace.map(Arc::from), HashSet::default());
    }

    /// The relist of `namespace` is complete: pods in its scope that it did not contain are gone.
    pub fn end_relist(&mut self, namespace: Option<&str>) -> Vec<Change> {
        let scope: Option<Arc<str>> = namespace.map(Arc::from);
        let Some(seen) = self.relists.remove(&scope) else {
            return Vec::new();
        };
        let gone: Vec<Arc<str>> = self
            .pods
            .values()
            .filter(|p| {
                scope.as_ref().is_none_or(|ns| *ns == p.namespace) && !seen.contains(&p.uid)
            })
            .map(|p| Arc::clone(&p.uid))
            .collect();
        let mut changes = Vec::new();
        for uid in gone {
            // A consistent list without the pod: deleted, or no longer matching.
            let rv = self.pods.get(&uid).map_or(0, |p| p.resource_version);
            changes.extend(self.delete(&uid, rv));
        }
        changes
    }

    fn unclaim(&mut self, old: &PodInfo) {
        if let Some(id) = &old.sandbox_id {
            if let Some(set) = self.claims.get_mut(id) {
                set.remove(&(old.created, Arc::clone(&old.key), Arc::clone(&old.uid)));
                if set.is_empty() {
                    self.claims.remove(id);
                }
            }
        }
        if let Some(ip) = old.ip {
            if self
                .ip_owner
                .get(&ip)
                .is_some_and(|(_, uid)| *uid == old.uid)
            {
                self.ip_owner.remove(&ip);
            }
        }
    }

    fn tombstone(&mut self, uid: Arc<str>, resource_version: u64) {
        let rv = self
            .tombstones
            .get(&uid)
            .map_or(resource_version, |r| (*r).max(resource_version));
        if self.tombstones.insert(Arc::clone(&uid), rv).is_none() {
            self.tombstone_order.push_back(uid);
            // UIDs are never reused, so forgetting the oldest tombstones only matters for events
            // that are very late; the bound keeps memory flat under churn.
            while self.tombstone_order.len() > MAX_TOMBSTONES {
                if let Some(old) = self.tombstone_order.pop_front() {
                    self.tombstones.remove(&old);
                }
            }
        }
    }

    fn eligible(&self, uid: &str) -> Option<&PodInfo> {
        let pod = self.pods.get(uid)?;
        let ip = pod.ip?;
        let owns_ip = self
            .ip_owner
            .get(&ip)
            .is_some_and(|(_, owner)| **owner == *uid);
        (pod.facts().routable() && owns_ip).then_some(pod)
    }

    fn pending(&self, uid: &str) -> Option<&PodInfo> {
        let pod = self.pods.get(uid)?;
        let fenced = pod
            .ip
            .and_then(|ip| self.ip_owner.get(&ip))
            .is_some_and(|(_, owner)| **owner != *uid);
        (pod.facts().known() && !fenced).then_some(pod)
    }

    fn spec(&self, id: &str, pod: &PodInfo, ready: bool) -> RouteSpec {
        RouteSpec {
            id: id.to_string(),
            // Never used when not ready: the request path answers 503 before forwarding.
            ip: pod.ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            port: pod.port,
            ready,
            token_sha256: pod.token_sha256,
            pod_uid: Some(Arc::clone(&pod.uid)),
            resource_version: pod.resource_version,
        }
    }

    /// The route each touched sandbox ID should have now.
    fn recompute(&mut self, mut ids: Vec<String>) -> Vec<Change> {
        ids.sort();
        ids.dedup();
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            let claimants: Vec<Arc<str>> = self
                .claims
                .get(&id)
                .map(|s| s.iter().map(|(_, _, uid)| Arc::clone(uid)).collect())
                .unwrap_or_default();
            let live: Vec<&PodInfo> = claimants.iter().filter_map(|u| self.eligible(u)).collect();
            if live.len() > 1 {
                let losers: Vec<&str> = live[1..].iter().map(|p| &*p.key).collect();
                tracing::warn!(sandbox_id = %id, winner = %live[0].key, ?losers,
                    "several ready pods claim one sandbox id; the oldest keeps it");
            }
            let conflict = live.len() > 1;
            let change = match live.first() {
                Some(winner) => Change::Upsert(self.spec(&id, winner, true)),
                // A labelled pod that is coming up (no IP yet, not Ready) still makes the sandbox
                // known: 503 + Retry-After, not 404. Terminating pods and pods whose IP now
                // belongs to another pod do not.
                None => match claimants.iter().find_map(|u| self.pending(u)) {
                    Some(p) => Change::Upsert(self.spec(&id, p, false)),
                    None => Change::Remove(id),
                },
            };
            if conflict {
                self.stats.conflicts += 1;
            }
            changes.push(change);
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str, id: &str, ip: &str, rv: u64) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            key: format!("ns/{name}").into(),
            namespace: "ns".into(),
            resource_version: rv,
            created: 1000,
            sandbox_id: Some(id.into()),
            ip: Some(ip.parse().unwrap()),
            port: 8080,
            ready: true,
            deleting: false,
            token_sha256: None,
        }
    }

    fn routes(changes: &[Change]) -> Vec<(String, Option<String>)> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(s) => (
                    s.id.clone(),
                    Some(format!(
                        "{}@{}{}",
                        s.ip,
                        s.pod_uid.as_deref().unwrap_or(""),
                        if s.ready { "" } else { " not-ready" }
                    )),
                ),
                Change::Remove(id) => (id.clone(), None),
            })
            .collect()
    }

    #[test]
    fn ready_pod_routes_and_loses_it_on_not_ready_deleting_or_delete() {
        let mut ix = PodIndex::default();
        // Coming up: known, not ready (503 on the request path), before it has an IP.
        let mut p = pod("u1", "a", "sb", "10.0.0.1", 1);
        (p.ip, p.ready) = (None, false);
        assert_eq!(
            routes(&ix.apply(p)),
            [("sb".into(), Some("0.0.0.0@u1 not-ready".into()))]
        );
        assert_eq!(
            routes(&ix.apply(pod("u1", "a", "sb", "10.0.0.1", 1))),
            [("sb".into(), Some("10.0.0.1@u1".into()))]
        );
        let mut p = pod("u1", "a", "sb", "10.0.0.1", 2);
        p.ready = false;
        assert_eq!(
            routes(&ix.apply(p)),
            [("sb".into(), Some("10.0.0.1@u1 not-ready".into()))]
        );
        ix.apply(pod("u1", "a", "sb", "10.0.0.1", 3));
        let mut p = pod("u1", "a", "sb", "10.0.0.1", 4);
        p.deleting = true;
        assert_eq!(routes(&ix.apply(p)), [("sb".into(), None)]);
        assert_eq!(routes(&ix.delete("u1", 5)), [("sb".into(), None)]);
        assert!(ix.is_empty());
    }

    #[test]
    fn relabel_moves_the_route() {
        let mut ix = PodIndex::default();
        ix.apply(pod("u1", "a", "old", "10.0.0.1", 1));
        let c = ix.apply(pod("u1", "a", "new", "10.0.0.1", 2));
        assert_eq!(
            routes(&c),
            [
                ("new".into(), Some("10.0.0.1@u1".into())),
                ("old".into(), None)
            ]
        );
        let mut p = pod("u1", "a", "new", "10.0.0.1", 3);
        p.sandbox_id = None;
        assert_eq!(routes(&ix.apply(p)), [("new".into(), None)]);
    }

    #[test]
    fn stale_and_replayed_events_change_nothing() {
        let mut ix = PodIndex::default();
        ix.apply(pod("u1", "a", "sb", "10.0.0.1", 5));
        let mut older = pod("u1", "a", "sb", "10.0.0.9", 4);
        older.ready = true;
        assert!(
            ix.apply(older).is_empty(),
            "older RV must not replace a newer one"
        );
        ix.delete("u1", 6);
        assert!(
            ix.apply(pod("u1", "a", "sb", "10.0.0.1", 5)).is_empty(),
            "deleted pod resurrected"
        );
        assert!(
            ix.apply(pod("u1", "a", "sb", "10.0.0.1", 6)).is_empty(),
            "the delete's own event replayed"
        );
        assert_eq!(ix.stats.stale_ignored, 3);
    }

    #[test]
    fn leaving_the_selector_is_not_a_death() {
        let mut ix = PodIndex::default();
        ix.apply(pod("u1", "a", "sb", "10.0.0.1", 5));
        // A label-filtered watch reports "label removed" as a delete of the pod at RV 6.
        assert_eq!(routes(&ix.delete("u1", 6)), [("sb".into(), None)]);
        assert!(
            ix.apply(pod("u1", "a", "sb", "10.0.0.1", 5)).is_empty(),
            "older event"
        );
        assert!(
            ix.apply(pod("u1", "a", "sb", "10.0.0.1", 6)).is_empty(),
            "same event replayed"
        );
        // Relabelled back in later: routable again.
        assert_eq!(
            routes(&ix.apply(pod("u1", "a", "sb", "10.0.0.1", 7))),
            [("sb".into(), Some("10.0.0.1@u1".into()))]
        );
        // After a real delete, replays of anything up to it are ignored.
        ix.delete("u1", 8);
        assert!(ix.apply(pod("u1", "a", "sb", "10.0.0.1", 7)).is_empty());
        assert!(ix.apply(pod("u1", "a", "sb", "10.0.0.1", 8)).is_empty());
    }

    #[test]
    fn reused_ip_fences_the_old_owner_before_its_delete_arrives() {
        let mut ix = PodIndex::default();
        ix.apply(pod("u1", "a", "alice", "10.0.0.7", 10));
        // Bob's pod got the same IP (alice's pod is gone, but its delete has not arrived yet).
        let c = ix.apply(pod("u2", "b", "bob", "10.0.0.7", 20));
        assert_eq!(
            routes(&c),
            [
                ("alice".into(), None),
                ("bob".into(), Some("10.0.0.7@u2".into()))
            ]
        );
        assert_eq!(ix.stats.ip_fenced, 1);
        // A late, older event for alice's pod cannot take the IP back.
        let c = ix.apply(pod("u1", "a", "alice", "10.0.0.7", 11));
        assert_eq!(routes(&c), [("alice".into(), None)]);
        // Alice's delete finally arrives: bob keeps his route.
        assert_eq!(routes(&ix.delete("u1", 30)), [("alice".into(), None)]);
        assert_eq!(
            routes(&ix.apply(pod("u2", "b", "bob", "10.0.0.7", 21))),
            [("bob".into(), Some("10.0.0.7@u2".into()))]
        );
    }

    #[test]
    fn duplicate_claims_keep_the_oldest_deterministically() {
        let mut ix = PodIndex::default();
        let mut first = pod("u1", "a", "sb", "10.0.0.1", 1);
        first.created = 100;
        let mut second = pod("u2", "b", "sb", "10.0.0.2", 2);
        second.created = 200;
        ix.apply(first.clone());
        let c = ix.apply(second.clone());
        assert_eq!(routes(&c), [("sb".into(), Some("10.0.0.1@u1".into()))]);
        assert_eq!(ix.stats.conflicts, 1);
        // Same outcome whatever the arrival order.
        let mut ix2 = PodIndex::default();
        ix2.apply(second);
        let c = ix2.apply(first);
        assert_eq!(routes(&c), [("sb".into(), Some("10.0.0.1@u1".into()))]);
        // The winner goes away: the other takes over.
        assert_eq!(
            routes(&ix.delete("u1", 3)),
            [("sb".into(), Some("10.0.0.2@u2".into()))]
        );
    }

    #[test]
    fn relist_keeps_serving_then_drops_what_is_gone() {
        let mut ix = PodIndex::default();
        ix.apply(pod("u1", "a", "keep", "10.0.0.1", 1));
        ix.apply(pod("u2", "b", "gone", "10.0.0.2", 2));
        let mut other_ns = pod("u3", "c", "elsewhere", "10.0.0.3", 3);
        other_ns.namespace = "other".into();
        ix.apply(other_ns);
        ix.begin_relist(Some("ns"));
        assert_eq!(ix.apply(pod("u1", "a", "keep", "10.0.0.1", 1)).len(), 1);
        let c = ix.end_relist(Some("ns"));
        assert_eq!(
            routes(&c),
            [("gone".into(), None)],
            "only the relisted namespace is pruned"
        );
        assert_eq!(ix.len(), 2);
    }
}
