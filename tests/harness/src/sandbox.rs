//! A small local "sandbox" server: the upstream behind the gateway in the demo,
//! the end-to-end tests and the benchmarks.
//!
//! One listener speaks HTTP/1.1 (keep-alive) and h2c and serves:
//! * `GET /sse?n=N&interval_ms=M` — N server-sent events, M ms apart;
//! * a WebSocket upgrade on any path — echoes messages, `whoami` names the sandbox;
//! * `/bench` — a fixed `ok`, kept as cheap as possible for load tests;
//! * `GET /redirect?to=/p` — a server that builds its URLs from `x-forwarded-prefix`, as web
//!   frameworks behind a prefix-stripping proxy do: `302` to `<x-forwarded-prefix>/p`;
//! * `/host-pinned` — a server that pins its Host, as DNS-rebinding protection does: `421`
//!   unless the Host is `localhost:<its own port>`, else the JSON description below;
//! * `PUT /files?path=/mnt/p` (body: the file's bytes) and `GET /files?path=/mnt/p` — a file in
//!   one of the server's mounted volumes (the directory of the mount whose path is the longest
//!   prefix of `p`): `201` once written, `200` with the bytes, `404` for a missing file or no
//!   mount, `400` for a relative path or one with `..`. The test kubelet mounts a pod's
//!   PersistentVolumeClaims here, so a file outlives the pod that wrote it;
//! * gRPC over h2c (`content-type: application/grpc…`) — the Echo service of [`crate::grpc`],
//!   answering with the server's name, so one port serves HTTP, WebSocket, SSE and gRPC;
//! * anything else — a JSON description of the request, so tests can check
//!   what the gateway forwarded (method, path, headers, body length).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fixed and small bodies stay unboxed so `/bench` never allocates for its body. Streamed ones
/// (SSE, gRPC) are boxed; only gRPC's can fail, but one type keeps the handler simple.
type Body = Either<Full<Bytes>, UnsyncBoxBody<Bytes, BoxError>>;

/// A mount table: `(mount path, directory)` pairs, e.g. `("/data", "/tmp/vols/ns/claim")`.
pub type Mounts = Vec<(String, PathBuf)>;

const BENCH_BODY: Bytes = Bytes::from_static(b"ok");

/// Room for connection bursts from benchmarks; tokio's default backlog is 1024.
const LISTEN_BACKLOG: u32 = 4096;

/// A running sandbox server. Dropping it (or calling [`SandboxServer::shutdown`])
/// stops the listener and closes every open connection, including upgraded ones.
pub struct SandboxServer {
    pub addr: SocketAddr,
    // Dropping the sender is the stop signal: every task watches for the close.
    stop: watch::Sender<()>,
    accept_task: JoinHandle<()>,
}

struct State {
    name: String,
    /// The listening port: the only Host `/host-pinned` accepts is `localhost:<port>`.
    port: u16,
    /// JSON string literal of the name, escaped once instead of per SSE event.
    name_json: String,
    /// What `/files` reads and writes.
    mounts: Mounts,
    /// The Echo gRPC service (it waits for the router to be ready before each call).
    grpc: TowerToHyperService<tonic::service::Routes>,
}

impl SandboxServer {
    /// Binds `bind` (port 0 picks a free port) and serves in the background on
    /// the current tokio runtime.
    pub async fn start(name: &str, bind: SocketAddr) -> anyhow::Result<SandboxServer> {
        Self::start_with(name, bind, false, Mounts::new()).await
    }

    /// Like [`SandboxServer::start`], with volumes mounted for `/files`: each `(mount path,
    /// directory)` pair makes the directory's files visible under the mount path.
    pub async fn start_with_mounts(
        name: &str,
        bind: SocketAddr,
        mounts: Mounts,
    ) -> anyhow::Result<SandboxServer> {
        Self::start_with(name, bind, false, mounts).await
    }

    /// Like [`SandboxServer::start`], but the server speaks only HTTP/1.1 (an HTTP/2 preface is
    /// a protocol error), as many sandbox servers do.
    pub async fn start_http1_only(name: &str, bind: SocketAddr) -> anyhow::Result<SandboxServer> {
        Self::start_with(name, bind, true, Mounts::new()).await
    }

    async fn start_with(
        name: &str,
        bind: SocketAddr,
        http1_only: bool,
        mounts: Mounts,
    ) -> anyhow::Result<SandboxServer> {
        let socket = if bind.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // Lets a restarted demo sandbox rebind its port while old sockets sit in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(bind)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        Self::serve(name, listener, http1_only, mounts)
    }

    /// Like [`SandboxServer::start`], but listening inside the network namespace at `netns`
    /// (e.g. `/var/run/netns/<name>`, as `ip netns add` makes): the socket is created by a
    /// thread that enters the namespace first, and keeps belonging to it when served here.
    pub async fn start_in_netns(
        name: &str,
        bind: SocketAddr,
        netns: &Path,
    ) -> anyhow::Result<SandboxServer> {
        Self::start_in_netns_with_mounts(name, bind, netns, Mounts::new()).await
    }

    /// [`SandboxServer::start_in_netns`] with volumes, as [`SandboxServer::start_with_mounts`].
    pub async fn start_in_netns_with_mounts(
        name: &str,
        bind: SocketAddr,
        netns: &Path,
        mounts: Mounts,
    ) -> anyhow::Result<SandboxServer> {
        let netns = netns.to_path_buf();
        let std_listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
            let ns = std::fs::File::open(&netns)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let l = std::net::TcpListener::bind(bind)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the netns thread panicked"))??;
        let listener = TcpListener::from_std(std_listener)?;
        Self::serve(name, listener, false, mounts)
    }

    fn serve(
        name: &str,
        listener: TcpListener,
        http1_only: bool,
        mounts: Mounts,
    ) -> anyhow::Result<SandboxServer> {
        let addr = listener.local_addr()?;

        let name_json = serde_json::to_string(name)?;
        let state = Arc::new(State {
            name: name.to_owned(),
            port: addr.port(),
            name_json,
            mounts,
            grpc: TowerToHyperService::new(crate::grpc::echo_routes(name)),
        });
        let (stop, stopped) = watch::channel(());
        let accept_task = tokio::spawn(accept_loop(listener, state, stopped, http1_only));
        info!(sandbox = %name, %addr, "sandbox listening");
        Ok(SandboxServer {
            addr,
            stop,
            accept_task,
        })
    }

    /// Stops the server; once this returns the listening socket is closed.
    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.accept_task.await;
    }

    /// Serves until SIGINT (ctrl-c) or, on unix, SIGTERM, then shuts down.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        wait_for_signal().await?;
        info!(addr = %self.addr, "signal received, shutting down");
        self.shutdown().await;
        Ok(())
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let terminated = term.recv();
    // Without SIGTERM (non-unix) only ctrl-c can end the wait.
    #[cfg(not(unix))]
    let terminated = std::future::pending::<()>();
    tokio::select! {
        res = tokio::signal::ctrl_c() => res?,
        _ = terminated => {}
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<()>,
    http1_only: bool,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if http1_only {
        builder = builder.http1_only();
    }
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    // Usually fd exhaustion under load: back off instead of spinning.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        // Small SSE events and WebSocket echoes must not wait for Nagle; best effort.
        let _ = stream.set_nodelay(true);
        let (builder, state, mut stopped) = (builder.clone(), state.clone(), stopped.clone());
        tokio::spawn(async move {
            let conn_stopped = stopped.clone();
            let service = hyper::service::service_fn(move |req| {
                handle(state.clone(), conn_stopped.clone(), req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::select! {
                res = conn => if let Err(err) = res {
                    debug!(%err, %peer, "connection ended with error");
                },
                _ = stopped.changed() => {}
            }
        });
    }
}

async fn handle(
    state: Arc<State>,
    stopped: watch::Receiver<()>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/bench" {
        return Ok(Response::new(Either::Left(Full::new(BENCH_BODY))));
    }
    // gRPC needs HTTP/2 (trailers); over HTTP/1.1 such a request gets the JSON echo as before.
    if req.version() == Version::HTTP_2 && is_grpc(&req) {
        return Ok(grpc(&state, req).await);
    }
    // h2 has no Upgrade mechanism (RFC 8441 CONNECT is not needed here).
    if req.version() == Version::HTTP_11 && wants_websocket(&req) {
        return Ok(websocket_upgrade(state, stopped, req));
    }
    if req.uri().path() == "/sse" && req.method() == hyper::Method::GET {
        return Ok(sse(&state, req.uri().query().unwrap_or("")));
    }
    if req.uri().path() == "/redirect" && req.method() == hyper::Method::GET {
        return Ok(redirect(&req));
    }
    if req.uri().path() == "/files" {
        if req.method() == hyper::Method::PUT {
            let (parts, body) = req.into_parts();
            return Ok(put_file(&state, parts.uri.query().unwrap_or(""), body).await);
        }
        if req.method() == hyper::Method::GET {
            return Ok(get_file(&state, req.uri().query().unwrap_or("")).await);
        }
    }
    if req.uri().path() == "/host-pinned" && !host_is_pinned(&state, &req) {
        return Ok(plain(
            StatusCode::MISDIRECTED_REQUEST,
            "Invalid Host header",
        ));
    }
    Ok(echo(&state, req).await)
}

/// gRPC by the gateway's own rule, so gRPC-Web stays plain HTTP (the JSON echo) here too.
fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| routing::reply::is_grpc_content_type(ct.as_bytes()))
}

/// Hands the request to the Echo service and boxes its reply body into ours.
async fn grpc(state: &State, req: Request<Incoming>) -> Response<Body> {
    use hyper::service::Service;
    match state.grpc.call(req).await {
        Ok(resp) => resp.map(|body| Either::Right(body.map_err(BoxError::from).boxed_unsync())),
        Err(never) => match never {},
    }
}

/// Where `/files?path=P` lives: the file under the mount whose path is the longest prefix of
/// `P` (component-wise, so `/data` does not cover `/database`). A refusal is the reply's status
/// and text (not a whole response, which would make every `Result` here large).
fn resolve_file(state: &State, query: &str) -> Result<PathBuf, (StatusCode, String)> {
    let Some(raw) = query_param(query, "path") else {
        return Err((StatusCode::BAD_REQUEST, "no path= in the query".into()));
    };
    let Some(path) = percent_decode(raw) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "path is not valid percent-encoded UTF-8".into(),
        ));
    };
    let path = Path::new(&path);
    // `..` could climb out of the volume; a relative path has no mount to be under; a NUL is
    // no file name at all.
    let clean = path.is_absolute()
        && !path.as_os_str().as_encoded_bytes().contains(&0)
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !clean {
        return Err((
            StatusCode::BAD_REQUEST,
            "path must be absolute, without `..` or NUL".into(),
        ));
    }
    let mount = state
        .mounts
        .iter()
        .filter_map(|(at, dir)| Some((path.strip_prefix(at).ok()?, at, dir)))
        .max_by_key(|(_, at, _)| Path::new(at).components().count());
    let Some((rest, _, dir)) = mount else {
        let msg = format!("no volume mounted at {}", path.display());
        return Err((StatusCode::NOT_FOUND, msg));
    };
    if rest.as_os_str().is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            "path names a mount, not a file".into(),
        ));
    }
    Ok(dir.join(rest))
}

async fn put_file(state: &State, query: &str, body: Incoming) -> Response<Body> {
    let file = match resolve_file(state, query) {
        Ok(file) => file,
        Err((status, msg)) => return response(status, "text/plain", full(msg)),
    };
    let bytes = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            debug!(%err, "reading request body failed");
            return plain(StatusCode::BAD_REQUEST, "bad request body");
        }
    };
    // Like writing into a mounted volume: directories on the way are made as needed.
    if let Some(parent) = file.parent() {
        if let Err(err) = tokio::fs::create_dir_all(parent).await {
            warn!(%err, dir = %parent.display(), "making the file's directory failed");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not make the directory",
            );
        }
    }
    match tokio::fs::write(&file, &bytes).await {
        Ok(()) => plain(StatusCode::CREATED, "written"),
        Err(err) => {
            warn!(%err, file = %file.display(), "writing the file failed");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not write the file",
            )
        }
    }
}

async fn get_file(state: &State, query: &str) -> Response<Body> {
    let file = match resolve_file(state, query) {
        Ok(file) => file,
        Err((status, msg)) => return response(status, "text/plain", full(msg)),
    };
    match tokio::fs::read(&file).await {
        Ok(bytes) => response(StatusCode::OK, "application/octet-stream", full(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            plain(StatusCode::NOT_FOUND, "no such file")
        }
        Err(err) => {
            warn!(%err, file = %file.display(), "reading the file failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "could not read the file")
        }
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`); `None` for a bad escape or bytes
/// that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let digit = |d: u8| char::from(d).to_digit(16);
            let (hi, lo) = (digit(bytes.next()?)?, digit(bytes.next()?)?);
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// `302` to `to` (default `/landing`) under the prefix the proxy says it removed.
fn redirect(req: &Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("");
    let to = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "to")
        .map_or("/landing", |(_, v)| v);
    let prefix = req
        .headers()
        .get("x-forwarded-prefix")
        .map_or(&b""[..], HeaderValue::as_bytes);
    let mut location = prefix.to_vec();
    location.extend_from_slice(to.as_bytes());
    let Ok(location) = HeaderValue::from_bytes(&location) else {
        return plain(StatusCode::BAD_REQUEST, "bad redirect target");
    };
    let mut resp = plain(StatusCode::FOUND, "redirecting");
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

/// The Host (HTTP/1 `Host`, or h2's `:authority`) is `localhost:<our port>`.
fn host_is_pinned(state: &State, req: &Request<Incoming>) -> bool {
    let host = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    };
    host == Some(format!("localhost:{}", state.port).as_str())
}

fn wants_websocket(req: &Request<Incoming>) -> bool {
    req.headers().get_all(header::UPGRADE).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("websocket"))
        })
    })
}

fn full(body: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(body.into()))
}

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Body> {
    response(status, "text/plain", full(msg))
}

fn websocket_upgrade(
    state: Arc<State>,
    mut stopped: watch::Receiver<()>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "no websocket key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                debug!(%err, "websocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            _ = websocket_echo(ws, &state) => {}
            _ = stopped.changed() => {}
        }
    });

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Either::Left(Full::default()))
        // Unreachable in practice: every value above is a valid header value.
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

async fn websocket_echo<S>(mut ws: WebSocketStream<S>, state: &State)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(msg) = ws.next().await {
        let reply = match msg {
            Ok(Message::Text(text)) if text.as_str() == "whoami" => {
                Message::text(format!("{{\"sandbox\":{}}}", state.name_json))
            }
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => msg,
            // tungstenite answers pings and close frames itself.
            Ok(_) => continue,
            Err(err) => {
                debug!(%err, "websocket read failed");
                return;
            }
        };
        if let Err(err) = ws.send(reply).await {
            debug!(%err, "websocket write failed");
            return;
        }
    }
}

fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn query_u64(query: &str, key: &str) -> Option<u64> {
    query_param(query, key).and_then(|v| v.parse().ok())
}

fn sse(state: &State, query: &str) -> Response<Body> {
    let n = query_u64(query, "n").unwrap_or(5);
    let interval = Duration::from_millis(query_u64(query, "interval_ms").unwrap_or(100));
    let name_json = state.name_json.clone();
    let events = futures_util::stream::unfold(0u64, move |seq| {
        let event = format!("data: {{\"seq\":{seq},\"sandbox\":{name_json}}}\n\n");
        async move {
            if seq >= n {
                return None;
            }
            // The first event goes out at once so clients see the stream open promptly.
            if seq > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((Ok(Frame::data(Bytes::from(event))), seq + 1))
        }
    });
    let body = Either::Right(BodyExt::boxed_unsync(StreamBody::new(events)));
    let mut resp = response(StatusCode::OK, "text/event-stream", body);
    // Keeps intermediaries from buffering or replaying the stream.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[derive(Serialize)]
struct Echo<'a> {
    sandbox: &'a str,
    method: &'a str,
    path: &'a str,
    /// The protocol the request reached the sandbox with: "HTTP/1.1" or "HTTP/2.0".
    version: String,
    headers: BTreeMap<&'a str, String>,
    body_len: u64,
}

async fn echo(state: &State, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    // Count frames rather than collecting so large uploads don't sit in memory.
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(err) => {
                debug!(%err, "reading request body failed");
                return plain(StatusCode::BAD_REQUEST, "bad request body");
            }
        }
    }
    // Repeated headers are folded as HTTP allows, so a JSON object can hold them.
    let headers = parts.headers.keys().map(|name| {
        let values = parts.headers.get_all(name).iter();
        let values: Vec<_> = values
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        (name.as_str(), values.join(", "))
    });
    let echo = Echo {
        sandbox: &state.name,
        method: parts.method.as_str(),
        path: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        version: format!("{:?}", parts.version),
        headers: headers.collect(),
        body_len,
    };
    match serde_json::to_vec(&echo) {
        Ok(json) => response(StatusCode::OK, "application/json", full(json)),
        Err(err) => {
            warn!(%err, "serializing echo failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::client::conn::http1;
    use tokio::net::TcpStream;

    type Conn = http1::SendRequest<Full<Bytes>>;

    async fn start() -> SandboxServer {
        SandboxServer::start("sb-test", ([127, 0, 0, 1], 0).into())
            .await
            .unwrap()
    }

    async fn connect(addr: SocketAddr) -> Conn {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (sender, conn) = http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn send(conn: &mut Conn, req: Request<Full<Bytes>>) -> Response<Bytes> {
        let (parts, body) = conn.send_request(req).await.unwrap().into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header("host", "sandbox")
            .body(Full::default())
            .unwrap()
    }

    #[tokio::test]
    async fn echo_describes_the_request() {
        let server = start().await;
        let req = Request::post("/some/path?x=1&y=two")
            .header("host", "sandbox")
            .header("X-Custom", "Hello")
            .header("x-dup", "a")
            .header("x-dup", "b")
            .header("x-bin", HeaderValue::from_bytes(b"a\xffb").unwrap())
            .body(Full::new(Bytes::from_static(b"abcd")))
            .unwrap();
        let resp = send(&mut connect(server.addr).await, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let json: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(json["sandbox"], "sb-test");
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/some/path?x=1&y=two");
        assert_eq!(json["headers"]["x-custom"], "Hello");
        assert_eq!(json["headers"]["x-bin"], "a\u{fffd}b");
        assert_eq!(json["headers"]["x-dup"], "a, b");
        assert_eq!(json["body_len"], 4);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn sse_sends_n_events() {
        let server = start().await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, get("/sse?n=3&interval_ms=5")).await;
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let text = std::str::from_utf8(resp.body()).unwrap();
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["seq"], i);
            assert_eq!(event["sandbox"], "sb-test");
        }
    }

    #[tokio::test]
    async fn redirect_builds_its_location_from_the_forwarded_prefix() {
        let server = start().await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, get("/redirect?to=/api/kernels")).await;
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_eq!(resp.headers()[header::LOCATION], "/api/kernels");
        let req = Request::get("/redirect")
            .header("host", "sandbox")
            .header("x-forwarded-prefix", "/sandboxes/a/80")
            .body(Full::default())
            .unwrap();
        let resp = send(&mut conn, req).await;
        assert_eq!(resp.headers()[header::LOCATION], "/sandboxes/a/80/landing");
    }

    #[tokio::test]
    async fn host_pinned_accepts_only_its_localhost_host() {
        let server = start().await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, get("/host-pinned")).await;
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
        let req = Request::get("/host-pinned")
            .header("host", format!("localhost:{}", server.addr.port()))
            .body(Full::default())
            .unwrap();
        let resp = send(&mut conn, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(json["path"], "/host-pinned");
    }

    #[tokio::test]
    async fn bench_is_plain_ok_over_keep_alive() {
        let server = start().await;
        let mut conn = connect(server.addr).await;
        for _ in 0..3 {
            let resp = send(&mut conn, get("/bench")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.body().as_ref(), b"ok");
        }
    }

    #[tokio::test]
    async fn websocket_echoes_and_answers_whoami() {
        let server = start().await;
        let url = format!("ws://{}/any/path", server.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let binary = Message::binary(vec![0u8, 255, 7]);
        ws.send(binary.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), binary);
        ws.send(Message::text("whoami")).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap().into_text().unwrap();
        let json: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(json["sandbox"], "sb-test");
        ws.close(None).await.unwrap();
    }

    async fn start_mounted(name: &str, mounts: &[(&str, &Path)]) -> SandboxServer {
        let mounts = mounts
            .iter()
            .map(|(at, dir)| (at.to_string(), dir.to_path_buf()))
            .collect();
        SandboxServer::start_with_mounts(name, ([127, 0, 0, 1], 0).into(), mounts)
            .await
            .unwrap()
    }

    fn put(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
        Request::put(path)
            .header("host", "sandbox")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    }

    #[tokio::test]
    async fn files_are_written_into_the_mount_and_survive_a_restart() {
        let vol = tempfile::tempdir().unwrap();
        let server = start_mounted("sb-one", &[("/data", vol.path())]).await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, put("/files?path=/data/notes.txt", b"hello")).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        // Directories on the way are made, as in a real volume.
        let resp = send(&mut conn, put("/files?path=/data/a/b/deep.txt", b"deep")).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let resp = send(&mut conn, get("/files?path=/data/notes.txt")).await;
        assert_eq!(
            (resp.status(), resp.body().as_ref()),
            (StatusCode::OK, &b"hello"[..])
        );
        assert_eq!(
            std::fs::read(vol.path().join("notes.txt")).unwrap(),
            b"hello"
        );
        let resp = send(&mut conn, get("/files?path=/data/missing.txt")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        server.shutdown().await;

        // Another server (the next pod) with the same volume sees what the first one wrote.
        let server = start_mounted("sb-two", &[("/data", vol.path())]).await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, get("/files?path=/data/notes.txt")).await;
        assert_eq!(
            (resp.status(), resp.body().as_ref()),
            (StatusCode::OK, &b"hello"[..])
        );
        // Percent-encoded paths are decoded.
        let resp = send(&mut conn, get("/files?path=%2Fdata%2Fa/b/deep.txt")).await;
        assert_eq!(
            (resp.status(), resp.body().as_ref()),
            (StatusCode::OK, &b"deep"[..])
        );
    }

    #[tokio::test]
    async fn files_go_to_the_longest_matching_mount() {
        let (data, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let server = start_mounted(
            "sb-test",
            &[("/data", data.path()), ("/data/cache/", cache.path())],
        )
        .await;
        let mut conn = connect(server.addr).await;
        let resp = send(&mut conn, put("/files?path=/data/cache/x", b"c")).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(std::fs::read(cache.path().join("x")).unwrap(), b"c");
        assert!(!data.path().join("cache").exists());
        // Prefixes match whole components: /database is not under /data.
        let resp = send(&mut conn, put("/files?path=/database/x", b"d")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.body().as_ref(), b"no volume mounted at /database/x");
    }

    #[tokio::test]
    async fn bad_file_paths_are_rejected() {
        let vol = tempfile::tempdir().unwrap();
        let server = start_mounted("sb-test", &[("/data", vol.path())]).await;
        let mut conn = connect(server.addr).await;
        for bad in [
            "/files?path=data/x",
            "/files?path=/data/../x",
            "/files?path=/data/%2E%2E/x",
            "/files?path=/data/x%00y",
            "/files?path=/data/%zz",
            "/files?path=/data",
            "/files",
        ] {
            let resp = send(&mut conn, put(bad, b"x")).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "PUT {bad}");
            let resp = send(&mut conn, get(bad)).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "GET {bad}");
        }
        assert_eq!(std::fs::read_dir(vol.path()).unwrap().count(), 0);
        // Without mounts nothing is stored; other methods on /files still get the echo.
        let plain = start().await;
        let mut conn = connect(plain.addr).await;
        let resp = send(&mut conn, put("/files?path=/data/x", b"x")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.body().as_ref(), b"no volume mounted at /data/x");
        let req = Request::post("/files?path=/data/x")
            .header("host", "sandbox")
            .body(Full::default())
            .unwrap();
        let resp = send(&mut conn, req).await;
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn grpc_and_http_share_the_port() {
        let server = start().await;
        let mut grpc = crate::grpc::client(server.addr, "sb-test").await.unwrap();
        let reply = grpc
            .unary(crate::grpc::UnaryRequest {
                message: "hi".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (reply.message.as_str(), reply.sandbox.as_str()),
            ("hi", "sb-test")
        );
        let call = crate::grpc::StreamCall {
            count: 3,
            fail_code: 0,
            fail_message: String::new(),
        };
        let mut replies = grpc.stream(call).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(reply) = replies.next().await {
            assert_eq!(reply.unwrap().index, n);
            n += 1;
        }
        assert_eq!(n, 3);
        let refused = grpc
            .unary(crate::grpc::UnaryRequest {
                message: "fail".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

        // Plain HTTP/1.1, and h2 that is not gRPC (gRPC-Web), still get the JSON echo.
        let resp = send(&mut connect(server.addr).await, get("/after-grpc")).await;
        let json: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(
            (json["sandbox"].as_str(), json["path"].as_str()),
            (Some("sb-test"), Some("/after-grpc"))
        );
        let io = TokioIo::new(TcpStream::connect(server.addr).await.unwrap());
        let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post(format!("http://{}/grpc-web", server.addr))
            .header(header::CONTENT_TYPE, "application/grpc-web")
            .body(Full::<Bytes>::default())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["version"], "HTTP/2.0");
    }

    #[tokio::test]
    async fn shutdown_closes_listener_and_connections() {
        let server = start().await;
        let addr = server.addr;
        let url = format!("ws://{addr}/");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        server.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
        // The upgraded connection is closed too, not left dangling.
        let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        assert!(matches!(next, Ok(None | Some(Err(_)))));
    }
}
