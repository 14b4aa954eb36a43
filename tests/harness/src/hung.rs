//! A sandbox that accepts connections and never answers: the "hung sandbox" of the load tests
//! and the abuse benchmark. It reads and discards what arrives, and drops a connection once the
//! gateway closes it, so repeated rounds do not pile up sockets; `open()` counts the connections
//! currently waiting on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct HungSandbox {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl HungSandbox {
    /// Listens on a free loopback port, in the background on the current runtime.
    pub async fn start() -> anyhow::Result<HungSandbox> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let open = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&open);
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    counter.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(HungSandbox { addr, open, accept })
    }

    /// Connections open to it now (each a request the gateway let through, waiting).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for HungSandbox {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
