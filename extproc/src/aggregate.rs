//! Last-active aggregation across every reporter (Envoy modules) and this replica's own ext_proc
//! traffic: per sandbox, the maximum Unix-millisecond timestamp anyone reported.
//!
//! Memory is bounded twice: sandboxes whose route has been gone for `forget_after` are dropped by
//! [`Aggregator::sweep`], and at `max_entries` the oldest entries are evicted (counted) so a flood
//! of made-up IDs cannot grow the map without limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_ms: u64,
    /// When the sweep first saw this sandbox without a route (Unix ms).
    missing_since_ms: Option<u64>,
}

#[derive(Debug)]
pub struct Aggregator {
    entries: Mutex<HashMap<Box<str>, Entry>>,
    max_entries: usize,
    forget_after: Duration,
    evicted: AtomicU64,
    forgotten: AtomicU64,
}

impl Aggregator {
    pub fn new(max_entries: usize, forget_after: Duration) -> Self {
        Aggregator {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            forget_after,
            evicted: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        // A panic while holding the lock leaves a consistent map (every update is one insert).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges `(id, last_ms)` pairs, keeping the max. Returns how many entries were merged.
    pub fn merge<'a>(&self, batch: impl IntoIterator<Item = (&'a str, u64)>) -> usize {
        let mut map = self.lock();
        let mut n = 0;
        for (id, ms) in batch {
            if ms == 0 || id.is_empty() {
                continue;
            }
            n += 1;
            if let Some(e) = map.get_mut(id) {
                e.last_ms = e.last_ms.max(ms);
                continue;
            }
            if map.len() >= self.max_entries {
                self.evict_oldest(&mut map);
            }
            map.insert(
                id.into(),
                Entry {
                    last_ms: ms,
                    missing_since_ms: None,
                },
            );
        }
        n
    }

    /// Drops the oldest ~1% at once, so a full map costs one partial sort per hundred inserts
    /// rather than a full scan per insert.
    fn evict_oldest(&self, map: &mut HashMap<Box<str>, Entry>) {
        let k = (self.max_entries / 100).max(1).min(map.len());
        let mut by_age: Vec<(u64, Box<str>)> =
            map.iter().map(|(id, e)| (e.last_ms, id.clone())).collect();
        by_age.select_nth_unstable(k - 1);
        for (_, id) in by_age.iter().take(k) {
            map.remove(id);
        }
        self.evicted.fetch_add(k as u64, Ordering::Relaxed);
        tracing::warn!(
            evicted = k,
            max_entries = self.max_entries,
            "last-active table full; evicted the oldest entries"
        );
    }

    /// Last-active of `id` (None: unknown).
    pub fn get(&self, id: &str) -> Option<u64> {
        self.lock().get(id).map(|e| e.last_ms)
    }

    /// Every `(id, last_ms)`.
    pub fn all(&self) -> Vec<(String, u64)> {
        self.lock()
            .iter()
            .map(|(id, e)| (id.to_string(), e.last_ms))
            .collect()
    }

    /// Forgets sandboxes whose route has been gone for longer than `forget_after`. A route that
    /// comes back resets the clock. Returns how many were forgotten.
    pub fn sweep(&self, now_ms: u64, has_route: impl Fn(&str) -> bool) -> usize {
        let grace = self.forget_after.as_millis() as u64;
        let mut map = self.lock();
        let before = map.len();
        map.retain(|id, e| {
            if has_route(id) {
                e.missing_since_ms = None;
                return true;
            }
            let since = *e.missing_since_ms.get_or_insert(now_ms);
            now_ms.saturating_sub(since) < grace
        });
        let n = before - map.len();
        self.forgotten.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn forgotten(&self) -> u64 {
        self.forgotten.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // The newest survive.
        assert_eq!(a.get("s999"), Some(1000));
        assert_eq!(a.get("s0"), None);
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
}
