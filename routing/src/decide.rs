//! The request-path decision (docs/design.md#request-path-rules), shared by the Envoy module and
//! sandbox-extproc so both answer every request the same way: key → route → ready → token.
//! One request that names no sandbox is the gateway's own: its readiness probe,
//! `GET` [`READY_PATH`] (docs/design.md#readiness).
//!
//! Pure and read-only: it looks at one view of the request headers and the route table and says
//! what to do; the caller applies it with whatever its host offers (module ABI calls, ext_proc
//! header mutations and immediate responses).

use crate::activity::StreamSlot;
use crate::config::{GatewayConfig, PathPrefixMode, UpstreamHost};
use crate::key::{extract, RequestView, SandboxKey, MAX_ID_LEN};
pub use crate::reply::ReplyCode;
use crate::table::{Paused, Route, RouteTable};
use crate::token::token_matches;
use arrayvec::ArrayString;
use std::sync::Arc;

/// The header an ORIGINAL_DST cluster with `use_http_header: true` would obey. Ours does not, and
/// both modes drop it anyway so no later hop can be steered by a client-sent value.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

/// Tells the upstream the prefix the gateway removed from the path (strip mode). Ours alone: a
/// client-sent value is removed from every routed request.
pub const FORWARDED_PREFIX_HEADER: &str = "x-forwarded-prefix";

/// The client's Host, when `upstream_host` replaced it. Ours alone in that mode: a client-sent
/// value is overwritten.
pub const FORWARDED_HOST_HEADER: &str = "x-forwarded-host";

/// A validated sandbox ID, on the stack.
pub type SandboxId = ArrayString<MAX_ID_LEN>;

/// `localhost:<port>`, on the stack (15 bytes at most).
pub type AuthorityBuf = ArrayString<15>;
/// The gateway's readiness path, answered by the gateway itself (`GET` or `HEAD`, any query) when
/// the request names no sandbox: wherever a request would otherwise get 400
/// `missing_sandbox_id`, so no path that reaches a sandbox is ever taken over. Under
/// `/.well-known/` (RFC 8615), where no sandbox's own API lives.
pub const READY_PATH: &str = "/.well-known/sandbox-gateway/ready";

/// What to do with a request, decided before anything is changed.
#[derive(Debug)]
pub enum Decision {
    /// Answer locally with the JSON error body ([`ErrorReply::body`]).
    Reply(ErrorReply),
    /// A readiness probe once the route source has synced: answer 200 with [`Ready::body`].
    /// (Before that, the probe gets `Reply` 503 `routes_not_synced` with `Retry-After`.)
    Ready(Ready),
    /// No route yet: wait up to `miss_hold` for it, then call [`decide_after_hold`].
    Hold(SandboxId),
    /// The sandbox is paused and the request may use it (its token checked against the marker
    /// whose hash it carries): hold it while the controller wakes it, up to `wake.timeout`, then
    /// call [`decide_after_wake`].
    Wake(SandboxId, TokenHash),
    /// Send the request to `route` (on `port`, or the route's default port).
    Forward(Forward),
}

/// The token hash a wake was checked against (`None`: the sandbox needs no token). The
/// controller refuses the wake unless it is the hash of the sandbox that has the ID.
pub type TokenHash = Option<[u8; 32]>;

/// What to do with a request after its miss hold: there is no second miss hold, but the
/// sandbox may have turned out to be paused (its route vanished before its marker arrived).
#[derive(Debug)]
pub enum AfterHold {
    Reply(ErrorReply),
    Wake(SandboxId, TokenHash),
    Forward(Forward),
}

/// What to do with a request after its wake hold: it is answered or forwarded now.
#[derive(Debug)]
pub enum FinalDecision {
    Reply(ErrorReply),
    Forward(Forward),
}

/// A local error reply: the code, and the sandbox it is about when the key was valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ReplyCode,
    pub id: Option<SandboxId>,
    /// `Retry-After` seconds, set for the codes that [`ReplyCode::retries`].
    pub retry_after_secs: Option<u32>,
}

impl ErrorReply {
    /// A reply about a request whose key was not usable (no sandbox to name).
    pub fn new(code: ReplyCode) -> Self {
        ErrorReply {
            code,
            id: None,
            retry_after_secs: None,
        }
    }

    /// A reply about sandbox `id`, with `Retry-After` when the code retries.
    pub fn about(code: ReplyCode, id: SandboxId, cfg: &GatewayConfig) -> Self {
        ErrorReply {
            code,
            id: Some(id),
            retry_after_secs: code.retries().then_some(cfg.retry_after_secs),
        }
    }

    pub fn status(&self) -> u32 {
        self.code.status()
    }

    /// What a gRPC client reads as `grpc-message`: `<code>: <message>`, and the sandbox.
    pub fn grpc_message(&self) -> String {
        match &self.id {
            Some(id) => format!(
                "{}: {} (sandbox {id})",
                self.code.code(),
                self.code.message()
            ),
            None => format!("{}: {}", self.code.code(), self.code.message()),
        }
    }

    /// The reply body: `{"error": "<code>", "message": "...", "sandbox_id": "..."}`.
    pub fn body(&self) -> String {
        let mut v = serde_json::json!({"error": self.code.code(), "message": self.code.message()});
        if let Some(id) = &self.id {
            v["sandbox_id"] = id.as_str().into();
        }
        v.to_string()
    }
}

/// Takes one of the routed sandbox's stream slots (held for the stream's life), or the 429
/// `sandbox_busy` reply when `max_streams_per_sandbox` of them are open. Separate from
/// [`decide`], which changes nothing.
pub fn open_stream(cfg: &GatewayConfig, f: &Forward) -> Result<StreamSlot, ErrorReply> {
    f.route
        .activity
        .try_open(cfg.max_streams_per_sandbox)
        .ok_or_else(|| {
            // Table keys are validated IDs, so this always fits.
            let id = SandboxId::from(f.route.spec.id.as_str()).unwrap_or_default();
            ErrorReply::about(ReplyCode::SandboxBusy, id, cfg)
        })
}

/// The readiness probe's answer once the routes are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Routes in the table (known sandboxes, ready or not).
    pub routes: u64,
}

impl Ready {
    pub const STATUS: u32 = 200;

    /// `{"ready": true, "routes": N}`.
    pub fn body(&self) -> String {
        serde_json::json!({"ready": true, "routes": self.routes}).to_string()
    }
}

/// A routed request and the changes to make to it before it goes upstream.
#[derive(Debug)]
pub struct Forward {
    pub route: Arc<Route>,
    pub port: Option<u16>,
    /// New `:path` (path-prefix keys in strip mode: the prefix removed).
    pub new_path: Option<Vec<u8>>,
    /// [`FORWARDED_PREFIX_HEADER`]: the removed prefix, or a client's value removed.
    pub forwarded_prefix: HeaderChange,
    /// `upstream_host: "localhost"`: the Host the upstream gets instead of the client's.
    pub host: Option<HostRewrite>,
    /// The client sent [`ORIGINAL_DST_HEADER`]: remove it.
    pub strip_original_dst: bool,
    /// The client sent the access-token header: remove it (a sandbox never sees a token).
    pub strip_token: bool,
}

/// What to do with one request header before forwarding. `Set` replaces every value the client
/// sent; `Unchanged` means the client sent none and there is nothing to set, so the hot path
/// makes no call for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderChange {
    Unchanged,
    Remove,
    Set(Vec<u8>),
}

/// The upstream's Host and what becomes of the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRewrite {
    /// The new `:authority` (HTTP/1 `Host`): `localhost:<port>`.
    pub authority: AuthorityBuf,
    /// [`FORWARDED_HOST_HEADER`]: the client's authority (or a client's value removed when the
    /// request had none).
    pub forwarded_host: HeaderChange,
}

/// The first look at a request: a miss is held when `miss_hold` is not zero.
pub fn decide<R: RequestView + ?Sized>(cfg: &GatewayConfig, table: &RouteTable, h: &R) -> Decision {
    match resolve(cfg, table, h) {
        Ok(found) => match paused_route(table, &found) {
            Some(p) => wake_or_refuse(cfg, h, found.id, &p).into(),
            None => admit(cfg, h, found).into(),
        },
        Err(Early::Reply(r)) if r.code == ReplyCode::MissingSandboxId && is_ready_probe(h) => {
            readiness(cfg, table)
        }
        Err(Early::Reply(r)) => Decision::Reply(r),
        Err(Early::Miss(id)) => match table.paused(&id) {
            Some(p) => wake_or_refuse(cfg, h, id, &p).into(),
            None if !cfg.miss_hold.is_zero() => Decision::Hold(id),
            None => Decision::Reply(miss(cfg, table, id)),
        },
    }
}

impl From<FinalDecision> for Decision {
    fn from(d: FinalDecision) -> Self {
        match d {
            FinalDecision::Reply(r) => Decision::Reply(r),
            FinalDecision::Forward(f) => Decision::Forward(f),
        }
    }
}

impl From<AfterHold> for Decision {
    fn from(d: AfterHold) -> Self {
        match d {
            AfterHold::Reply(r) => Decision::Reply(r),
            AfterHold::Wake(id, hash) => Decision::Wake(id, hash),
            AfterHold::Forward(f) => Decision::Forward(f),
        }
    }
}

impl From<FinalDecision> for AfterHold {
    fn from(d: FinalDecision) -> Self {
        match d {
            FinalDecision::Reply(r) => AfterHold::Reply(r),
            FinalDecision::Forward(f) => AfterHold::Forward(f),
        }
    }
}

/// A route that is not Ready while its sandbox is paused (a resume under way): the request is
/// a wake, not a `sandbox_not_ready`.
fn paused_route(table: &RouteTable, found: &Found<'_>) -> Option<Arc<[Paused]>> {
    if found.route.spec.ready {
        return None;
    }
    table.paused(&found.id)
}

/// A request for a paused sandbox: its token is checked exactly as its route would check it
/// (nobody wakes a sandbox they could not have used), then a wake, or `409 sandbox_paused` when
/// its owner paused it. With several markers for the ID (another object forged it), the token
/// picks the marker it opens, so a forged marker cannot lock the real owner out.
fn wake_or_refuse<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    h: &R,
    id: SandboxId,
    marks: &[Paused],
) -> AfterHold {
    let mut refused = None;
    // Markers that need a token first: one that needs none must not win over the owner's.
    let with_token = marks.iter().filter(|p| p.token_sha256.is_some());
    for p in with_token.chain(marks.iter().filter(|p| p.token_sha256.is_none())) {
        match token_refusal(cfg, h, p.token_sha256.as_ref()) {
            None if !p.wakeable => {
                return AfterHold::Reply(ErrorReply::about(ReplyCode::SandboxPaused, id, cfg))
            }
            None => return AfterHold::Wake(id, p.token_sha256),
            Some(code) => refused = refused.or(Some(code)),
        }
    }
    let code = refused.unwrap_or(ReplyCode::InvalidAccessToken);
    AfterHold::Reply(ErrorReply::about(code, id, cfg))
}

/// Why the request's token does not open a sandbox whose token hashes to `expected` (`None`:
/// it needs none). A token sent twice is never valid, whichever copy is right.
fn token_refusal<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    h: &R,
    expected: Option<&[u8; 32]>,
) -> Option<ReplyCode> {
    let expected = expected?;
    match h.header(&cfg.access_token_header) {
        Ok(Some(t)) if token_matches(t, expected) => None,
        Ok(None) => Some(ReplyCode::MissingAccessToken),
        _ => Some(ReplyCode::InvalidAccessToken),
    }
}

/// `GET`/`HEAD` [`READY_PATH`], with or without a query.
fn is_ready_probe<R: RequestView + ?Sized>(h: &R) -> bool {
    let method = matches!(h.header(":method"), Ok(Some(b"GET" | b"HEAD")));
    let path = h.path().and_then(|p| p.strip_prefix(READY_PATH.as_bytes()));
    method && matches!(path, Some([] | [b'?', ..]))
}

/// Ready once the route source has loaded its first full view: before that a replica can only
/// answer `routes_not_synced`, so it must not get traffic.
fn readiness(cfg: &GatewayConfig, table: &RouteTable) -> Decision {
    if table.is_synced() {
        Decision::Ready(Ready {
            routes: table.len(),
        })
    } else {
        Decision::Reply(ErrorReply {
            retry_after_secs: Some(cfg.retry_after_secs),
            ..ErrorReply::new(ReplyCode::RoutesNotSynced)
        })
    }
}

/// The second look, once a hold has ended (the route arrived, the hold expired, or no hold could
/// be started): there is no second hold. Only ever asked about a request `decide` held, which
/// named a sandbox, so it never meets a readiness probe.
pub fn decide_after_hold<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    table: &RouteTable,
    h: &R,
) -> AfterHold {
    match resolve(cfg, table, h) {
        Ok(found) => match paused_route(table, &found) {
            Some(p) => wake_or_refuse(cfg, h, found.id, &p),
            None => admit(cfg, h, found).into(),
        },
        Err(Early::Reply(r)) => AfterHold::Reply(r),
        Err(Early::Miss(id)) => match table.paused(&id) {
            Some(p) => wake_or_refuse(cfg, h, id, &p),
            None => AfterHold::Reply(miss(cfg, table, id)),
        },
    }
}

/// The last look, once a wake hold has ended (the route is Ready, the marker went, or the bound
/// passed): still paused is `503 sandbox_waking` (the wake goes on; retry), a sandbox that is
/// neither routed nor paused any more is a miss (404 once the routes are synced).
pub fn decide_after_wake<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    table: &RouteTable,
    h: &R,
) -> FinalDecision {
    match resolve(cfg, table, h) {
        Ok(found) if paused_route(table, &found).is_some() => {
            FinalDecision::Reply(ErrorReply::about(ReplyCode::SandboxWaking, found.id, cfg))
        }
        Ok(found) => admit(cfg, h, found),
        Err(Early::Reply(r)) => FinalDecision::Reply(r),
        Err(Early::Miss(id)) if table.paused(&id).is_some() => {
            FinalDecision::Reply(ErrorReply::about(ReplyCode::SandboxWaking, id, cfg))
        }
        Err(Early::Miss(id)) => FinalDecision::Reply(miss(cfg, table, id)),
    }
}

/// A request whose key resolved to a route.
struct Found<'h> {
    key: SandboxKey<'h>,
    id: SandboxId,
    route: Arc<Route>,
}

enum Early {
    Reply(ErrorReply),
    Miss(SandboxId),
}

fn resolve<'h, R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    table: &RouteTable,
    h: &'h R,
) -> Result<Found<'h>, Early> {
    let key = extract(&cfg.keys, h).map_err(|e| Early::Reply(ErrorReply::new(e.into())))?;
    let mut id = SandboxId::new();
    if id.try_push_str(key.id).is_err() {
        return Err(Early::Reply(ErrorReply::new(ReplyCode::InvalidSandboxId)));
    }
    match table.get(&id) {
        Some(route) => Ok(Found { key, id, route }),
        None => Err(Early::Miss(id)),
    }
}

/// The answer to a miss that is not (or no longer) held.
fn miss(cfg: &GatewayConfig, table: &RouteTable, id: SandboxId) -> ErrorReply {
    // Before the first full view a miss proves nothing: ask the client to retry.
    let code = if table.is_synced() {
        ReplyCode::SandboxNotFound
    } else {
        ReplyCode::RoutesNotSynced
    };
    ErrorReply::about(code, id, cfg)
}

/// Readiness and the access token, then the changes to forward with.
fn admit<R: RequestView + ?Sized>(cfg: &GatewayConfig, h: &R, found: Found<'_>) -> FinalDecision {
    let Found { key, id, route } = found;
    if !route.spec.ready {
        return FinalDecision::Reply(ErrorReply::about(ReplyCode::SandboxNotReady, id, cfg));
    }
    if let Some(code) = token_refusal(cfg, h, route.spec.token_sha256.as_ref()) {
        return FinalDecision::Reply(ErrorReply::about(code, id, cfg));
    }
    let token = h.header(&cfg.access_token_header);
    let (new_path, forwarded_prefix) = match key.rewritten_path {
        Some(rw) if cfg.path_prefix_mode == PathPrefixMode::Strip => {
            (Some(rw.to_path()), HeaderChange::Set(rw.prefix.to_vec()))
        }
        // Keep mode, or not a path key: the upstream must not believe a client's prefix.
        _ => (None, remove_if_sent(h, FORWARDED_PREFIX_HEADER)),
    };
    let host = match cfg.upstream_host {
        UpstreamHost::Keep => None,
        UpstreamHost::Localhost => Some(HostRewrite {
            authority: localhost(key.port.unwrap_or(route.spec.port)),
            forwarded_host: match h.authority() {
                Some(a) if !a.is_empty() => HeaderChange::Set(a.to_vec()),
                // Nothing to forward (no or an empty Host): a client's value must not pass.
                _ => remove_if_sent(h, FORWARDED_HOST_HEADER),
            },
        }),
    };
    FinalDecision::Forward(Forward {
        port: key.port,
        new_path,
        forwarded_prefix,
        host,
        strip_original_dst: !matches!(h.header(ORIGINAL_DST_HEADER), Ok(None)),
        strip_token: !matches!(token, Ok(None)),
        route,
    })
}

/// `Remove` when the client sent `name` (once or more), else `Unchanged`.
fn remove_if_sent<R: RequestView + ?Sized>(h: &R, name: &str) -> HeaderChange {
    if matches!(h.header(name), Ok(None)) {
        HeaderChange::Unchanged
    } else {
        HeaderChange::Remove
    }
}

fn localhost(port: u16) -> AuthorityBuf {
    use std::fmt::Write;
    let mut a = AuthorityBuf::new();
    // Cannot fail: "localhost:65535" is 15 bytes, the buffer's size.
    let _ = write!(a, "localhost:{port}");
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyError;
    use crate::table::RouteSpec;
    use std::collections::HashMap;

    struct Req(HashMap<&'static str, Vec<&'static str>>);

    impl RequestView for Req {
        fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
            match self.0.get(name).map(Vec::as_slice) {
                None | Some([]) => Ok(None),
                Some([v]) => Ok(Some(v.as_bytes())),
                Some(_) => Err(KeyError::DuplicateHeader),
            }
        }
        fn authority(&self) -> Option<&[u8]> {
            self.header(":authority").ok().flatten()
        }
        fn path(&self) -> Option<&[u8]> {
            self.header(":path").ok().flatten()
        }
    }

    fn req(h: &[(&'static str, &'static str)]) -> Req {
        let mut m: HashMap<_, Vec<_>> = HashMap::new();
        for (k, v) in h {
            m.entry(*k).or_default().push(*v);
        }
        Req(m)
    }

    fn setup() -> (GatewayConfig, RouteTable) {
        setup_with(serde_json::json!({}))
    }

    /// The test table, with config fields `extra` merged over the base config.
    fn setup_with(extra: serde_json::Value) -> (GatewayConfig, RouteTable) {
        let mut json = serde_json::json!(
            {"route_source": {"type": "file", "path": "/r"}, "retry_after_s": 5});
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        let cfg = GatewayConfig::from_json(json.to_string().as_bytes()).unwrap();
        let t = RouteTable::new();
        let spec = |id: &str, ready, tok: Option<[u8; 32]>| RouteSpec {
            id: id.into(),
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
            ready,
            token_sha256: tok,
            pod_uid: None,
            resource_version: 0,
        };
        t.upsert(spec("a", true, None));
        t.upsert(spec("z", false, None));
        let hash = crate::token::parse_sha256_hex(
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
        );
        t.upsert(spec("t", true, hash));
        (cfg, t)
    }

    fn reply(d: Decision) -> ErrorReply {
        match d {
            Decision::Reply(r) => r,
            other => panic!("want a reply, got {other:?}"),
        }
    }

    fn final_reply(d: FinalDecision) -> ErrorReply {
        match d {
            FinalDecision::Reply(r) => r,
            other => panic!("want a reply, got {other:?}"),
        }
    }

    fn after_reply(d: AfterHold) -> ErrorReply {
        match d {
            AfterHold::Reply(r) => r,
            other => panic!("want a reply, got {other:?}"),
        }
    }

    fn forward(d: Decision) -> Forward {
        match d {
            Decision::Forward(f) => f,
            other => panic!("want a forward, got {other:?}"),
        }
    }

    #[test]
    fn outcomes() {
        use ReplyCode::*;
        let (cfg, t) = setup();
        let r = reply(decide(&cfg, &t, &req(&[])));
        assert_eq!((r.status(), r.code), (400, MissingSandboxId));
        assert_eq!(r.id, None);
        let nope = req(&[("x-sandbox-id", "nope")]);
        assert!(matches!(decide(&cfg, &t, &nope), Decision::Hold(_)));
        let r = after_reply(decide_after_hold(&cfg, &t, &nope));
        assert_eq!((r.status(), r.code), (503, RoutesNotSynced));
        assert_eq!(r.retry_after_secs, Some(5));
        t.mark_synced();
        let r = after_reply(decide_after_hold(&cfg, &t, &nope));
        assert_eq!(
            (r.status(), r.code, r.retry_after_secs),
            (404, SandboxNotFound, None)
        );
        assert_eq!(r.id.as_deref(), Some("nope"));
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "z")])));
        assert_eq!((r.status(), r.code), (503, SandboxNotReady));
        assert_eq!(r.retry_after_secs, Some(5));
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "t")])));
        assert_eq!(r.code, MissingAccessToken);
        let twice = [
            ("x-sandbox-id", "t"),
            ("x-access-token", "secret"),
            ("x-access-token", "secret"),
        ];
        assert_eq!(
            reply(decide(&cfg, &t, &req(&twice))).code,
            InvalidAccessToken
        );
        let ok = [("x-sandbox-id", "t"), ("x-access-token", "secret")];
        let f = forward(decide(&cfg, &t, &req(&ok)));
        assert!(f.strip_token && !f.strip_original_dst);
        assert_eq!(f.route.spec.id, "t");
        // The second look forwards the same way once the route is there.
        assert!(matches!(
            decide_after_hold(&cfg, &t, &req(&ok)),
            AfterHold::Forward(_)
        ));
        let dst = [("x-sandbox-id", "a"), (ORIGINAL_DST_HEADER, "1.2.3.4:5")];
        let f = forward(decide(&cfg, &t, &req(&dst)));
        assert!(f.strip_original_dst && !f.strip_token);
    }

    fn prefixed(extra: serde_json::Value) -> (GatewayConfig, RouteTable) {
        let mut json =
            serde_json::json!({"path_prefix": "/sandboxes", "host_domains": ["sb.test"]});
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        setup_with(json)
    }

    #[test]
    fn strip_mode_forwards_the_rest_and_names_the_prefix() {
        let (cfg, t) = prefixed(serde_json::json!({}));
        let f = forward(decide(
            &cfg,
            &t,
            &req(&[(":path", "/sandboxes/a/8080/x/y?q=1")]),
        ));
        assert_eq!(f.new_path.as_deref(), Some(&b"/x/y?q=1"[..]));
        assert_eq!(
            f.forwarded_prefix,
            HeaderChange::Set(b"/sandboxes/a/8080".to_vec())
        );
        assert_eq!(f.host, None, "the Host is kept by default");
        // A client's own x-forwarded-prefix is replaced by ours...
        let spoof = [
            (":path", "/sandboxes/a/8080/"),
            (FORWARDED_PREFIX_HEADER, "/evil"),
        ];
        let f = forward(decide(&cfg, &t, &req(&spoof)));
        assert_eq!(
            f.forwarded_prefix,
            HeaderChange::Set(b"/sandboxes/a/8080".to_vec())
        );
        // ...and removed from requests routed any other way, however many copies were sent.
        let spoof = [
            ("x-sandbox-id", "a"),
            (FORWARDED_PREFIX_HEADER, "/evil"),
            (FORWARDED_PREFIX_HEADER, "/evil2"),
        ];
        let f = forward(decide(&cfg, &t, &req(&spoof)));
        assert_eq!(
            (f.new_path, f.forwarded_prefix),
            (None, HeaderChange::Remove)
        );
        // Nothing sent, nothing to do: no header call on the common path.
        let f = forward(decide(&cfg, &t, &req(&[("x-sandbox-id", "a")])));
        assert_eq!(f.forwarded_prefix, HeaderChange::Unchanged);
    }

    #[test]
    fn keep_mode_forwards_the_path_as_received() {
        let (cfg, t) = prefixed(serde_json::json!({"path_prefix_mode": "keep"}));
        let f = forward(decide(
            &cfg,
            &t,
            &req(&[(":path", "/sandboxes/a/8080/x?q")]),
        ));
        assert_eq!(f.port, Some(8080));
        assert_eq!(
            (f.new_path, f.forwarded_prefix),
            (None, HeaderChange::Unchanged)
        );
        let spoof = [
            (":path", "/sandboxes/a/8080/x"),
            (FORWARDED_PREFIX_HEADER, "/evil"),
        ];
        let f = forward(decide(&cfg, &t, &req(&spoof)));
        assert_eq!(f.forwarded_prefix, HeaderChange::Remove);
    }

    #[test]
    fn localhost_host_uses_the_routed_port_and_forwards_the_clients() {
        let (cfg, t) = prefixed(serde_json::json!({"upstream_host": "localhost"}));
        let host = |h: &[(&'static str, &'static str)]| {
            forward(decide(&cfg, &t, &req(h)))
                .host
                .expect("host rewritten")
        };
        // Host key with a port: that port.
        let h = host(&[
            (":authority", "3000-a.sb.test"),
            (FORWARDED_HOST_HEADER, "evil"),
        ]);
        assert_eq!(h.authority.as_str(), "localhost:3000");
        assert_eq!(
            h.forwarded_host,
            HeaderChange::Set(b"3000-a.sb.test".to_vec())
        );
        // No port in the key: the route's own (80 in the test table).
        let h = host(&[(":authority", "gw.example:8443"), ("x-sandbox-id", "a")]);
        assert_eq!(h.authority.as_str(), "localhost:80");
        assert_eq!(
            h.forwarded_host,
            HeaderChange::Set(b"gw.example:8443".to_vec())
        );
        let h = host(&[(":path", "/sandboxes/a/65535/")]);
        assert_eq!(h.authority.as_str(), "localhost:65535");
        assert_eq!(h.forwarded_host, HeaderChange::Unchanged);
        // No authority to forward: a client's x-forwarded-host must not pass as ours.
        let h = host(&[("x-sandbox-id", "a"), (FORWARDED_HOST_HEADER, "evil")]);
        assert_eq!(h.forwarded_host, HeaderChange::Remove);
    }

    #[test]
    fn the_ready_path_is_answered_only_where_no_sandbox_is_named() {
        let (_, t) = setup();
        let cfg = GatewayConfig::from_json(
            br#"{"route_source": {"type": "file", "path": "/r"}, "retry_after_s": 5,
                 "host_domains": ["sb.test"], "path_prefix": "/sandboxes"}"#,
        )
        .unwrap();
        let probe = |method: &'static str, path: &'static str| {
            req(&[
                (":method", method),
                (":path", path),
                (":authority", "10.0.0.9:8080"),
            ])
        };
        // Not synced: not ready, and says why (no sandbox named, so no sandbox_id).
        let r = reply(decide(&cfg, &t, &probe("GET", READY_PATH)));
        assert_eq!((r.status(), r.code), (503, ReplyCode::RoutesNotSynced));
        assert_eq!((r.id, r.retry_after_secs), (None, Some(5)));
        t.mark_synced();
        let ready = |d: Decision| match d {
            Decision::Ready(r) => r,
            other => panic!("want ready, got {other:?}"),
        };
        let r = ready(decide(&cfg, &t, &probe("GET", READY_PATH)));
        assert_eq!(r, Ready { routes: 3 });
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v, serde_json::json!({"ready": true, "routes": 3}));
        ready(decide(&cfg, &t, &probe("HEAD", READY_PATH)));
        ready(decide(
            &cfg,
            &t,
            &probe("GET", "/.well-known/sandbox-gateway/ready?probe=kubelet"),
        ));
        // Anything else that names no sandbox is still a 400.
        for (method, path) in [
            ("POST", READY_PATH),
            ("GET", "/.well-known/sandbox-gateway/ready/"),
            ("GET", "/.well-known/sandbox-gateway/readyz"),
            ("GET", "/.well-known/sandbox-gateway"),
        ] {
            let r = reply(decide(&cfg, &t, &probe(method, path)));
            assert_eq!(r.code, ReplyCode::MissingSandboxId, "{method} {path}");
        }
        // A request that names a sandbox goes to it, whatever its path: the probe never
        // takes a sandbox's own path.
        let by_header = [
            (":method", "GET"),
            (":path", READY_PATH),
            ("x-sandbox-id", "a"),
        ];
        let f = forward(decide(&cfg, &t, &req(&by_header)));
        assert_eq!((f.route.spec.id.as_str(), f.new_path), ("a", None));
        let by_host = [
            (":method", "GET"),
            (":path", READY_PATH),
            (":authority", "a.sb.test"),
        ];
        assert_eq!(forward(decide(&cfg, &t, &req(&by_host))).route.spec.id, "a");
        let bad_host = [
            (":method", "GET"),
            (":path", READY_PATH),
            (":authority", "A.sb.test"),
        ];
        let r = reply(decide(&cfg, &t, &req(&bad_host)));
        assert_eq!(r.code, ReplyCode::InvalidSandboxId);
        // A path prefix that covers the ready path owns it: that path is a (bad) sandbox key.
        let covering = GatewayConfig::from_json(
            br#"{"route_source": {"type": "file", "path": "/r"}, "path_prefix": "/.well-known"}"#,
        )
        .unwrap();
        let r = reply(decide(&covering, &t, &probe("GET", READY_PATH)));
        assert_eq!(r.code, ReplyCode::InvalidSandboxPort);
    }

    /// A paused sandbox: its token is checked before any wake; an owner's pause is a 409; a
    /// route that is not Ready while paused is a wake too; after the wake hold, still paused is
    /// `sandbox_waking`, gone is a miss.
    #[test]
    fn paused_sandboxes_wake_only_with_their_token() {
        use ReplyCode::*;
        let (cfg, t) = setup();
        t.mark_synced();
        let hash = crate::token::parse_sha256_hex(
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
        );
        let paused = |wakeable| Paused {
            token_sha256: hash,
            wakeable,
        };
        t.set_paused("zz", vec![paused(true)]);
        let with = [("x-sandbox-id", "zz"), ("x-access-token", "secret")];
        let without = [("x-sandbox-id", "zz")];
        let wrong = [("x-sandbox-id", "zz"), ("x-access-token", "nope")];
        assert!(matches!(
            decide(&cfg, &t, &req(&with)),
            Decision::Wake(id, h) if id.as_str() == "zz" && h == hash
        ));
        assert_eq!(
            reply(decide(&cfg, &t, &req(&without))).code,
            MissingAccessToken
        );
        assert_eq!(
            reply(decide(&cfg, &t, &req(&wrong))).code,
            InvalidAccessToken
        );
        // A miss hold that ends on the marker becomes a wake, with the same token rule.
        assert!(matches!(
            decide_after_hold(&cfg, &t, &req(&with)),
            AfterHold::Wake(..)
        ));
        assert_eq!(
            after_reply(decide_after_hold(&cfg, &t, &req(&wrong))).code,
            InvalidAccessToken
        );
        // Still paused after the hold: waking, retry.
        let r = final_reply(decide_after_wake(&cfg, &t, &req(&with)));
        assert_eq!(
            (r.status(), r.code, r.retry_after_secs),
            (503, SandboxWaking, Some(5))
        );
        // Paused by its owner: 409, never a wake (but a bad token is still a 401 first).
        t.set_paused("zz", vec![paused(false)]);
        let r = reply(decide(&cfg, &t, &req(&with)));
        assert_eq!(
            (r.status(), r.code, r.retry_after_secs),
            (409, SandboxPaused, None)
        );
        assert_eq!(
            reply(decide(&cfg, &t, &req(&wrong))).code,
            InvalidAccessToken
        );
        // A resume under way (a route, not Ready yet) is still a wake; a Ready route forwards.
        t.set_paused("zz", vec![paused(true)]);
        let spec = |ready| RouteSpec {
            id: "zz".into(),
            ip: "10.0.0.7".parse().unwrap(),
            port: 80,
            ready,
            token_sha256: hash,
            pod_uid: None,
            resource_version: 0,
        };
        t.upsert(spec(false));
        assert!(matches!(decide(&cfg, &t, &req(&with)), Decision::Wake(..)));
        t.upsert(spec(true));
        assert!(matches!(
            decide(&cfg, &t, &req(&with)),
            Decision::Forward(_)
        ));
        assert!(matches!(
            decide_after_wake(&cfg, &t, &req(&with)),
            FinalDecision::Forward(_)
        ));
        // Neither routed nor paused (deleted meanwhile): a plain 404.
        t.remove("zz");
        t.clear_paused("zz");
        assert_eq!(
            final_reply(decide_after_wake(&cfg, &t, &req(&with))).code,
            SandboxNotFound
        );
        // A second marker for the ID (another object forging it) with another token: each
        // token opens its own marker, and the forged one cannot lock the owner out.
        let forged = Paused {
            token_sha256: Some([7u8; 32]),
            wakeable: true,
        };
        t.set_paused("zz", vec![forged, paused(true)]);
        assert!(matches!(decide(&cfg, &t, &req(&with)), Decision::Wake(_, h) if h == hash));
        assert_eq!(
            reply(decide(&cfg, &t, &req(&wrong))).code,
            InvalidAccessToken
        );
        assert_eq!(
            reply(decide(&cfg, &t, &req(&without))).code,
            MissingAccessToken
        );
        t.clear_paused("zz");
        // Unknown IDs never look paused.
        assert!(matches!(
            decide(&cfg, &t, &req(&[("x-sandbox-id", "other")])),
            Decision::Hold(_)
        ));
    }

    #[test]
    fn no_hold_when_the_hold_is_off() {
        let (mut cfg, t) = setup();
        cfg.miss_hold = std::time::Duration::ZERO;
        t.mark_synced();
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "nope")])));
        assert_eq!(r.code, ReplyCode::SandboxNotFound);
    }

    #[test]
    fn body_shape() {
        let mut id = SandboxId::new();
        id.push_str("x");
        let r = ErrorReply {
            code: ReplyCode::SandboxNotFound,
            id: Some(id),
            retry_after_secs: None,
        };
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "sandbox_not_found",
                "message": "no sandbox with this id is routable", "sandbox_id": "x"})
        );
        let v: serde_json::Value =
            serde_json::from_str(&ErrorReply::new(ReplyCode::DuplicateHeader).body()).unwrap();
        assert!(v.get("sandbox_id").is_none());
        assert_eq!(v["message"], KeyError::DuplicateHeader.to_string());
    }

    #[test]
    fn all_lists_every_code_once() {
        // Exhaustive: a new variant does not compile until it is placed in `ALL`.
        let index = |c: ReplyCode| match c {
            ReplyCode::MissingSandboxId => 0,
            ReplyCode::InvalidSandboxId => 1,
            ReplyCode::InvalidSandboxPort => 2,
            ReplyCode::DuplicateHeader => 3,
            ReplyCode::MissingAccessToken => 4,
            ReplyCode::InvalidAccessToken => 5,
            ReplyCode::SandboxNotFound => 6,
            ReplyCode::SandboxNotReady => 7,
            ReplyCode::RoutesNotSynced => 8,
            ReplyCode::SandboxBusy => 9,
            ReplyCode::SandboxWaking => 10,
            ReplyCode::TooManyWakes => 11,
            ReplyCode::SandboxPaused => 12,
            ReplyCode::RoutingFailed => 13,
            ReplyCode::InternalError => 14,
        };
        for (i, c) in ReplyCode::ALL.iter().enumerate() {
            assert_eq!(index(*c), i, "{c:?}");
        }
        let codes: std::collections::HashSet<_> = ReplyCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), ReplyCode::ALL.len());
    }

    /// The README's "Local replies" table lists exactly the codes the gateway can send, each with
    /// its status.
    #[test]
    fn readme_error_table_matches_the_reply_codes() {
        let readme = include_str!("../../README.md");
        let rows: std::collections::BTreeSet<(u32, String)> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let status = cells.get(1)?.parse().ok()?;
                let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((status, code.to_string()))
            })
            .collect();
        let codes: std::collections::BTreeSet<(u32, String)> = ReplyCode::ALL
            .iter()
            .map(|c| (c.status(), c.code().to_string()))
            .collect();
        assert_eq!(
            rows, codes,
            "README.md's error table and ReplyCode::ALL differ"
        );
    }
}
