//! The request-path decision (docs/design.md#request-path-rules), shared by the Envoy module and
//! sandbox-extproc so both answer every request the same way: key → route → ready → token.
//!
//! Pure and read-only: it looks at one view of the request headers and the route table and says
//! what to do; the caller applies it with whatever its host offers (module ABI calls, ext_proc
//! header mutations and immediate responses).

use crate::config::GatewayConfig;
use crate::key::{extract, RequestView, SandboxKey, MAX_ID_LEN};
pub use crate::reply::ReplyCode;
use crate::table::{Route, RouteTable};
use crate::token::token_matches;
use arrayvec::ArrayString;
use std::sync::Arc;

/// The header an ORIGINAL_DST cluster with `use_http_header: true` would obey. Ours does not, and
/// both modes drop it anyway so no later hop can be steered by a client-sent value.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

/// A validated sandbox ID, on the stack.
pub type SandboxId = ArrayString<MAX_ID_LEN>;

/// What to do with a request, decided before anything is changed.
#[derive(Debug)]
pub enum Decision {
    /// Answer locally with the JSON error body ([`ErrorReply::body`]).
    Reply(ErrorReply),
    /// No route yet: wait up to `miss_hold` for it, then call [`decide_after_hold`].
    Hold(SandboxId),
    /// Send the request to `route` (on `port`, or the route's default port).
    Forward(Forward),
}

/// What to do with a request after its miss hold: there is no second hold.
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

    fn about(code: ReplyCode, id: SandboxId, cfg: &GatewayConfig) -> Self {
        ErrorReply {
            code,
            id: Some(id),
            retry_after_secs: code.retries().then_some(cfg.retry_after_secs),
        }
    }

    pub fn status(&self) -> u32 {
        self.code.status()
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

/// A routed request and the changes to make to it before it goes upstream.
#[derive(Debug)]
pub struct Forward {
    pub route: Arc<Route>,
    pub port: Option<u16>,
    /// New `:path` (path-prefix keys: the prefix removed).
    pub new_path: Option<Vec<u8>>,
    /// The client sent [`ORIGINAL_DST_HEADER`]: remove it.
    pub strip_original_dst: bool,
    /// The client sent the access-token header: remove it (a sandbox never sees a token).
    pub strip_token: bool,
}

/// The first look at a request: a miss is held when `miss_hold` is not zero.
pub fn decide<R: RequestView + ?Sized>(cfg: &GatewayConfig, table: &RouteTable, h: &R) -> Decision {
    match resolve(cfg, table, h) {
        Ok(found) => match admit(cfg, h, found) {
            FinalDecision::Reply(r) => Decision::Reply(r),
            FinalDecision::Forward(f) => Decision::Forward(f),
        },
        Err(Early::Reply(r)) => Decision::Reply(r),
        Err(Early::Miss(id)) if !cfg.miss_hold.is_zero() => Decision::Hold(id),
        Err(Early::Miss(id)) => Decision::Reply(miss(cfg, table, id)),
    }
}

/// The second look, once a hold has ended (the route arrived, the hold expired, or no hold could
/// be started): there is no second hold.
pub fn decide_after_hold<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    table: &RouteTable,
    h: &R,
) -> FinalDecision {
    match resolve(cfg, table, h) {
        Ok(found) => admit(cfg, h, found),
        Err(Early::Reply(r)) => FinalDecision::Reply(r),
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
    // A token sent twice is `Err(DuplicateHeader)`: never valid, whichever copy is right.
    let token = h.header(&cfg.access_token_header);
    if let Some(expected) = &route.spec.token_sha256 {
        let refused = match token {
            Ok(Some(t)) if token_matches(t, expected) => None,
            Ok(None) => Some(ReplyCode::MissingAccessToken),
            _ => Some(ReplyCode::InvalidAccessToken),
        };
        if let Some(code) = refused {
            return FinalDecision::Reply(ErrorReply::about(code, id, cfg));
        }
    }
    FinalDecision::Forward(Forward {
        port: key.port,
        new_path: key.rewritten_path.map(|p| p.to_path()),
        strip_original_dst: !matches!(h.header(ORIGINAL_DST_HEADER), Ok(None)),
        strip_token: !matches!(token, Ok(None)),
        route,
    })
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
            None
        }
        fn path(&self) -> Option<&[u8]> {
            None
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
        let cfg = GatewayConfig::from_json(
            br#"{"route_source": {"type": "file", "path": "/r"}, "retry_after_s": 5}"#,
        )
        .unwrap();
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
        let r = final_reply(decide_after_hold(&cfg, &t, &nope));
        assert_eq!((r.status(), r.code), (503, RoutesNotSynced));
        assert_eq!(r.retry_after_secs, Some(5));
        t.mark_synced();
        let r = final_reply(decide_after_hold(&cfg, &t, &nope));
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
            FinalDecision::Forward(_)
        ));
        let dst = [("x-sandbox-id", "a"), (ORIGINAL_DST_HEADER, "1.2.3.4:5")];
        let f = forward(decide(&cfg, &t, &req(&dst)));
        assert!(f.strip_original_dst && !f.strip_token);
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
            ReplyCode::RoutingFailed => 9,
            ReplyCode::InternalError => 10,
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
