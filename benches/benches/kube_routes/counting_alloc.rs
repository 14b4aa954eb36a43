//! The benches' only unsafe code: a global allocator that forwards every call to the system
//! allocator unchanged and keeps a running count of live heap bytes, so `kube_routes` can report
//! the memory each route costs (live heap, not RSS: what stays after the list's transient buffers
//! are freed). Installed as this bench binary's `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Live heap bytes: allocated minus freed, over the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Bytes currently allocated on the heap by this process.
pub fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

pub struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// exactly `System`'s guarantees; the only addition is a relaxed atomic counter update, which
// neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract (non-zero size), which is
        // `System.alloc`'s.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by this allocator, i.e. by `System`, with layout `l`, as our
        // caller guarantees.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;
