//! Last-active tracking per sandbox.
//!
//! Each route shares one `ActivityCell` per sandbox ID with every request for it, so marking a
//! sandbox active is a relaxed atomic load (and a store at most once per clock tick). The cells
//! live in the tracker, outside the route, so a route update (new IP, readiness flip) keeps the
//! sandbox's history.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How far before the previous batch each activity report (module → ActivityService) or flush
/// (ext_proc cells → aggregate) starts again: a touch stamped just before a snapshot can land in
/// its cell just after it (coarse clock, racing workers). Re-sending is harmless (max merge).
pub const REPORT_OVERLAP_MS: u64 = 1000;

/// Wall-clock milliseconds since the Unix epoch: the unit of every last-active value.
///
/// Called on every request, so it reads the coarse real-time clock (vDSO, no syscall, a few ns;
/// resolution of one kernel tick, ~4 ms), which is far finer than last-active needs.
#[inline]
pub fn now_ms() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// One sandbox's last-active time (Unix ms; 0 = never seen) and its streams open through this
/// process (the per-sandbox bound; also "someone is connected right now").
#[derive(Debug, Default)]
pub struct ActivityCell {
    last_ms: AtomicU64,
    open_streams: AtomicU32,
}

/// One of a sandbox's open streams, counted until dropped (with the request's filter in the
/// module, with the ext_proc stream in sandbox-extproc).
#[derive(Debug)]
pub struct StreamSlot(Arc<ActivityCell>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ActivityCell {
    /// Marks activity at `now_ms`. Never moves time backwards (workers race; the max wins) and
    /// skips the store when the value is already current, which keeps the cache line shared.
    #[inline]
    pub fn touch(&self, now_ms: u64) {
        if self.last_ms.load(Ordering::Relaxed) < now_ms {
            self.last_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    pub fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }

    /// Counts one more open stream unless `limit` are open already. One atomic add either way:
    /// a refused stream undoes its add, so the count can pass `limit` only for that instant and
    /// never lets a stream in past it.
    #[inline]
    pub fn try_open(self: &Arc<Self>, limit: u32) -> Option<StreamSlot> {
        let slot = StreamSlot(Arc::clone(self));
        let before = self.open_streams.fetch_add(1, Ordering::AcqRel);
        // Dropping the slot undoes the add.
        (before < limit).then_some(slot)
    }

    pub fn open_streams(&self) -> u32 {
        self.open_streams.load(Ordering::Acquire)
    }
}

/// All cells, by sandbox ID. Locked only when a route is added or removed and when a snapshot is
/// taken, never on the request path. Hashed with ahash like the route table: a first list of
/// 100k pods adds 100k routes at once.
#[derive(Debug, Default)]
pub struct ActivityTracker {
    cells: Mutex<std::collections::HashMap<Arc<str>, Arc<ActivityCell>, ahash::RandomState>>,
}

impl ActivityTracker {
    /// The cell for `id`, created on first use.
    pub fn cell(&self, id: &str) -> Arc<ActivityCell> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cells.get(id) {
            return Arc::clone(c);
        }
        let c = Arc::new(ActivityCell::default());
        cells.insert(id.into(), Arc::clone(&c));
        c
    }

    /// Drops `id`'s history (its route is gone).
    pub fn forget(&self, id: &str) {
        self.cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// `(id, last_ms)` for every sandbox seen active at or after `since_ms`. A sandbox with a
    /// stream open through this process right now (a silent WebSocket, a long poll) is active
    /// now: it is touched at `now_ms` first, so the control plane never takes a connected
    /// client's sandbox for idle.
    pub fn snapshot(&self, since_ms: u64, now_ms: u64) -> Vec<(Arc<str>, u64)> {
        let cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .iter()
            .filter_map(|(id, c)| {
                if c.open_streams() > 0 {
                    c.touch(now_ms);
                }
                let t = c.last_ms();
                (t != 0 && t >= since_ms).then(|| (Arc::clone(id), t))
            })
            .collect()
    }
}

/// Per-stream throttle for activity on long streams (WebSocket frames, SSE chunks): the first
/// event marks the sandbox, later ones only after `interval` has passed.
#[derive(Debug, Clone, Copy)]
pub struct StreamThrottle {
    next_ms: u64,
}

impl StreamThrottle {
    pub fn new(now_ms: u64, interval: Duration) -> Self {
        StreamThrottle {
            next_ms: now_ms + interval.as_millis() as u64,
        }
    }

    /// Returns true when this event should be recorded, and arms the next window.
    #[inline]
    pub fn ready(&mut self, now_ms: u64, interval: Duration) -> bool {
        if now_ms < self.next_ms {
            return false;
        }
        self.next_ms = now_ms + interval.as_millis() as u64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_keeps_the_max() {
        let c = ActivityCell::default();
        c.touch(100);
        c.touch(50);
        assert_eq!(c.last_ms(), 100);
        c.touch(150);
        assert_eq!(c.last_ms(), 150);
    }

    #[test]
    fn concurrent_touches_keep_the_max() {
        let c = Arc::new(ActivityCell::default());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        c.touch(i * 4 + t);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.last_ms(), 9_999 * 4 + 3);
    }

    #[test]
    fn tracker_snapshot_and_forget() {
        let t = ActivityTracker::default();
        t.cell("a").touch(10);
        t.cell("b").touch(20);
        let _never = t.cell("c");
        let mut snap = t.snapshot(0, 0);
        snap.sort();
        assert_eq!(snap, vec![("a".into(), 10), ("b".into(), 20)]);
        assert_eq!(t.snapshot(15, 0), vec![("b".into(), 20)]);
        // Same cell for the same id.
        t.cell("a").touch(30);
        assert_eq!(t.cell("a").last_ms(), 30);
        t.forget("a");
        assert_eq!(t.cell("a").last_ms(), 0);
        // An open stream makes its sandbox active at the snapshot's time, however long silent.
        let slot = t.cell("d").try_open(10).unwrap();
        let mut snap = t.snapshot(15, 99);
        snap.sort();
        assert_eq!(snap, vec![("b".into(), 20), ("d".into(), 99)]);
        assert_eq!(t.cell("d").last_ms(), 99);
        drop(slot);
        assert_eq!(t.snapshot(100, 200), vec![]);
    }

    #[test]
    fn coarse_clock_is_wall_time() {
        let precise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let coarse = now_ms();
        assert!(coarse.abs_diff(precise) < 1000, "{coarse} vs {precise}");
    }

    #[test]
    fn throttle() {
        let iv = Duration::from_millis(1000);
        let mut th = StreamThrottle::new(0, iv);
        assert!(!th.ready(10, iv));
        assert!(!th.ready(999, iv));
        assert!(th.ready(1000, iv));
        assert!(!th.ready(1500, iv));
        assert!(th.ready(5000, iv));
        assert!(!th.ready(5999, iv));
    }
}
