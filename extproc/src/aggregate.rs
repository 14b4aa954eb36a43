//! Last-active aggregation across every reporter (Envoy modules) and this replica's own ext_proc
//! traffic: per sandbox, the maximum Unix-millisecond timestamp anyone reported.
//!
//! Memory is bounded twice: sandboxes whose route has been gone for `forget_after` are dropped by
//! [`Aggregator::sweep`], and at `max_entries` the entries with the oldest last-active are evicted
//! (counted) so a flood of made-up IDs cannot grow the map without limit.
//!
//! The guarantee the controller relies on: every new sandbox is admitted, and what goes first
//! under pressure is the oldest last-active, so a busy sandbox never becomes "unknown" (which the
//! controller could read as idle) while an idler one is kept. The eviction is ours, not a cache
//! crate's, because it orders by the *value*: moka (LRU or TinyLFU) orders by when an entry was
//! last written or read, and a reconnecting module's full snapshot re-sends old timestamps, which
//! would push a busy sandbox to the front of the eviction queue; TinyLFU also refuses new IDs when
//! full. `tests/why_not_moka.rs` shows both with moka itself.

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
    /// Unix ms of the latest eviction (0: never); answered in GetLastActive.
    last_eviction_ms: AtomicU64,
    forgotten: AtomicU64,
}

impl Aggregator {
    pub fn new(max_entries: usize, forget_after: Duration) -> Self {
        Aggregator {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
            forget_after,
            evicted: AtomicU64::new(0),
            last_eviction_ms: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        // A panic while holding the lock leaves a consistent map (every update is one insert).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges `(id, last_ms)` pairs, keeping the max. Returns how many entries were merged.
    ///
    /// A new ID is always inserted: when the map is full, room is made first by evicting the
    /// oldest last-active entries (never the one being inserted).
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

    /// Drops the oldest ~1% at once, so a full map costs one linear pass per hundred inserts
    /// rather than one per insert (an ordered index would instead tax every update, the common
    /// case, to speed up eviction, the rare one). Only the timestamps are copied to find the cut:
    /// cloning every key cost an allocation per entry.
    fn evict_oldest(&self, map: &mut HashMap<Box<str>, Entry>) {
        let k = (self.max_entries / 100).max(1).min(map.len());
        if k == 0 {
            return;
        }
        let mut ages: Vec<u64> = map.values().map(|e| e.last_ms).collect();
        let (older, &mut cut, _) = ages.select_nth_unstable(k - 1);
        // Everything older than `cut` goes, plus as many entries of exactly `cut` as make k.
        let mut ties = k - older.iter().filter(|&&t| t < cut).count();
        map.retain(|_, e| {
            if e.last_ms < cut {
                return false;
            }
            if e.last_ms == cut && ties > 0 {
                ties -= 1;
                return false;
            }
            true
        });
        self.evicted.fetch_add(k as u64, Ordering::Relaxed);
        // Precise clock, not the coarse one: this is rare, and callers compare it across passes.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        self.last_eviction_ms
            .fetch_max(now.max(1), Ordering::Relaxed);
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

    /// Unix ms of the latest eviction, 0 if none.
    pub fn last_eviction_ms(&self) -> u64 {
        self.last_eviction_ms.load(Ordering::Relaxed)
    }

    pub fn forgotten(&self) -> u64 {
        self.forgotten.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
