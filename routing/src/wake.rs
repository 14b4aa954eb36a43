//! Waking paused sandboxes (docs/design.md#pause-and-wake), shared by the Envoy module and
//! sandbox-extproc: the bound on held wakes, one wake RPC in flight per sandbox (single flight),
//! and the hold itself, which waits on the route table, never polls.
//!
//! A held request only waits for the table: its sandbox's route turning Ready, or its paused
//! marker going away. The RPC runs beside it, once per sandbox however many requests are held:
//! it asks every address the WakeService endpoint resolves to (only the controller's leader
//! accepts), re-asks every [`REASK`] while the sandbox is still paused (a controller that
//! failed over mid-wake learns of it again), and retries failures with backoff until the hold's
//! bound. Everything runs on the gateway's own runtime: never on an Envoy worker.

use crate::config::WakeConfig;
use crate::decide::TokenHash;
use crate::holds::{ClientKey, Hold, HoldBook};
use crate::table::RouteTable;
use futures_util::future::{select_ok, BoxFuture, FutureExt};
use sandbox_gateway_proto::v1::wake_response::Result as WakeResult;
use sandbox_gateway_proto::v1::wake_service_client::WakeServiceClient;
use sandbox_gateway_proto::v1::WakeRequest;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// How often a wake is asked again while its sandbox stays paused.
pub const REASK: Duration = Duration::from_secs(2);
/// Deadline of one Wake call to one address.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels kept (one per controller address seen); more means the addresses churned.
const MAX_CHANNELS: usize = 64;

/// Counters the hosts publish as metrics.
#[derive(Debug, Default)]
pub struct WakeStats {
    /// Single-flight wakes started (one per sandbox per burst of requests).
    pub flights: AtomicU64,
    /// Wake calls answered ACCEPTED or RUNNING.
    pub accepted: AtomicU64,
    /// Wake rounds in which no address answered (controller down, not leading, refused).
    pub failures: AtomicU64,
}

/// How a wake hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeEnd {
    /// The sandbox's route is Ready: forward.
    Ready,
    /// The paused marker went without a Ready route (deleted, or the route is on its way: a
    /// miss hold was waited for it).
    Unpaused,
    /// The bound passed with the sandbox still paused: `sandbox_waking`.
    Expired,
    /// `max_held` were held and this client held the most: a newer request of a lighter client
    /// took this one's place (`too_many_wakes`).
    Displaced,
}

/// One held wake; its place in `max_held` is given back when dropped.
pub struct WakeHold {
    hold: Hold,
}

/// Every wake of one gateway process.
pub struct Waker {
    cfg: WakeConfig,
    table: Arc<RouteTable>,
    miss_hold: Duration,
    rt: tokio::runtime::Handle,
    requester: String,
    /// Places among the held wakes, shared between clients as the miss holds are
    /// (routing::holds): when all are taken, the client holding the most gives up its oldest.
    book: Arc<HoldBook>,
    /// Wakes in flight, by sandbox ID and the token hash they were checked against (a forged
    /// marker's wake, which the controller refuses, never stands in for the owner's).
    inflight: Mutex<HashSet<(Arc<str>, TokenHash)>>,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    pub stats: WakeStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waker {
    /// `rt` runs the wake RPCs; `requester` names this gateway in the controller's logs.
    pub fn new(
        cfg: WakeConfig,
        table: Arc<RouteTable>,
        miss_hold: Duration,
        rt: tokio::runtime::Handle,
        requester: String,
    ) -> Arc<Self> {
        Arc::new(Waker {
            book: HoldBook::new(cfg.max_held),
            cfg,
            table,
            miss_hold,
            rt,
            requester,
            inflight: Mutex::new(HashSet::new()),
            channels: Mutex::new(HashMap::new()),
            stats: WakeStats::default(),
        })
    }

    /// The hold's bound (`wake.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// A place among the held wakes for a request of `client`: always given; when `max_held`
    /// are held, the client holding the most gives up its oldest (that request is answered
    /// `too_many_wakes`), so a client flooding wakes only ever displaces its own. Returns
    /// whether one was displaced.
    pub fn admit(&self, client: ClientKey) -> (WakeHold, bool) {
        let (hold, displaced) = self.book.admit(client);
        (WakeHold { hold }, displaced)
    }

    /// Wakes held now.
    pub fn held(&self) -> usize {
        self.book.len()
    }

    /// Wakes whose RPC is in flight now (one per sandbox).
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Holds a request for `id` (its token already checked against the marker hashed `hash`)
    /// until its route is Ready, its marker goes, or the bound passes; starts the sandbox's wake
    /// if none is in flight.
    pub async fn hold(self: &Arc<Self>, place: &WakeHold, id: &str, hash: TokenHash) -> WakeEnd {
        tokio::select! {
            // Displacement first: a displaced hold must not linger.
            biased;
            _ = place.hold.displaced() => WakeEnd::Displaced,
            end = self.hold_until_settled(id, hash) => end,
        }
    }

    async fn hold_until_settled(self: &Arc<Self>, id: &str, hash: TokenHash) -> WakeEnd {
        let deadline = Instant::now() + self.cfg.timeout;
        let ready = |t: &RouteTable| t.get(id).is_some_and(|r| r.spec.ready);
        // The flight's own bound came from the request that started it: a request held later
        // starts a new one (a no-op while one runs) every REASK until its own bound.
        loop {
            self.start(id, hash);
            let next = deadline.min(Instant::now() + REASK);
            let settled = self
                .table
                .wait_until(id, next, |t| ready(t) || t.paused(id).is_none())
                .await;
            if settled || Instant::now() >= deadline {
                break;
            }
        }
        if ready(&self.table) {
            return WakeEnd::Ready;
        }
        if self.table.paused(id).is_some() {
            return WakeEnd::Expired;
        }
        // The marker went first: the route arrives on the other watch, or never (deleted).
        let grace = deadline.min(Instant::now() + self.miss_hold);
        self.table.wait_until(id, grace, ready).await;
        WakeEnd::Unpaused
    }

    /// Starts the single-flight wake of `id` unless one is running.
    fn start(self: &Arc<Self>, id: &str, hash: TokenHash) {
        let key: (Arc<str>, TokenHash) = (id.into(), hash);
        if !lock(&self.inflight).insert(key.clone()) {
            return;
        }
        self.stats.flights.fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        self.rt.spawn(async move {
            this.fly(&key.0, key.1).await;
            lock(&this.inflight).remove(&key);
        });
    }

    /// Asks until the sandbox is settled (Ready, or no longer paused) or the bound passes.
    async fn fly(&self, id: &str, hash: TokenHash) {
        let deadline = Instant::now() + self.cfg.timeout;
        let settled =
            |t: &RouteTable| t.get(id).is_some_and(|r| r.spec.ready) || t.paused(id).is_none();
        let mut backoff = Duration::from_millis(50);
        while !settled(&self.table) && Instant::now() < deadline {
            match self.ask(id, hash).await {
                Ok(WakeResult::Accepted | WakeResult::Running) => {
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(50);
                    let next = deadline.min(Instant::now() + REASK);
                    self.table.wait_until(id, next, settled).await;
                }
                Ok(other) => {
                    // NOT_FOUND, PAUSED_BY_SPEC: nothing to wake; the marker watch settles the
                    // held requests (404, or 409 once the marker says so).
                    tracing::info!(sandbox_id = %id, result = ?other, "wake refused by the controller");
                    self.table.wait_until(id, deadline, settled).await;
                    return;
                }
                Err(why) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sandbox_id = %id, error = %why, "wake failed; retrying");
                    tokio::time::sleep_until(deadline.min(Instant::now() + backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// One round: every address of the endpoint, at once; the first answer wins.
    async fn ask(&self, id: &str, hash: TokenHash) -> Result<WakeResult, String> {
        let token_sha256 = hash.map(hex::encode).unwrap_or_default();
        let addrs = self.resolve().await?;
        let calls: Vec<BoxFuture<'_, Result<WakeResult, String>>> = addrs
            .into_iter()
            .map(|addr| {
                let req = WakeRequest {
                    sandbox_id: id.to_string(),
                    requester: self.requester.clone(),
                    token_sha256: token_sha256.clone(),
                };
                self.call(addr, req).boxed()
            })
            .collect();
        if calls.is_empty() {
            return Err("the wake endpoint resolved to no address".into());
        }
        select_ok(calls).await.map(|(r, _)| r)
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let hostport = self
            .cfg
            .endpoint
            .strip_prefix("http://")
            .unwrap_or(&self.cfg.endpoint);
        tokio::net::lookup_host(hostport)
            .await
            .map(|a| a.collect())
            .map_err(|e| format!("resolving {hostport}: {e}"))
    }

    fn channel(&self, addr: SocketAddr) -> Result<Channel, String> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(&addr) {
            return Ok(c.clone());
        }
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr, c.clone());
        Ok(c)
    }

    async fn call(&self, addr: SocketAddr, req: WakeRequest) -> Result<WakeResult, String> {
        let mut req = tonic::Request::new(req);
        if let Some(t) = &self.cfg.token {
            let v = t
                .authorization()
                .parse()
                .map_err(|_| "the wake token is not a header value".to_string())?;
            req.metadata_mut().insert(crate::bearer::AUTHORIZATION, v);
        }
        let mut client = WakeServiceClient::new(self.channel(addr)?);
        let r = tokio::time::timeout(CALL_TIMEOUT, client.wake(req))
            .await
            .map_err(|_| format!("{addr}: timed out"))?
            .map_err(|s| format!("{addr}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        WakeResult::try_from(r.result).map_err(|_| format!("{addr}: unknown result {}", r.result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Paused, RouteSpec};

    fn waker(max_held: usize) -> (Arc<Waker>, Arc<RouteTable>) {
        let table = Arc::new(RouteTable::new());
        let cfg = WakeConfig {
            // Nothing listens there: every wake round fails and retries, the holds just wait.
            endpoint: "http://127.0.0.1:1".into(),
            token: None,
            timeout: Duration::from_secs(20),
            max_held,
        };
        let w = Waker::new(
            cfg,
            Arc::clone(&table),
            Duration::from_millis(50),
            tokio::runtime::Handle::current(),
            "test".into(),
        );
        (w, table)
    }

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([10, 0, 0, last]))
    }

    /// A client that fills `max_held` with wakes gives way to a lighter client's: its own
    /// oldest hold ends `Displaced` (429), never the lighter client's; the rest end when the
    /// route turns Ready.
    #[tokio::test]
    async fn a_wake_flood_displaces_only_itself() {
        let (w, table) = waker(3);
        let marker = Paused {
            token_sha256: None,
            wakeable: true,
        };
        table.set_paused("p", vec![marker]);
        let mut flood = Vec::new();
        for _ in 0..3 {
            let (place, displaced) = w.admit(client(1));
            assert!(!displaced);
            let w = Arc::clone(&w);
            flood.push(tokio::spawn(async move { w.hold(&place, "p", None).await }));
            tokio::task::yield_now().await;
        }
        assert_eq!(w.held(), 3);
        let (place, displaced) = w.admit(client(2));
        assert!(displaced, "the book was full: the flood's oldest gives way");
        let light = {
            let w = Arc::clone(&w);
            tokio::spawn(async move { w.hold(&place, "p", None).await })
        };
        assert_eq!(flood.remove(0).await.unwrap(), WakeEnd::Displaced);
        assert_eq!(w.held(), 3);
        // The sandbox wakes: every remaining hold ends Ready, the lighter client's included.
        table.upsert(RouteSpec {
            id: "p".into(),
            ip: "10.0.0.9".parse().unwrap(),
            port: 80,
            ready: true,
            token_sha256: None,
            pod_uid: None,
            resource_version: 0,
        });
        for h in flood {
            assert_eq!(h.await.unwrap(), WakeEnd::Ready);
        }
        assert_eq!(light.await.unwrap(), WakeEnd::Ready);
        assert_eq!(w.held(), 0);
        assert!(w.stats.flights.load(Ordering::Relaxed) >= 1);
    }
}
