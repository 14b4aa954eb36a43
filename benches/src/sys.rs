//! Every piece of unsafe code in the benches, in one module: the libc calls the load harness
//! needs (CPU pinning, clock ticks, `SO_LINGER`) and the counting global allocator `kube_routes`
//! measures memory with. Each unsafe block says why it is sound. The rest of the bench crate
//! denies unsafe code.
//!
//! Why libc rather than `rustix`: the routing core uses rustix with only its `time` feature, and
//! cargo unifies features per build, so rustix's `thread`/`param`/`net` here would give
//! `make bench` and `cargo test --workspace` a second build of rustix, the routing core, the
//! module and sandbox-extproc (and `make bench` a differently built module than `make build`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicIsize, Ordering};

use anyhow::{bail, Context, Result};

/// Pins the calling thread (and every thread or process it creates afterwards, which inherit the
/// mask) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        bail!("empty CPU list");
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, and CPU_SET only writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("CPU {cpu} out of range");
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid, initialised cpu_set_t of the given size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("sched_setaffinity({cpus:?})"));
    }
    Ok(())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of /proc/<pid>/stat times; 100 if
/// sysconf fails.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `SO_LINGER` on with a zero timeout: closing the socket sends RST instead of entering
/// TIME_WAIT (the new-connection workload would otherwise exhaust local ports).
pub fn set_zero_linger(socket: &impl AsRawFd) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid open socket fd (borrowed for the call) and a correctly sized `linger` value
    // that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Live heap bytes: allocated minus freed, over the whole process, while [`CountingAlloc`] is
/// the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Bytes currently allocated on the heap, as counted by [`CountingAlloc`] (0 if it is not the
/// process's global allocator).
pub fn live_heap_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A global allocator that forwards every call to the system allocator unchanged and counts live
/// bytes ([`live_heap_bytes`]): memory per route is what stays on the heap, not RSS. Installed by
/// `kube_routes` with `#[global_allocator]`.
pub struct CountingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// exactly `System`'s guarantees; the only addition is a relaxed atomic counter update, which
// neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAlloc {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_the_calling_thread() {
        // Runs on its own test thread, so the narrowed mask does not leak into other tests.
        pin_current_thread(&[0]).unwrap();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim);
        assert_eq!(allowed, Some("0"));
        assert!(pin_current_thread(&[]).is_err());
        assert!(pin_current_thread(&[libc::CPU_SETSIZE as usize]).is_err());
        assert!(clock_ticks_per_second() >= 1.0);
    }

    #[test]
    fn zero_linger_on_sockets_only() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_zero_linger(&s).unwrap();
        let not_a_socket = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(set_zero_linger(&not_a_socket).is_err());
    }
}
