//! The verbs on a resource URL: get, list/watch (in `listwatch`), create, replace, patch and
//! delete, on the object or its `status` / `scale` subresource; injected faults and the write
//! counters apply here. Nothing here may panic on a request.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::http::{api_error, error, full, parse_rv, Body, Query, Route};
use crate::listwatch::{self, FieldSelector, Filter};
use crate::patch::{self, PatchKind};
use crate::pods::LabelSelector;
use crate::registry::{ResId, ResourceType, ScalePaths};
use crate::store::{str_at, ApiError, DeleteOpts, Deleted, Part, State};
use crate::Shared;

/// A request on a resource URL.
pub(crate) struct Req {
    pub(crate) method: Method,
    pub(crate) route: Route,
    pub(crate) q: Query,
    pub(crate) content_type: String,
    pub(crate) body: Bytes,
}

#[derive(Clone, Copy)]
enum Verb {
    Create,
    Update,
    Patch,
    Delete,
}

pub(crate) fn handle(shared: &Arc<Shared>, req: Req) -> Response<Body> {
    let route = &req.route;
    let answer = match (&req.method, route.name.as_deref(), route.sub.as_deref()) {
        (&Method::GET, None, _) => return list_or_watch(shared, &req),
        (&Method::GET, Some(name), sub) => get(shared, route, name, sub),
        (&Method::POST, None, _) => create(shared, &req),
        (&Method::PUT, Some(name), sub) => replace(shared, &req, name, sub),
        (&Method::PATCH, Some(name), sub) => patch_object(shared, &req, name, sub),
        (&Method::DELETE, Some(name), None) => delete(shared, &req, name),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    };
    match answer {
        Ok((code, body)) => full(code, &body),
        Err(e) => api_error(shared, &e),
    }
}

type Answer = Result<(StatusCode, Value), ApiError>;

fn list_or_watch(shared: &Arc<Shared>, req: &Req) -> Response<Body> {
    let q = &req.q;
    let bad = |msg: &str| error(shared, StatusCode::BAD_REQUEST, "BadRequest", msg);
    let labels = match LabelSelector::parse(&q.label_selector) {
        Ok(s) => s,
        Err(msg) => return bad(&msg),
    };
    let fields = match FieldSelector::parse(&q.field_selector) {
        Ok(s) => s,
        Err(msg) => return bad(&msg),
    };
    let rv = match parse_rv(q.resource_version.as_deref()) {
        Ok(rv) => rv,
        Err(msg) => return bad(&msg),
    };
    let filter = Filter {
        res: req.route.res,
        ns: req.route.ns.clone(),
        labels,
        fields,
    };
    if q.watch {
        listwatch::watch(shared, q, rv, filter)
    } else {
        listwatch::list(shared, q, rv, &filter)
    }
}

fn get(shared: &Shared, route: &Route, name: &str, sub: Option<&str>) -> Answer {
    let st = shared.lock();
    let ns = st.ns_key(route.res, route.ns.as_deref());
    let rt = st.registry.get(route.res);
    let Some(obj) = st.object(route.res, &ns, name) else {
        return Err(ApiError::not_found(rt, name));
    };
    match (sub, &rt.scale) {
        (Some("scale"), Some(paths)) => Ok((StatusCode::OK, scale_of(paths, &obj.value))),
        _ => Ok((StatusCode::OK, obj.value.clone())),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Counts a write and answers an injected fault for it, if one is pending.
fn begin_write(st: &mut State, res: ResId, verb: Verb) -> Result<(), ApiError> {
    let w = st.writes(res);
    match verb {
        Verb::Create => w.creates += 1,
        Verb::Update => w.updates += 1,
        Verb::Patch => w.patches += 1,
        Verb::Delete => w.deletes += 1,
    }
    match st.take_fault(res) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn create(shared: &Shared, req: &Req) -> Answer {
    if req.route.sub.is_some() {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "create on a subresource",
        ));
    }
    let body = parse_body(&req.body)?;
    let mut st = shared.lock();
    begin_write(&mut st, req.route.res, Verb::Create)?;
    let stored = st.create(req.route.res, req.route.ns.as_deref(), body)?;
    Ok((StatusCode::CREATED, stored.value.clone()))
}

fn part(sub: Option<&str>) -> Part {
    match sub {
        Some("status") => Part::Status,
        _ => Part::Main,
    }
}

fn replace(shared: &Shared, req: &Req, name: &str, sub: Option<&str>) -> Answer {
    let body = parse_body(&req.body)?;
    let res = req.route.res;
    let mut st = shared.lock();
    begin_write(&mut st, res, Verb::Update)?;
    let ns = st.ns_key(res, req.route.ns.as_deref());
    if sub == Some("scale") {
        return write_scale(&mut st, res, &ns, name, &body);
    }
    let stored = st.update(res, &ns, name, part(sub), body)?;
    Ok((StatusCode::OK, stored.value.clone()))
}

fn patch_object(shared: &Shared, req: &Req, name: &str, sub: Option<&str>) -> Answer {
    let kind = PatchKind::from_content_type(&req.content_type)?;
    let res = req.route.res;
    let mut st = shared.lock();
    begin_write(&mut st, res, Verb::Patch)?;
    let ns = st.ns_key(res, req.route.ns.as_deref());
    let rt = st.registry.get(res).clone();
    let Some(current) = st.object(res, &ns, name).cloned() else {
        if kind == PatchKind::Apply && sub.is_none() {
            // Server-side apply creates what is missing.
            let mut obj = patch::apply(kind, &json!({}), &req.body)?;
            obj["metadata"]["name"] = json!(name);
            let stored = st.create(res, req.route.ns.as_deref(), obj)?;
            return Ok((StatusCode::CREATED, stored.value.clone()));
        }
        return Err(ApiError::not_found(&rt, name));
    };
    if sub == Some("scale") {
        let Some(paths) = &rt.scale else {
            return Err(ApiError::not_found(&rt, name));
        };
        let scale = patch::apply(kind, &scale_of(paths, &current.value), &req.body)?;
        return write_scale(&mut st, res, &ns, name, &scale);
    }
    let patched = patch::apply(kind, &current.value, &req.body)?;
    let stored = st.update(res, &ns, name, part(sub), patched)?;
    Ok((StatusCode::OK, stored.value.clone()))
}

fn delete(shared: &Shared, req: &Req, name: &str) -> Answer {
    let body = if req.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(&req.body)?
    };
    let policy = body["propagationPolicy"]
        .as_str()
        .or(req.q.propagation_policy.as_deref());
    let opts = DeleteOpts {
        uid: body["preconditions"]["uid"].as_str().map(str::to_string),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        orphan: policy == Some("Orphan") || body["orphanDependents"] == json!(true) || req.q.orphan,
    };
    let res = req.route.res;
    let mut st = shared.lock();
    begin_write(&mut st, res, Verb::Delete)?;
    let ns = st.ns_key(res, req.route.ns.as_deref());
    match st.delete(res, &ns, name, &opts)? {
        Deleted::Pending(obj) => Ok((StatusCode::OK, obj.value.clone())),
        Deleted::Gone(obj) => {
            let rt = st.registry.get(res);
            Ok((StatusCode::OK, success(rt, &obj)))
        }
    }
}

/// The `Status` a delete that removed the object answers with.
fn success(rt: &ResourceType, obj: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": str_at(obj, "name").unwrap_or(""),
            "group": rt.group,
            "kind": rt.plural,
            "uid": str_at(obj, "uid").unwrap_or(""),
        },
    })
}

/// `.spec.replicas` as a JSON pointer (`/spec/replicas`).
fn pointer(path: &str) -> String {
    path.trim_start_matches('.')
        .split('.')
        .fold(String::new(), |mut p, k| {
            p.push('/');
            p.push_str(k);
            p
        })
}

/// The `autoscaling/v1` Scale of an object.
fn scale_of(paths: &ScalePaths, obj: &Value) -> Value {
    let at = |path: &str| obj.pointer(&pointer(path)).cloned();
    let mut status = json!({"replicas": at(&paths.status_replicas).unwrap_or(json!(0))});
    if let Some(sel) = paths.label_selector.as_deref().and_then(at) {
        status["selector"] = sel;
    }
    let m = &obj["metadata"];
    let mut meta = json!({});
    for k in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = m.get(k) {
            meta[k] = v.clone();
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": meta,
        "spec": {"replicas": at(&paths.spec_replicas).unwrap_or(json!(0))},
        "status": status,
    })
}

/// Writes a Scale's `spec.replicas` into the object (its `metadata.resourceVersion`, if any,
/// a precondition); answers the new Scale.
fn write_scale(st: &mut State, res: ResId, ns: &str, name: &str, scale: &Value) -> Answer {
    let rt = st.registry.get(res).clone();
    let (Some(paths), Some(current)) = (&rt.scale, st.object(res, ns, name).cloned()) else {
        return Err(ApiError::not_found(&rt, name));
    };
    let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
        return Err(ApiError::invalid("Scale.spec.replicas: Required value"));
    };
    if replicas < 0 {
        return Err(ApiError::invalid(
            "Scale.spec.replicas: must be greater than or equal to 0",
        ));
    }
    let mut next = current.value.clone();
    let mut at = &mut next;
    for k in pointer(&paths.spec_replicas).split('/').skip(1) {
        if !at.is_object() {
            *at = json!({});
        }
        at = &mut at[k];
    }
    *at = json!(replicas);
    next["metadata"]["resourceVersion"] = match str_at(scale, "resourceVersion") {
        Some(rv) => json!(rv),
        None => Value::Null,
    };
    let stored = st.update(res, ns, name, Part::Main, next)?;
    Ok((StatusCode::OK, scale_of(paths, &stored.value)))
}
