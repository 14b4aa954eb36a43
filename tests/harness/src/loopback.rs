//! Loopback addresses of this process's own, for the test kubelet's pods and for the listeners
//! of child processes the tests start.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

/// The next loopback address (127.0.0.x stays for the tests' own listeners). One process shares
/// the sequence, so two kubelets never hand out one address; each process starts at its own
/// offset (from its pid, in steps of 4,096 addresses), so kubelets of processes that run at once
/// (a benchmark beside a test run) do not hand out each other's addresses either.
pub fn next_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // 4,000 blocks of 4,096 addresses: 127.0.1.1 up to 127.250.x.y.
    let base = 256 + (std::process::id() % 4000) * 4096;
    let _ = NEXT.compare_exchange(0, base + 1, Ordering::Relaxed, Ordering::Relaxed);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ipv4Addr::new(
        127,
        ((n >> 16) & 0xff) as u8,
        ((n >> 8) & 0xff) as u8,
        (n & 0xff) as u8,
    )
}

/// An address for a child process to listen on (and to listen on again after a restart): a
/// loopback IP nothing else in this process uses, with a port free on it now. A port found by
/// binding `127.0.0.1:0` and dropping the listener is not enough: tests run in parallel, and the
/// kernel hands a freed port to the next `bind(0)`, so another test's server could take it
/// before the child binds it. Nobody else binds this IP.
pub fn child_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind((next_ip(), 0))?.local_addr()
}
