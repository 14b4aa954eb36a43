//! The request-path decision (DESIGN.md "Request path rules"), shared by the Envoy module and
//! sandbox-extproc so both answer every request the same way: key → route → ready → token.
//!
//! Pure and read-only: it looks at one view of the request headers and the route table and says
//! what to do; the caller applies it with whatever its host offers (module ABI calls, ext_proc
//! header mutations and immediate responses).

use crate::config::GatewayConfig;
use crate::key::{extract, KeyError, RequestView, MAX_ID_LEN};
use crate::table::{Route, RouteTable};
use crate::token::token_matches;
use arrayvec::ArrayString;
use std::sync::Arc;

/// The header an ORIGINAL_DST cluster with `use_http_header: true` would obey. Ours does not, and
/// both modes drop it anyway so no later hop can be steered by a client-sent value.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

/// Message of the 404 reply (also used when a hold cannot be started).
pub const NOT_FOUND: &str = "no sandbox with this id is routable";

/// A validated sandbox ID, on the stack.
pub type SandboxId = ArrayString<MAX_ID_LEN>;

/// What to do with a request, decided before anything is changed.
#[derive(Debug)]
pub enum Decision {
    /// Answer locally with the JSON error body ([`error_body`]).
    Reply(ErrorReply),
    /// No route yet: wait up to `miss_hold` for it, then decide again with `after_hold = true`.
    Hold(SandboxId),
    /// Send the request to `route` (on `port`, or the route's default port).
    Forward(Forward),
}

/// A local error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u32,
    pub code: &'static str,
    pub message: String,
    pub id: Option<SandboxId>,
    pub retry_after_secs: Option<u32>,
}

impl ErrorReply {
    fn new(status: u32, code: &'static str, message: &str, id: SandboxId) -> Self {
        ErrorReply {
            status,
            code,
            message: message.into(),
            id: Some(id),
            retry_after_secs: None,
        }
    }

    /// The reply body: `{"error": "<code>", "message": "...", "sandbox_id": "..."}`.
    pub fn body(&self) -> String {
        error_body(self.code, &self.message, self.id.as_deref())
    }
}

/// The JSON body of every local reply, in both modes.
pub fn error_body(code: &str, message: &str, sandbox_id: Option<&str>) -> String {
    let mut v = serde_json::json!({"error": code, "message": message});
    if let Some(id) = sandbox_id {
        v["sandbox_id"] = id.into();
    }
    v.to_string()
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

fn key_error(e: KeyError) -> Decision {
    Decision::Reply(ErrorReply {
        status: 400,
        code: e.code(),
        message: e.to_string(),
        id: None,
        retry_after_secs: None,
    })
}

/// Decides what to do with a request. `after_hold` is true on the second look after a miss hold.
pub fn decide<R: RequestView + ?Sized>(
    cfg: &GatewayConfig,
    table: &RouteTable,
    h: &R,
    after_hold: bool,
) -> Decision {
    let key = match extract(&cfg.keys, h) {
        Ok(k) => k,
        Err(e) => return key_error(e),
    };
    let mut id = SandboxId::new();
    if id.try_push_str(key.id).is_err() {
        return key_error(KeyError::InvalidId);
    }
    let Some(route) = table.get(&id) else {
        if !after_hold && !cfg.miss_hold.is_zero() {
            return Decision::Hold(id);
        }
        if !table.is_synced() {
            // Before the first full view a miss proves nothing: ask the client to retry.
            return Decision::Reply(ErrorReply {
                retry_after_secs: Some(cfg.retry_after_secs),
                ..ErrorReply::new(
                    503,
                    "routes_not_synced",
                    "the gateway has not loaded its routes yet",
                    id,
                )
            });
        }
        return Decision::Reply(ErrorReply::new(404, "sandbox_not_found", NOT_FOUND, id));
    };
    if !route.spec.ready {
        return Decision::Reply(ErrorReply {
            retry_after_secs: Some(cfg.retry_after_secs),
            ..ErrorReply::new(503, "sandbox_not_ready", "the sandbox is not ready yet", id)
        });
    }
    // A token sent twice is `Err(DuplicateHeader)`: never valid, whichever copy is right.
    let token = h.header(&cfg.access_token_header);
    if let Some(expected) = &route.spec.token_sha256 {
        match token {
            Ok(Some(t)) if token_matches(t, expected) => {}
            Ok(None) => {
                return Decision::Reply(ErrorReply::new(
                    401,
                    "missing_access_token",
                    "this sandbox needs an access token",
                    id,
                ))
            }
            _ => {
                return Decision::Reply(ErrorReply::new(
                    401,
                    "invalid_access_token",
                    "the access token is not valid for this sandbox",
                    id,
                ))
            }
        }
    }
    Decision::Forward(Forward {
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

    #[test]
    fn outcomes() {
        let (cfg, t) = setup();
        let r = reply(decide(&cfg, &t, &req(&[]), false));
        assert_eq!((r.status, r.code), (400, "missing_sandbox_id"));
        assert!(matches!(
            decide(&cfg, &t, &req(&[("x-sandbox-id", "nope")]), false),
            Decision::Hold(_)
        ));
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "nope")]), true));
        assert_eq!((r.status, r.code), (503, "routes_not_synced"));
        t.mark_synced();
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "nope")]), true));
        assert_eq!((r.status, r.code), (404, "sandbox_not_found"));
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "z")]), false));
        assert_eq!((r.status, r.retry_after_secs), (503, Some(5)));
        let r = reply(decide(&cfg, &t, &req(&[("x-sandbox-id", "t")]), false));
        assert_eq!(r.code, "missing_access_token");
        let twice = [
            ("x-sandbox-id", "t"),
            ("x-access-token", "secret"),
            ("x-access-token", "secret"),
        ];
        assert_eq!(
            reply(decide(&cfg, &t, &req(&twice), false)).code,
            "invalid_access_token"
        );
        let ok = [("x-sandbox-id", "t"), ("x-access-token", "secret")];
        match decide(&cfg, &t, &req(&ok), false) {
            Decision::Forward(f) => {
                assert!(f.strip_token && !f.strip_original_dst);
                assert_eq!(f.route.spec.id, "t");
            }
            other => panic!("{other:?}"),
        }
        let dst = [("x-sandbox-id", "a"), (ORIGINAL_DST_HEADER, "1.2.3.4:5")];
        match decide(&cfg, &t, &req(&dst), false) {
            Decision::Forward(f) => assert!(f.strip_original_dst && !f.strip_token),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn body_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&error_body("c", "m \"q\"", Some("x"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "c", "message": "m \"q\"", "sandbox_id": "x"})
        );
        let v: serde_json::Value = serde_json::from_str(&error_body("c", "m", None)).unwrap();
        assert!(v.get("sandbox_id").is_none());
    }
}
