//! The Pod as the Kubernetes route source reads it: only the fields the route contract uses
//! (docs/design.md#kubernetes-route-contract), so the first list of a large cluster is not spent
//! building full `k8s_openapi` Pods (every container, volume, env var, managed field) only to
//! throw them away.
//!
//! Read: `metadata` name, namespace, uid, resourceVersion, creationTimestamp, deletionTimestamp,
//! labels, and the two contract annotations (every other annotation is skipped unparsed:
//! `kubectl.kubernetes.io/last-applied-configuration` alone can be kilobytes); `spec.hostNetwork`;
//! `status.podIP` and whether the `Ready` condition is `True`. serde skips everything else
//! without allocating. It implements `kube::Resource` as core/v1 Pod, so `kube`'s `Api` and
//! watcher list and watch `/api/v1/pods` with it, label selector on the server side as before.

use crate::contract::{self, PORT_ANNOTATION, TOKEN_SHA256_ANNOTATION};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::NamespaceResourceScope;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A Pod reduced to what decides its route. `metadata` is a `k8s_openapi` `ObjectMeta` (what
/// `kube::Resource` hands out) holding only the fields listed in the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutePod {
    pub metadata: ObjectMeta,
    /// `spec.hostNetwork`: the pod's IP is its node's.
    pub host_network: bool,
    /// `status.podIP`, unparsed (the route source parses it).
    pub pod_ip: Option<String>,
    /// `status.conditions` has `Ready` = `True`.
    pub ready: bool,
}

impl kube::Resource for RoutePod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The wire shape. Unknown fields are skipped by serde without being built.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: Option<WireMeta>,
    #[serde(default)]
    spec: Option<WireSpec>,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<Time>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "contract_annotations")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    #[serde(default)]
    host_network: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, deserialize_with = "ready_condition")]
    conditions: Option<bool>,
}

/// One condition; its strings are borrowed from the input when they can be (kube parses whole
/// response bodies, and watch lines, from memory). A missing field reads as empty (not `Ready`)
/// rather than failing the whole list page the pod is on.
#[derive(Deserialize)]
struct WireCondition<'a> {
    #[serde(rename = "type", borrow, default)]
    type_: Cow<'a, str>,
    #[serde(borrow, default)]
    status: Cow<'a, str>,
}

impl<'de> Deserialize<'de> for RoutePod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(d)?;
        let metadata = wire
            .metadata
            .map(|m| ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                labels: m.labels,
                annotations: m.annotations,
                ..ObjectMeta::default()
            })
            .unwrap_or_default();
        let (pod_ip, ready) = wire
            .status
            .map(|s| (s.pod_ip, s.conditions.unwrap_or(false)))
            .unwrap_or((None, false));
        Ok(RoutePod {
            metadata,
            host_network: wire.spec.and_then(|s| s.host_network).unwrap_or(false),
            pod_ip,
            ready,
        })
    }
}

/// `metadata.annotations`, keeping only the route contract's two.
fn contract_annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Keep;
    impl<'de> Visitor<'de> for Keep {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<AnnotationKey>()? {
                match key.0 {
                    Some(name) => {
                        kept.insert(name.to_string(), map.next_value::<String>()?);
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(kept))
        }
    }
    d.deserialize_option(Keep)
}

/// An annotation key: one of the contract's (compared without allocating), or any other.
struct AnnotationKey(Option<&'static str>);

impl<'de> Deserialize<'de> for AnnotationKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = AnnotationKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an annotation key")
            }
            fn visit_str<E>(self, k: &str) -> Result<AnnotationKey, E> {
                Ok(AnnotationKey(
                    [PORT_ANNOTATION, TOKEN_SHA256_ANNOTATION]
                        .into_iter()
                        .find(|c| *c == k),
                ))
            }
        }
        d.deserialize_str(Key)
    }
}

/// `status.conditions` as one fact: whether `Ready` is `True` (`contract::is_ready`).
fn ready_condition<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct Ready;
    impl<'de> Visitor<'de> for Ready {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of pod conditions")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut ready = false;
            while let Some(c) = seq.next_element::<WireCondition<'de>>()? {
                ready |= contract::is_ready([(&*c.type_, &*c.status)]);
            }
            Ok(Some(ready))
        }
    }
    d.deserialize_option(Ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full_pod() -> serde_json::Value {
        json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {
                "name": "sb-1", "namespace": "team", "uid": "uid-1", "resourceVersion": "42",
                "creationTimestamp": "2026-11-01T10:00:00Z",
                "labels": {"sandboxgateway.io/sandbox-id": "alpha", "app": "x"},
                "annotations": {
                    PORT_ANNOTATION: "3000",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": [1, 2, 3]}",
                    "other": "x"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u"}],
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {"hostNetwork": true, "containers": [{"name": "c", "image": "i",
                "env": [{"name": "A", "value": "B"}]}]},
            "status": {
                "phase": "Running", "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}],
                "conditions": [
                    {"type": "Initialized", "status": "True", "lastTransitionTime": null},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-01T10:00:01Z"}
                ],
                "containerStatuses": [{"name": "c", "ready": true, "state": {"running": {}}}]
            }
        })
    }

    #[test]
    fn reads_only_the_contract_fields() {
        let text = full_pod().to_string();
        // From bytes, as kube parses responses (strings borrowed where unescaped).
        let p: RoutePod = serde_json::from_slice(text.as_bytes()).unwrap();
        let m = &p.metadata;
        assert_eq!(m.name.as_deref(), Some("sb-1"));
        assert_eq!(m.namespace.as_deref(), Some("team"));
        assert_eq!(m.uid.as_deref(), Some("uid-1"));
        assert_eq!(m.resource_version.as_deref(), Some("42"));
        assert_eq!(
            m.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            Some(1_793_527_200)
        );
        assert_eq!(m.labels.as_ref().map(BTreeMap::len), Some(2));
        let annotations: Vec<_> = m.annotations.iter().flatten().collect();
        assert_eq!(
            annotations,
            [(&PORT_ANNOTATION.to_string(), &"3000".to_string())]
        );
        assert!(m.owner_references.is_none() && m.managed_fields.is_none());
        assert!(p.host_network && p.ready);
        assert_eq!(p.pod_ip.as_deref(), Some("10.1.2.3"));
        // Same result from a parsed tree (kube buffers a watch event whose "object" comes
        // before its "type"; owned strings then).
        let q: RoutePod = serde_json::from_value(full_pod()).unwrap();
        assert_eq!(p, q);
    }

    #[test]
    fn absent_and_null_fields_mean_not_routable_yet() {
        let p: RoutePod = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert!(!p.ready && !p.host_network && p.pod_ip.is_none());
        let p: RoutePod = serde_json::from_value(json!({
            "metadata": {"name": "x", "labels": null, "annotations": null, "deletionTimestamp": "2026-11-01T10:05:00Z"},
            "spec": null,
            "status": {"conditions": null, "podIP": null}
        }))
        .unwrap();
        assert!(!p.ready && p.metadata.annotations.is_none());
        assert!(p.metadata.deletion_timestamp.is_some());
        let p: RoutePod = serde_json::from_value(json!({
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "True"}]}
        }))
        .unwrap();
        assert!(!p.ready);
        let p: RoutePod =
            serde_json::from_value(json!({"status": {"conditions": [{"type": "Ready"}]}})).unwrap();
        assert!(!p.ready);
        // A malformed type is an error, as with k8s-openapi's Pod (the watcher reports it).
        assert!(
            serde_json::from_value::<RoutePod>(json!({"status": {"conditions": "x"}})).is_err()
        );
    }

    #[test]
    fn is_a_core_v1_pod_to_kube() {
        use kube::Resource;
        assert_eq!(RoutePod::kind(&()), "Pod");
        assert_eq!(RoutePod::api_version(&()), "v1");
        assert_eq!(
            RoutePod::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        assert_eq!(RoutePod::url_path(&(), None), "/api/v1/pods");
    }
}
