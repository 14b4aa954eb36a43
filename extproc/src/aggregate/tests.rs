//! Unit tests of the aggregate: max-merge, the eviction guarantee (every new sandbox admitted,
//! oldest last-active first, a busy sandbox never evicted before an idle one), forgetting.

use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[test]
fn keeps_the_max_across_reporters() {
    let a = Aggregator::new(100, Duration::from_secs(60));
    a.merge([("x", 100), ("y", 5)]);
    a.merge([("x", 50), ("y", 7)]);
    a.merge([("x", 0), ("", 9)]);
    assert_eq!(a.get("x"), Some(100));
    assert_eq!(a.get("y"), Some(7));
    assert_eq!(a.len(), 2);
}

#[test]
fn bounded_by_evicting_the_oldest() {
    let a = Aggregator::new(200, Duration::from_secs(60));
    let ids: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    a.merge(
        ids.iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i as u64 + 1)),
    );
    assert!(a.len() <= 200);
    assert!(a.evicted() >= 800);
    assert!(
        a.last_eviction_ms() > 0,
        "GetLastActive reports when it last evicted"
    );
    // The newest survive.
    assert_eq!(a.get("s999"), Some(1000));
    assert_eq!(a.get("s0"), None);
}

/// Fills `a` (capacity 100) with `idle-00`..`idle-98` at last-active 1..=99 and `busy`, first
/// seen long ago (5) and reported again just now (10_000).
fn full_with_one_busy() -> Aggregator {
    let a = Aggregator::new(100, Duration::from_secs(60));
    a.merge([("busy", 5)]);
    let idle: Vec<String> = (0..99).map(|i| format!("idle-{i:02}")).collect();
    a.merge(idle.iter().zip(1..).map(|(s, t)| (s.as_str(), t)));
    a.merge([("busy", 10_000)]);
    assert_eq!(a.len(), 100);
    assert_eq!(a.evicted(), 0);
    assert_eq!(a.last_eviction_ms(), 0);
    a
}

#[test]
fn every_new_sandbox_is_admitted_under_pressure() {
    let a = Aggregator::new(100, Duration::from_secs(60));
    let old: Vec<String> = (0..100).map(|i| format!("old-{i}")).collect();
    a.merge(old.iter().zip(1000..).map(|(s, t)| (s.as_str(), t)));
    for i in 0..500u64 {
        let id = format!("new-{i}");
        // Older than everything present, or newer: admitted either way.
        let ts = if i % 2 == 0 { 1 + i } else { 1_000_000 + i };
        a.merge([(id.as_str(), ts)]);
        assert_eq!(a.get(&id), Some(ts), "{id} was not admitted");
        assert!(a.len() <= 100);
    }
    // Within one batch too: its last ID is there once the batch is merged.
    let batch: Vec<String> = (0..300).map(|i| format!("batch-{i}")).collect();
    a.merge(batch.iter().map(|s| (s.as_str(), 2)));
    assert_eq!(a.get("batch-299"), Some(2));
    assert_eq!(a.evicted() as usize + a.len(), 100 + 500 + 300);
}

#[test]
fn a_busy_sandbox_outlives_a_flood_and_the_oldest_goes_first() {
    let a = full_with_one_busy();
    // A flood of new IDs, all with last-actives older than busy's but newer than the idle
    // ones: what a module's full snapshot looks like after a reconnect.
    let flood: Vec<String> = (0..1000).map(|i| format!("flood-{i:04}")).collect();
    a.merge([(flood[0].as_str(), 100)]);
    assert_eq!(a.get("idle-00"), None, "the oldest last-active goes first");
    assert_eq!(a.get("idle-01"), Some(2));
    assert_eq!(a.get("busy"), Some(10_000));
    for (i, id) in flood.iter().enumerate().skip(1) {
        a.merge([(id.as_str(), 100 + i as u64)]);
        assert_eq!(a.get("busy"), Some(10_000), "busy evicted after {id}");
        assert_eq!(a.get(id), Some(100 + i as u64));
    }
    assert_eq!(a.len(), 100);
    assert_eq!(a.evicted(), 1000);
    assert!((0..99).all(|i| a.get(&format!("idle-{i:02}")).is_none()));
}

#[test]
fn re_reporting_an_old_timestamp_does_not_protect_an_idle_sandbox() {
    let a = full_with_one_busy();
    // A reconnecting module's full snapshot repeats every idle sandbox's old last-active: that
    // is a write, but it does not make them any younger than busy.
    let idle: Vec<String> = (0..99).map(|i| format!("idle-{i:02}")).collect();
    a.merge(idle.iter().zip(1..).map(|(s, t)| (s.as_str(), t)));
    assert_eq!(a.get("idle-00"), Some(1));
    // 49 new IDs evict exactly the 49 oldest: idle-00..idle-48 (last-active 1..=49).
    let flood: Vec<String> = (0..49).map(|i| format!("flood-{i:02}")).collect();
    a.merge(flood.iter().map(|s| (s.as_str(), 50)));
    assert_eq!(a.get("busy"), Some(10_000));
    assert_eq!(a.get("idle-48"), None);
    assert_eq!(a.get("idle-49"), Some(50));
}

#[test]
fn eviction_removes_exactly_one_percent_even_among_ties() {
    let a = Aggregator::new(1000, Duration::from_secs(60));
    let ids: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    a.merge(ids.iter().map(|s| (s.as_str(), 7)));
    a.merge([("new", 7)]);
    assert_eq!(a.evicted(), 10);
    assert_eq!(a.len(), 991);
    assert_eq!(a.get("new"), Some(7));
    // Ties at the cut with older entries below it: the older go, then ties make up the ten.
    a.merge([("o1", 3), ("o2", 3), ("o3", 4)]);
    let more: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    a.merge(more.iter().map(|s| (s.as_str(), 9)));
    assert_eq!(a.len(), 1000);
    a.merge([("last", 9)]);
    assert_eq!(a.evicted(), 20);
    assert_eq!(a.len(), 991);
    assert_eq!([a.get("o1"), a.get("o2"), a.get("o3")], [None; 3]);
    assert!(more.iter().all(|m| a.get(m) == Some(9)));
}

#[test]
fn concurrent_merges_never_move_a_timestamp_backwards() {
    const IDS: usize = 4;
    const WRITERS: u64 = 3;
    const ROUNDS: u64 = 50_000;
    let a = Arc::new(Aggregator::new(1000, Duration::from_secs(60)));
    let ids: Arc<Vec<String>> = Arc::new((0..IDS).map(|i| format!("s{i}")).collect());
    let start = Arc::new(std::sync::Barrier::new(WRITERS as usize + 2));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (a, ids) = (Arc::clone(&a), Arc::clone(&ids));
        let (start, done) = (Arc::clone(&start), Arc::clone(&done));
        std::thread::spawn(move || {
            start.wait();
            let mut seen = [0u64; IDS];
            while !done.load(Ordering::Relaxed) {
                for (i, id) in ids.iter().enumerate() {
                    let t = a.get(id).unwrap_or(0);
                    assert!(t >= seen[i], "{id} went back from {} to {t}", seen[i]);
                    seen[i] = t;
                }
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (a, ids, start) = (Arc::clone(&a), Arc::clone(&ids), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                // Rising timestamps with jitter wider than a step: every thread often holds the
                // newest value, and often an older one than another thread just wrote.
                let mut max = [0u64; IDS];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                for i in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = (x % IDS as u64) as usize;
                    let t = 1 + i * 8 + (x >> 32) % 64;
                    a.merge([(ids[k].as_str(), t)]);
                    max[k] = max[k].max(t);
                }
                max
            })
        })
        .collect();
    start.wait();
    let maxes: Vec<[u64; IDS]> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let want = maxes.iter().map(|m| m[i]).max().unwrap();
        assert_eq!(a.get(id), Some(want), "{id}");
    }
}

#[test]
fn forgets_after_the_route_is_gone_for_the_grace_period() {
    let a = Aggregator::new(10, Duration::from_millis(1000));
    a.merge([("kept", 1), ("gone", 1), ("back", 1)]);
    let routes = |live: &'static [&'static str]| move |id: &str| live.contains(&id);
    assert_eq!(a.sweep(10_000, routes(&["kept"])), 0);
    assert_eq!(a.sweep(10_500, routes(&["kept", "back"])), 0);
    assert_eq!(a.sweep(11_000, routes(&["kept"])), 1, "gone is past grace");
    assert_eq!(a.get("gone"), None);
    assert_eq!(a.get("back"), Some(1), "back's clock restarted at 11_000");
    assert_eq!(a.sweep(12_000, routes(&["kept"])), 1);
    assert_eq!(a.forgotten(), 2);
    assert_eq!(a.get("kept"), Some(1));
}
