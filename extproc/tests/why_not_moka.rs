//! Why the last-active aggregate keeps its own eviction instead of using moka: the same report
//! sequences, applied to the [`Aggregator`] and to a moka 0.12 `sync::Cache` doing the same
//! max-merge (`entry().and_compute_with`), show moka breaking the guarantee the controller
//! relies on: every new sandbox is admitted, and under pressure the *oldest last-active* goes
//! first, so a busy sandbox never becomes "unknown" (the controller could count it idle).
//!
//! moka orders eviction by access (every write, and every read, including the read inside
//! `and_compute_with` even when it changes nothing), not by the stored timestamp. Reports are not
//! in timestamp order: a module that reconnects sends a full snapshot of every sandbox it has
//! seen, mostly old idle ones, and a restarted replica is refilled the same way. That moves idle
//! sandboxes behind a busy one in moka's LRU queue. TinyLFU (moka's default) additionally
//! refuses a new ID while the cache is full of IDs reported more often.
//!
//! If a `moka` assertion here starts failing after an upgrade, moka's behaviour changed: check
//! whether it now keeps the guarantee before keeping the hand-written eviction.

use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use sandbox_extproc::aggregate::Aggregator;
use std::time::Duration;

const CAP: usize = 100;

/// The operations a scenario needs, on either implementation.
trait Table {
    fn merge(&self, id: &str, ms: u64);
    /// Let pending work (moka's eviction) finish before looking.
    fn settle(&self) {}
    fn has(&self, id: &str) -> bool;
}

impl Table for Aggregator {
    fn merge(&self, id: &str, ms: u64) {
        Aggregator::merge(self, [(id, ms)]);
    }
    fn has(&self, id: &str) -> bool {
        self.get(id).is_some()
    }
}

impl Table for Cache<String, u64> {
    fn merge(&self, id: &str, ms: u64) {
        self.entry_by_ref(id).and_compute_with(|cur| match cur {
            Some(e) if *e.value() >= ms => Op::Nop,
            _ => Op::Put(ms),
        });
    }
    fn settle(&self) {
        self.run_pending_tasks();
    }
    fn has(&self, id: &str) -> bool {
        self.contains_key(id)
    }
}

fn aggregator() -> Aggregator {
    Aggregator::new(CAP, Duration::from_secs(60))
}

fn moka(policy: EvictionPolicy) -> Cache<String, u64> {
    Cache::builder()
        .max_capacity(CAP as u64)
        .eviction_policy(policy)
        .build()
}

/// `busy` first seen long ago, then 99 idle sandboxes (last-active 1..=99), then `busy` reported
/// again just now: the table is full and `busy` is by far the most recent.
fn full_with_one_busy(t: &impl Table) {
    t.merge("busy", 5);
    for i in 0..CAP as u64 - 1 {
        t.merge(&format!("idle-{i:02}"), 1 + i);
    }
    t.merge("busy", 10_000);
    t.settle();
}

/// A module reconnects and sends its full snapshot: `CAP` sandboxes the table has not seen,
/// all of them idle for a long time (last-active older than `busy`'s).
fn reconnect_snapshot_of_new_idle_ids(t: &impl Table) -> bool {
    full_with_one_busy(t);
    for i in 0..CAP as u64 {
        t.merge(&format!("snap-{i:03}"), 200 + i);
    }
    t.settle();
    t.has("busy")
}

#[test]
fn a_full_snapshot_of_old_new_ids_makes_moka_lru_evict_the_busy_sandbox() {
    assert!(reconnect_snapshot_of_new_idle_ids(&aggregator()));
    assert!(
        !reconnect_snapshot_of_new_idle_ids(&moka(EvictionPolicy::lru())),
        "moka LRU kept busy: it evicts by write order, which put busy first"
    );
}

/// A module reconnects and re-sends what the table already knows: every idle sandbox with its
/// unchanged old last-active (a no-op merge). Then one new sandbox arrives.
fn reconnect_snapshot_of_known_idle_ids(t: &impl Table) -> (bool, bool) {
    full_with_one_busy(t);
    for i in 0..CAP as u64 - 1 {
        t.merge(&format!("idle-{i:02}"), 1 + i);
    }
    t.settle();
    t.merge("new", 20_000);
    t.settle();
    (t.has("busy"), t.has("idle-00"))
}

#[test]
fn re_sent_old_timestamps_make_moka_lru_evict_the_busy_sandbox() {
    assert_eq!(
        reconnect_snapshot_of_known_idle_ids(&aggregator()),
        (true, false),
        "the aggregate keeps busy and evicts the oldest, idle-00"
    );
    assert_eq!(
        reconnect_snapshot_of_known_idle_ids(&moka(EvictionPolicy::lru())),
        (false, true),
        "moka LRU: the no-op merges still count as accesses, so busy became the LRU victim"
    );
}

/// A full table of sandboxes reported every interval for a while, then new sandboxes start.
fn new_sandboxes_after_steady_reports(t: &impl Table) -> usize {
    for round in 0..5u64 {
        for i in 0..CAP as u64 {
            t.merge(&format!("steady-{i:03}"), 1 + round * 1000 + i);
        }
        t.settle();
    }
    (0..20u64)
        .filter(|i| {
            let id = format!("new-{i}");
            t.merge(&id, 100_000 + i);
            t.settle();
            t.has(&id)
        })
        .count()
}

#[test]
fn moka_tiny_lfu_refuses_new_sandboxes_when_full() {
    assert_eq!(new_sandboxes_after_steady_reports(&aggregator()), 20);
    // In practice none of the 20 gets in: each is seen once, every victim candidate five times.
    let admitted = new_sandboxes_after_steady_reports(&moka(EvictionPolicy::tiny_lfu()));
    assert!(
        admitted < 20,
        "moka TinyLFU admitted all {admitted} new sandboxes"
    );
}
