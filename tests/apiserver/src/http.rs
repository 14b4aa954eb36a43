//! The HTTP side of the fake API server: connections, query parsing, error Statuses and
//! routing (discovery, `/version`, resource paths). The verbs are in `handlers` and
//! `listwatch`. Nothing here may panic on a request: every failure is an error Status or a
//! closed stream.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::registry::ResId;
use crate::store::ApiError;
use crate::{discovery, handlers, Shared};

pub(crate) type Body = BoxBody<Bytes, io::Error>;
pub(crate) type Chunk = Result<Frame<Bytes>, io::Error>;

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Transient accept errors (e.g. EMFILE): back off briefly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                // Shutdown (or the handle going away) drops the connection: the socket closes.
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

pub(crate) fn full(status: StatusCode, body: &Value) -> Response<Body> {
    bytes_response(status, Bytes::from(body.to_string()))
}

pub(crate) fn bytes_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(bytes).map_err(|e: Infallible| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A `metav1.Status` failure, as the API server returns it.
pub(crate) fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

pub(crate) fn error(
    shared: &Shared,
    code: StatusCode,
    reason: &str,
    message: &str,
) -> Response<Body> {
    shared.lock().counts.rejected += 1;
    full(code, &status_object(code.as_u16(), reason, message))
}

/// An [`ApiError`] as the Status the API server answers with.
pub(crate) fn api_error(shared: &Shared, e: &ApiError) -> Response<Body> {
    shared.lock().counts.rejected += 1;
    let mut status = status_object(e.code, e.reason, &e.message);
    if let Some(d) = &e.details {
        status["details"] = d.clone();
    }
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(code, &status)
}

fn not_found(shared: &Shared) -> Response<Body> {
    let msg = "the server could not find the requested resource";
    error(shared, StatusCode::NOT_FOUND, "NotFound", msg)
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| char::from(c).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default, Debug)]
pub(crate) struct Query {
    pub(crate) label_selector: String,
    pub(crate) field_selector: String,
    pub(crate) resource_version: Option<String>,
    pub(crate) rv_match: Option<String>,
    pub(crate) watch: bool,
    pub(crate) bookmarks: bool,
    pub(crate) timeout_seconds: Option<u64>,
    pub(crate) send_initial_events: bool,
    /// `limit`: at most this many items per list page (absent or 0: everything).
    pub(crate) limit: Option<u64>,
    /// `continue`: the token of the previous page.
    pub(crate) continue_token: Option<String>,
    /// `propagationPolicy` of a delete.
    pub(crate) propagation_policy: Option<String>,
    /// `orphanDependents=true` of a delete.
    pub(crate) orphan: bool,
}

pub(crate) fn parse_query(q: &str) -> Result<Query, String> {
    let mut out = Query::default();
    let truthy = |v: &str| v == "true" || v == "1";
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match percent_decode(k).as_str() {
            "labelSelector" => out.label_selector = v,
            "resourceVersion" => out.resource_version = Some(v),
            "resourceVersionMatch" => out.rv_match = Some(v),
            "watch" => out.watch = truthy(&v),
            "allowWatchBookmarks" => out.bookmarks = truthy(&v),
            "sendInitialEvents" => out.send_initial_events = truthy(&v),
            "timeoutSeconds" => {
                out.timeout_seconds = Some(
                    v.parse()
                        .map_err(|_| format!("invalid timeoutSeconds {v:?}"))?,
                );
            }
            "limit" => {
                out.limit = Some(v.parse().map_err(|_| format!("invalid limit {v:?}"))?);
            }
            "continue" => out.continue_token = Some(v).filter(|t| !t.is_empty()),
            "fieldSelector" => out.field_selector = v,
            "propagationPolicy" => out.propagation_policy = Some(v),
            "orphanDependents" => out.orphan = truthy(&v),
            // Accepted on writes and ignored: this fake has no dry runs, field managers or
            // schema validation, and deletes at once.
            "pretty" | "fieldManager" | "force" | "dryRun" | "fieldValidation"
            | "gracePeriodSeconds" => {}
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    Ok(out)
}

/// Parses an explicit resourceVersion; `None` for "unset" (absent, empty or "0").
pub(crate) fn parse_rv(rv: Option<&str>) -> Result<Option<u64>, String> {
    match rv {
        None | Some("") | Some("0") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid resource version {s:?}")),
    }
}

/// What a resource URL names.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) res: ResId,
    /// The namespace in the path, if any.
    pub(crate) ns: Option<String>,
    pub(crate) name: Option<String>,
    /// `status` or `scale`.
    pub(crate) sub: Option<String>,
}

/// Resolves `/api/v1/...` or `/apis/{group}/{version}/...` (`rest` is what follows the
/// version): `[namespaces/{ns}/]{plural}[/{name}[/{subresource}]]`.
fn route(shared: &Shared, group: &str, version: &str, rest: &[&str]) -> Option<Route> {
    let st = shared.lock();
    let find = |plural: &str| st.registry.by_path(group, version, plural);
    let namespaced = |plural: &str| find(plural).is_some_and(|r| st.registry.get(r).namespaced);
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, ..] if !ns.is_empty() && namespaced(plural) => {
            (Some(ns.to_string()), &rest[2..])
        }
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] if !name.is_empty() => (*plural, Some(*name), None),
        [plural, name, sub] if !name.is_empty() => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let res = find(plural)?;
    let rt = st.registry.get(res);
    let sub_ok = match sub {
        None => true,
        Some("status") => rt.status,
        Some("scale") => rt.scale.is_some(),
        Some(_) => false,
    };
    // A namespaced object is only addressed in its namespace (lists may span all of them);
    // a cluster-scoped resource has no namespace.
    if !sub_ok
        || (rt.namespaced && ns.is_none() && name.is_some())
        || (!rt.namespaced && ns.is_some())
    {
        return None;
    }
    Some(Route {
        res,
        ns,
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    })
}

/// Serves one request; writes (anything but GET) are logged with who sent them and the answer.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let write = req.method() != Method::GET;
    let record = write.then(|| {
        let bearer = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        (
            req.method().to_string(),
            req.uri().path().to_string(),
            bearer,
        )
    });
    let resp = serve(shared.clone(), req).await;
    if let (Some((method, path, bearer)), Ok(r)) = (record, &resp) {
        shared.lock().write_log.push(crate::WriteRecord {
            method,
            path,
            bearer,
            status: r.status().as_u16(),
        });
    }
    resp
}

async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    shared.lock().requests.push(if raw_query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{raw_query}")
    });
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = format!("reading the request body: {e}");
            return Ok(error(&shared, StatusCode::BAD_REQUEST, "BadRequest", &msg));
        }
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] if method == Method::GET => {
            return Ok(full(StatusCode::OK, &discovery::version()))
        }
        ["api"] | ["api", "v1"] | ["apis"] | ["apis", _] | ["apis", _, _]
            if method == Method::GET =>
        {
            let st = shared.lock();
            let answer = discovery::answer(&st.registry, &segments, shared.addr);
            drop(st);
            return Ok(match answer {
                Some(v) => full(StatusCode::OK, &v),
                None => not_found(&shared),
            });
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        // Including `/openapi/v2` and `/openapi/v3`: clients fall back to discovery.
        _ => return Ok(not_found(&shared)),
    };
    let Some(route) = route(&shared, group, version, rest) else {
        return Ok(not_found(&shared));
    };
    let q = match parse_query(&raw_query) {
        Ok(q) => q,
        Err(msg) => return Ok(error(&shared, StatusCode::BAD_REQUEST, "BadRequest", &msg)),
    };
    let req = handlers::Req {
        method,
        route,
        q,
        content_type,
        body,
    };
    Ok(handlers::handle(&shared, req))
}
