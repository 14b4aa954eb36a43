//! The miss-hold admission: at most `max_held_misses` requests wait for a route at once, and a
//! flood of unknown IDs from one client cannot take the hold from everyone else.
//!
//! The rule (docs/design.md#limits): while there is room, every miss is held. When the book is
//! full, the client holding the most misses gives up its oldest one (answered at once, as if its
//! hold had expired) and the new miss takes the place. A client flooding junk IDs is always the
//! heaviest, so it only ever displaces its own holds; a client with fewer holds is never
//! displaced while a heavier one exists. A request from the flooding client itself still gets
//! its hold, and keeps it while fewer than `max_held_misses` newer misses arrive.
//!
//! Clients are keyed by address: the IPv4 address, or the /64 of an IPv6 one (what one host
//! controls). Behind an L7 load balancer, configure Envoy's `xff_num_trusted_hops` so the
//! downstream address is the real client's.
//!
//! Only misses come here (a route hit never locks); the lock is held for a map update.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

use crate::table::RouteTable;

/// Who a held request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    V4(u32),
    /// The top 64 bits of the address.
    V6(u64),
    /// The address was not available: all such requests count as one client.
    Unknown,
}

impl ClientKey {
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }

    /// From Envoy's `source.address` (`ip:port`, `[v6]:port`, or a bare IP).
    pub fn from_source(addr: &[u8]) -> Self {
        let Ok(s) = std::str::from_utf8(addr) else {
            return ClientKey::Unknown;
        };
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Self::from_ip(sa.ip());
        }
        s.parse::<IpAddr>()
            .map(Self::from_ip)
            .unwrap_or(ClientKey::Unknown)
    }
}

#[derive(Default)]
struct Book {
    next_seq: u64,
    total: usize,
    /// Each client's holds, oldest first, with the signal that ends one early.
    clients: HashMap<ClientKey, BTreeMap<u64, Arc<Notify>>>,
    /// `(holds, client)`, to find the heaviest client in O(log n).
    by_load: BTreeSet<(usize, ClientKey)>,
}

impl Book {
    fn set_load(&mut self, client: ClientKey, before: usize, after: usize) {
        self.by_load.remove(&(before, client));
        if after > 0 {
            self.by_load.insert((after, client));
        }
    }

    fn remove(&mut self, client: ClientKey, seq: u64) -> Option<Arc<Notify>> {
        let holds = self.clients.get_mut(&client)?;
        let before = holds.len();
        let signal = holds.remove(&seq)?;
        let after = holds.len();
        if after == 0 {
            self.clients.remove(&client);
        }
        self.set_load(client, before, after);
        self.total -= 1;
        Some(signal)
    }

    /// Ends the heaviest client's oldest hold early; false if nobody holds anything.
    fn displace_one(&mut self) -> bool {
        let Some(&(_, heaviest)) = self.by_load.last() else {
            return false;
        };
        let oldest = self
            .clients
            .get(&heaviest)
            .and_then(|h| h.first_key_value())
            .map(|(seq, _)| *seq);
        match oldest.and_then(|seq| self.remove(heaviest, seq)) {
            Some(signal) => {
                // `notify_one` stores a permit: the hold ends even if it has not started waiting.
                signal.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Every held miss of one gateway process (module or sandbox-extproc).
pub struct HoldBook {
    cap: usize,
    book: Mutex<Book>,
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// The route appeared.
    Arrived,
    /// `miss_hold` passed without it.
    Expired,
    /// A newer miss took this one's place (the book was full and this client the heaviest).
    Displaced,
}

/// One admitted miss; leaves the book when dropped.
pub struct Hold {
    book: Arc<HoldBook>,
    client: ClientKey,
    seq: u64,
    signal: Arc<Notify>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut b = self.book.lock();
        // Absent when it was displaced: the displacer already removed it.
        b.remove(self.client, self.seq);
    }
}

impl HoldBook {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(HoldBook {
            cap: cap.max(1),
            book: Mutex::new(Book::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        // Every update leaves the book consistent before anything can panic.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a miss from `client`. Returns the hold and whether another hold was displaced to
    /// make room (for a counter).
    pub fn admit(self: &Arc<Self>, client: ClientKey) -> (Hold, bool) {
        let mut b = self.lock();
        let displaced = b.total >= self.cap && b.displace_one();
        let seq = b.next_seq;
        b.next_seq += 1;
        let signal = Arc::new(Notify::new());
        let holds = b.clients.entry(client).or_default();
        let before = holds.len();
        holds.insert(seq, Arc::clone(&signal));
        b.set_load(client, before, before + 1);
        b.total += 1;
        drop(b);
        let hold = Hold {
            book: Arc::clone(self),
            client,
            seq,
            signal,
        };
        (hold, displaced)
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds of `client` now.
    pub fn held_by(&self, client: ClientKey) -> usize {
        self.lock().clients.get(&client).map_or(0, BTreeMap::len)
    }
}

impl Hold {
    /// Resolves when this hold is displaced (a lighter client's newer hold took its place).
    pub async fn displaced(&self) {
        self.signal.notified().await
    }

    /// Waits up to `timeout` for `id`'s route (or its paused marker: the route of a sandbox that
    /// is pausing can vanish before its marker arrives, and the request then becomes a wake), or
    /// until this hold is displaced.
    pub async fn wait(&self, table: &RouteTable, id: &str, timeout: Duration) -> HoldEnd {
        let deadline = tokio::time::Instant::now() + timeout;
        let known = |t: &RouteTable| t.get(id).is_some() || t.paused(id).is_some();
        tokio::select! {
            // Displacement first: a displaced hold must not linger.
            biased;
            _ = self.signal.notified() => HoldEnd::Displaced,
            known = table.wait_until(id, deadline, known) => if known {
                HoldEnd::Arrived
            } else {
                HoldEnd::Expired
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> ClientKey {
        ClientKey::from_ip(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn client_keys_from_envoy_source_addresses() {
        assert_eq!(ClientKey::from_source(b"10.0.0.7:5123"), v4(7));
        assert_eq!(ClientKey::from_source(b"10.0.0.7"), v4(7));
        assert_eq!(ClientKey::from_source(b"[::ffff:10.0.0.7]:80"), v4(7));
        // One /64 is one client.
        assert_eq!(
            ClientKey::from_source(b"[2001:db8:1:2::1]:80"),
            ClientKey::from_source(b"[2001:db8:1:2:ffff::9]:443")
        );
        assert_ne!(
            ClientKey::from_source(b"[2001:db8:1:2::1]:80"),
            ClientKey::from_source(b"[2001:db8:1:3::1]:80")
        );
        for junk in [&b""[..], b"nonsense", b"\xff\xfe", b"10.0.0.1:99999"] {
            assert_eq!(ClientKey::from_source(junk), ClientKey::Unknown);
        }
    }

    #[test]
    fn room_for_everyone_until_full() {
        let book = HoldBook::new(3);
        let holds: Vec<_> = (0..3).map(|i| book.admit(v4(i)).0).collect();
        assert_eq!(book.len(), 3);
        drop(holds);
        assert!(book.is_empty());
    }

    #[tokio::test]
    async fn a_flood_displaces_only_itself_and_never_a_lighter_client() {
        let book = HoldBook::new(100);
        let flood = v4(1);
        let mut junk: Vec<Hold> = (0..100).map(|_| book.admit(flood).0).collect();
        assert_eq!(book.held_by(flood), 100);
        // The cap is full of junk; a new client still gets a hold, displacing the flood's oldest.
        let (claim, displaced) = book.admit(v4(2));
        assert!(displaced);
        assert_eq!((book.len(), book.held_by(flood)), (100, 99));
        let table = RouteTable::new();
        assert_eq!(
            junk[0].wait(&table, "x", Duration::from_secs(60)).await,
            HoldEnd::Displaced
        );
        // The flood goes on: each new junk miss displaces the flood's own oldest, never the claim.
        for _ in 0..10_000 {
            let (h, displaced) = book.admit(flood);
            assert!(displaced);
            junk.push(h);
            junk.remove(0);
        }
        assert_eq!(book.held_by(v4(2)), 1);
        assert_eq!(book.len(), 100);
        // The claim's route arrives: its hold ends with it.
        table.upsert(crate::table::RouteSpec {
            id: "claimed".into(),
            ip: "10.0.0.9".parse().unwrap(),
            port: 80,
            ready: true,
            token_sha256: None,
            pod_uid: None,
            resource_version: 0,
        });
        assert_eq!(
            claim.wait(&table, "claimed", Duration::from_secs(60)).await,
            HoldEnd::Arrived
        );
        drop(claim);
        drop(junk);
        assert!(book.is_empty());
    }

    #[tokio::test]
    async fn the_heaviest_of_many_clients_gives_way() {
        let book = HoldBook::new(6);
        let a: Vec<_> = (0..4).map(|_| book.admit(v4(1)).0).collect();
        let b: Vec<_> = (0..2).map(|_| book.admit(v4(2)).0).collect();
        let (_c, displaced) = book.admit(v4(3));
        assert!(displaced);
        assert_eq!(
            (
                book.held_by(v4(1)),
                book.held_by(v4(2)),
                book.held_by(v4(3))
            ),
            (3, 2, 1)
        );
        let table = RouteTable::new();
        assert_eq!(
            a[0].wait(&table, "x", Duration::from_secs(60)).await,
            HoldEnd::Displaced
        );
        assert_eq!(
            b[0].wait(&table, "x", Duration::from_millis(10)).await,
            HoldEnd::Expired
        );
    }
}
