//! Realistic v1 Pod objects (as `serde_json::Value`) for the fake API server, plus the
//! label-selector subset the fake server evaluates.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::jiff::Timestamp;
use routing::contract::SANDBOX_ID_LABEL;
use serde_json::{json, Map, Value};

/// RFC 3339 "now" at second precision, like the API server writes timestamps.
pub fn now_rfc3339() -> String {
    Timestamp::from_second(Timestamp::now().as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// A fresh, unique UID shaped like the API server's (a v4 UUID).
pub fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// A realistic v1 Pod. `sandbox_id` sets the `sandboxgateway.io/sandbox-id` label; `ip` sets
/// `status.podIP`/`podIPs`; `ready` sets the `Ready` condition (and the container's readiness).
/// `metadata.resourceVersion` is filled in by [`super::FakeApiServer::apply`].
pub fn fake_pod(
    ns: &str,
    name: &str,
    sandbox_id: Option<&str>,
    ip: Option<&str>,
    ready: bool,
) -> Value {
    let now = now_rfc3339();
    let mut labels = Map::new();
    labels.insert("app.kubernetes.io/name".into(), json!("sandbox"));
    if let Some(id) = sandbox_id {
        labels.insert(SANDBOX_ID_LABEL.into(), json!(id));
    }
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": new_uid(),
            "creationTimestamp": now,
            "labels": labels,
            "annotations": {},
        },
        "spec": {
            "containers": [{
                "name": "sandbox",
                "image": "registry.example.com/sandbox:latest",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            }],
            "restartPolicy": "Always",
            "nodeName": "node-1",
            "serviceAccountName": "default",
        },
        "status": {
            "phase": "Running",
            "hostIP": "192.0.2.1",
            "startTime": now,
        },
    });
    set_pod_ip(&mut pod, ip);
    set_ready(&mut pod, ready);
    pod
}

/// A unique IPv4 address in 10.0.0.0/8 for the `i`-th of many pods (up to 2^24): the gateway
/// fences a pod IP claimed twice, so every routable pod needs its own.
pub fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// `n` Ready sandbox pods `{prefix}{i}` in `ns`, with sandbox ID `{prefix}{i}` and IP
/// [`pod_ip`]`(i)`, each a [`fake_pod`] in full: built from one template, so filling a server
/// with 100k of them (with [`super::FakeApiServer::apply_all`]) costs a clone and a few fields
/// per pod rather than building each from scratch.
pub fn ready_sandbox_pods<'a>(
    ns: &'a str,
    prefix: &'a str,
    n: usize,
) -> impl Iterator<Item = Value> + 'a {
    let template = fake_pod(ns, "template", Some("template"), Some("10.0.0.0"), true);
    (0..n).map(move |i| {
        let mut pod = template.clone();
        let name = format!("{prefix}{i}");
        set_label(&mut pod, SANDBOX_ID_LABEL, Some(&name));
        set_pod_ip(&mut pod, Some(&pod_ip(i)));
        let meta = child(&mut pod, "metadata");
        meta["uid"] = json!(new_uid());
        meta["name"] = json!(name);
        pod
    })
}

/// `v[key]` as an object, creating (or replacing a non-object) as needed.
fn child<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    if !v.is_object() {
        *v = json!({});
    }
    let entry = &mut v[key];
    if !entry.is_object() {
        *entry = json!({});
    }
    entry
}

fn set_meta_entry(pod: &mut Value, which: &str, key: &str, value: Option<&str>) {
    let map = child(child(pod, "metadata"), which);
    if let Value::Object(m) = map {
        match value {
            Some(v) => {
                m.insert(key.to_string(), json!(v));
            }
            None => {
                m.remove(key);
            }
        }
    }
}

/// Sets (`Some`) or removes (`None`) a label.
pub fn set_label(pod: &mut Value, key: &str, value: Option<&str>) {
    set_meta_entry(pod, "labels", key, value);
}

/// Sets (`Some`) or removes (`None`) an annotation.
pub fn set_annotation(pod: &mut Value, key: &str, value: Option<&str>) {
    set_meta_entry(pod, "annotations", key, value);
}

/// Marks the Pod as being deleted (graceful deletion in progress), as the API server does
/// when a delete with a grace period is accepted: `deletionTimestamp` + grace seconds.
pub fn set_deletion_timestamp(pod: &mut Value) {
    let meta = child(pod, "metadata");
    meta["deletionTimestamp"] = json!(now_rfc3339());
    meta["deletionGracePeriodSeconds"] = json!(30);
}

/// Sets or clears `status.podIP` / `status.podIPs`.
pub fn set_pod_ip(pod: &mut Value, ip: Option<&str>) {
    let status = child(pod, "status");
    if let Value::Object(m) = status {
        match ip {
            Some(ip) => {
                m.insert("podIP".into(), json!(ip));
                m.insert("podIPs".into(), json!([{ "ip": ip }]));
            }
            None => {
                m.remove("podIP");
                m.remove("podIPs");
            }
        }
    }
}

/// Sets the Pod's readiness: the `Ready` and `ContainersReady` conditions and the container
/// status, the way the kubelet reports them.
pub fn set_ready(pod: &mut Value, ready: bool) {
    let now = now_rfc3339();
    let flag = if ready { "True" } else { "False" };
    let status = child(pod, "status");
    let mut conditions = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": now}),
    ];
    for ty in ["ContainersReady", "Ready"] {
        let mut c = json!({"type": ty, "status": flag, "lastTransitionTime": now});
        if !ready {
            c["reason"] = json!("ContainersNotReady");
        }
        conditions.push(c);
    }
    status["conditions"] = Value::Array(conditions);
    status["containerStatuses"] = json!([{
        "name": "sandbox",
        "ready": ready,
        "started": ready,
        "restartCount": 0,
        "image": "registry.example.com/sandbox:latest",
        "imageID": "",
        "state": {"running": {"startedAt": now}},
    }]);
}

/// `metadata.labels` of an object as (key, value) lookups.
pub(crate) fn label<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get("labels")?.get(key)?.as_str()
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

/// A parsed label selector: a conjunction of `key`, `!key`, `key=value` (or `==`) and
/// `key!=value`. Set-based forms (`in`, `notin`) are rejected as unsupported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

impl LabelSelector {
    /// Parses the `labelSelector` query parameter (already percent-decoded).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.contains('(') {
            return Err(format!("unsupported set-based label selector: {s:?}"));
        }
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some(k) = term.strip_prefix('!') {
                Req::NotExists(valid_key(k.trim())?)
            } else if let Some((k, v)) = term.split_once("!=") {
                Req::NotEq(valid_key(k.trim())?, v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Req::Eq(valid_key(k.trim())?, v.trim().to_string())
            } else {
                Req::Exists(valid_key(term)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether an object's labels satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| match r {
            Req::Exists(k) => label(obj, k).is_some(),
            Req::NotExists(k) => label(obj, k).is_none(),
            Req::Eq(k, v) => label(obj, k) == Some(v.as_str()),
            Req::NotEq(k, v) => label(obj, k) != Some(v.as_str()),
        })
    }
}

fn valid_key(k: &str) -> Result<String, String> {
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && k.matches('/').count() <= 1;
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use routing::contract::PORT_ANNOTATION;

    #[test]
    fn selector_terms() {
        let p = fake_pod("ns", "p", Some("abc"), Some("10.0.0.1"), true);
        let yes = [
            "",
            SANDBOX_ID_LABEL,
            "sandboxgateway.io/sandbox-id=abc",
            "!other",
            "x!=y",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&p), "{s}");
        }
        let no = [
            "other",
            "sandboxgateway.io/sandbox-id==zzz",
            "!sandboxgateway.io/sandbox-id",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&p), "{s}");
        }
        let both =
            LabelSelector::parse("app.kubernetes.io/name=sandbox, sandboxgateway.io/sandbox-id")
                .unwrap();
        assert!(both.matches(&p));
        assert!(LabelSelector::parse("a in (b,c)").is_err());
        assert!(LabelSelector::parse("bad key").is_err());
    }

    #[test]
    fn pod_shape_round_trips_through_k8s_openapi() {
        let mut p = fake_pod("ns", "p", Some("abc"), Some("10.0.0.1"), false);
        set_annotation(&mut p, PORT_ANNOTATION, Some("9000"));
        set_deletion_timestamp(&mut p);
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(p).unwrap();
        assert_eq!(pod.metadata.uid.as_deref().map(str::len), Some(36));
        assert!(pod.metadata.deletion_timestamp.is_some());
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");
        assert_ne!(new_uid(), new_uid());
    }
}
