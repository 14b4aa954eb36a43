//! The load generator: closed loop, N connections, one op in flight per connection, for a fixed
//! time. Built on hyper's HTTP/1 client connection and tokio-tungstenite (not wrk) because one
//! generator has to speak every workload (keep-alive, new connections, POST bodies, WebSocket
//! round trips, SSE streams) with the same timing and error accounting, record every latency
//! exactly into an HdrHistogram and count errors by status; wrk cannot do WebSocket or SSE, and
//! mixing tools would make rows of the report incomparable. Closed loop means latency is measured
//! at the load the system sustains (no coordinated-omission correction is needed because we
//! report the achieved rate next to it, not latency at a fixed offered rate).

use crate::workloads::{IdSpread, Kind, Workload};
use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use sandbox_gateway_bench::sys;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A request that takes longer than this is an error, so a stuck variant cannot stall the run.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Header the gateway routes on (the module's default).
const ID_HEADER: &str = "x-sandbox-id";

/// Everything a run needs besides the workload.
pub struct LoadOpts {
    /// Connection `i` goes to `targets[i % len]` (one address for Envoy; the upstreams for direct).
    pub targets: Vec<SocketAddr>,
    /// Header values for every sandbox ID, index = ID number.
    pub ids: Arc<Vec<HeaderValue>>,
    pub post_body: Bytes,
    pub sse_events: u64,
    pub zipf_s: f64,
}

/// The outcome of one run.
pub struct RunStats {
    /// Successful ops (2xx responses, echoed messages, complete streams).
    pub ops: u64,
    pub elapsed: Duration,
    /// Latency of successful ops, nanoseconds.
    pub hist: Histogram<u64>,
    /// Failed ops by cause: HTTP status ("503"), "io", "timeout", "connect", "short_stream".
    pub errors: BTreeMap<String, u64>,
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static histogram bounds")
}

struct ConnStats {
    ops: u64,
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl ConnStats {
    fn ok(&mut self, t0: Instant) {
        self.ops += 1;
        self.hist.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    fn err(&mut self, cause: impl Into<String>) {
        *self.errors.entry(cause.into()).or_default() += 1;
    }
}

/// Picks sandbox IDs per the workload's spread; one per connection, seeded by connection index
/// so runs are reproducible.
enum Picker {
    One,
    Uniform(usize, SmallRng),
    Zipf(Zipf<f64>, SmallRng),
}

impl Picker {
    fn new(spread: IdSpread, zipf_s: f64, seed: u64) -> Result<Self> {
        let rng = SmallRng::seed_from_u64(seed);
        Ok(match spread {
            IdSpread::One => Picker::One,
            IdSpread::Uniform(n) => Picker::Uniform(n.max(1), rng),
            IdSpread::Zipf(n) => Picker::Zipf(
                Zipf::new(n.max(1) as f64, zipf_s).context("zipf parameters")?,
                rng,
            ),
        })
    }
    fn next(&mut self) -> usize {
        match self {
            Picker::One => 0,
            Picker::Uniform(n, rng) => rng.random_range(0..*n),
            // Zipf samples ranks 1..=n.
            Picker::Zipf(z, rng) => (z.sample(rng) as usize).saturating_sub(1),
        }
    }
}

/// Runs `w` against `opts.targets` for `duration` and returns what it measured.
pub async fn run(w: &Workload, opts: &LoadOpts, duration: Duration) -> Result<RunStats> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(w.connections);
    for i in 0..w.connections {
        let addr = opts.targets[i % opts.targets.len()];
        let picker = Picker::new(w.spread, opts.zipf_s, i as u64 + 1)?;
        let ids = opts.ids.clone();
        let mut stats = ConnStats {
            ops: 0,
            hist: new_hist(),
            errors: BTreeMap::new(),
        };
        let kind = w.kind;
        let body = opts.post_body.clone();
        let sse_events = opts.sse_events;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn {
                addr,
                picker,
                ids,
                deadline,
            };
            match kind {
                Kind::Get => {
                    conn.http(&mut stats, Method::GET, "/bench", None, false)
                        .await
                }
                Kind::NewConn => {
                    conn.http(&mut stats, Method::GET, "/bench", None, true)
                        .await
                }
                Kind::Post => {
                    conn.http(&mut stats, Method::POST, "/bench", Some(body), false)
                        .await
                }
                Kind::Sse => {
                    let path = format!("/sse?n={sse_events}&interval_ms=0");
                    conn.sse(&mut stats, &path, sse_events).await
                }
                Kind::WebSocket => conn.websocket(&mut stats).await,
            }
            stats
        }));
    }
    let mut total = RunStats {
        ops: 0,
        elapsed: Duration::ZERO,
        hist: new_hist(),
        errors: BTreeMap::new(),
    };
    for t in tasks {
        let s = t.await.context("load task panicked")?;
        total.ops += s.ops;
        total.hist.add(&s.hist).context("merging histograms")?;
        for (k, v) in s.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

struct Conn {
    addr: SocketAddr,
    picker: Picker,
    ids: Arc<Vec<HeaderValue>>,
    deadline: Instant,
}

type Sender = http1::SendRequest<Full<Bytes>>;

impl Conn {
    fn id(&mut self) -> HeaderValue {
        let i = self.picker.next().min(self.ids.len() - 1);
        self.ids[i].clone()
    }

    async fn connect(&self, fresh: bool) -> Result<Sender> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        if fresh {
            // Close with RST instead of FIN: thousands of connections per second would otherwise
            // leave TIME_WAIT sockets behind and exhaust loopback ephemeral ports in a few seconds.
            sys::set_zero_linger(&tcp).context("setsockopt(SO_LINGER, 0)")?;
        }
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&mut self, method: Method, path: &str, body: Option<Bytes>) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body.unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = hyper::Uri::try_from(path).unwrap_or_default();
        let h = req.headers_mut();
        h.insert(HOST, HeaderValue::from_static("bench"));
        h.insert(ID_HEADER, self.id());
        req
    }

    /// Request/response loops on one connection (`fresh`: a new connection per request).
    async fn http(
        &mut self,
        stats: &mut ConnStats,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        fresh: bool,
    ) {
        let mut sender: Option<Sender> = None;
        while Instant::now() < self.deadline {
            let req = self.request(method.clone(), path, body.clone());
            let t0 = Instant::now();
            if sender.is_none() {
                match tokio::time::timeout(OP_TIMEOUT, self.connect(fresh)).await {
                    Ok(Ok(s)) => sender = Some(s),
                    _ => {
                        stats.err("connect");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some(s) = sender.as_mut() else { continue };
            match tokio::time::timeout(OP_TIMEOUT, send(s, req)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => stats.ok(t0),
                Ok(Ok(status)) => stats.err(status.to_string()),
                Ok(Err(_)) => {
                    stats.err("io");
                    sender = None;
                }
                Err(_) => {
                    stats.err("timeout");
                    sender = None;
                }
            }
            if fresh {
                sender = None;
            }
        }
    }

    /// Whole SSE streams on a keep-alive connection; a stream counts once all events arrived.
    async fn sse(&mut self, stats: &mut ConnStats, path: &str, events: u64) {
        let mut sender: Option<Sender> = None;
        while Instant::now() < self.deadline {
            let req = self.request(Method::GET, path, None);
            let t0 = Instant::now();
            if sender.is_none() {
                match self.connect(false).await {
                    Ok(s) => sender = Some(s),
                    Err(_) => {
                        stats.err("connect");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some(s) = sender.as_mut() else { continue };
            match tokio::time::timeout(OP_TIMEOUT, sse_stream(s, req)).await {
                Ok(Ok((status, n))) if (200..300).contains(&status) && n == events => stats.ok(t0),
                Ok(Ok((status, _))) if (200..300).contains(&status) => stats.err("short_stream"),
                Ok(Ok((status, _))) => stats.err(status.to_string()),
                Ok(Err(_)) | Err(_) => {
                    stats.err("io");
                    sender = None;
                }
            }
        }
    }

    /// Message round trips on one WebSocket connection (reconnects after a failure).
    async fn websocket(&mut self, stats: &mut ConnStats) {
        let payload = "x".repeat(64);
        while Instant::now() < self.deadline {
            let ws = match tokio::time::timeout(OP_TIMEOUT, self.ws_connect()).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    let cause = ws_cause(&e);
                    stats.err(cause);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => {
                    stats.err("timeout");
                    continue;
                }
            };
            let (mut tx, mut rx) = ws.split();
            while Instant::now() < self.deadline {
                let t0 = Instant::now();
                let rt = async {
                    tx.send(Message::text(payload.clone())).await?;
                    loop {
                        match rx.next().await {
                            Some(Ok(Message::Text(t))) => return anyhow::Ok(t.len()),
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => return Err(e.into()),
                            None => anyhow::bail!("closed"),
                        }
                    }
                };
                match tokio::time::timeout(OP_TIMEOUT, rt).await {
                    Ok(Ok(len)) if len == payload.len() => stats.ok(t0),
                    Ok(Ok(_)) => stats.err("bad_echo"),
                    Ok(Err(_)) | Err(_) => {
                        stats.err("io");
                        break;
                    }
                }
            }
            let _ = tx.send(Message::Close(None)).await;
        }
    }

    async fn ws_connect(
        &mut self,
    ) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error>
    {
        let mut req = format!("ws://{}/ws", self.addr).into_client_request()?;
        req.headers_mut().insert(ID_HEADER, self.id());
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
        Ok(ws)
    }
}

fn ws_cause(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => resp.status().as_u16().to_string(),
        _ => "connect".into(),
    }
}

/// Sends one request and reads the whole response body; returns the status.
async fn send(s: &mut Sender, req: Request<Full<Bytes>>) -> Result<u16> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// Reads an SSE response to its end; returns the status and the number of events.
async fn sse_stream(s: &mut Sender, req: Request<Full<Bytes>>) -> Result<(u16, u64)> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let events = body.windows(2).filter(|w| w == b"\n\n").count() as u64;
    Ok((status, events))
}

/// One GET with `id`, for readiness checks: the status, or an error if the target is not serving.
pub async fn probe(addr: SocketAddr, id: HeaderValue) -> Result<u16> {
    let mut c = Conn {
        addr,
        picker: Picker::One,
        ids: Arc::new(vec![id]),
        deadline: Instant::now(),
    };
    let mut s = c.connect(false).await?;
    let req = c.request(Method::GET, "/bench", None);
    tokio::time::timeout(OP_TIMEOUT, send(&mut s, req))
        .await
        .context("probe timed out")?
}
