//! Paused sandboxes as the gateway learns them: `Sandbox` objects (`sandboxgateway.io/v1alpha1`)
//! carrying the controller's paused marker, watched read-only with a label selector so a gateway
//! receives only the paused ones (docs/design.md#pause-and-wake).
//!
//! The marker: label `sandboxgateway.io/paused: <sandbox ID>`, annotation
//! `sandboxgateway.io/access-token-sha256` (the hash its pods carried; absent: no token) and
//! `sandboxgateway.io/paused-by` (`Spec`: its owner paused it and traffic does not wake it).
//! Labels and annotations are the object's owner's to write, so a marker counts only when the
//! status (a subresource only the controller writes) agrees: `status.sandboxId` is the labelled
//! ID and `status.phase` is `Pausing`, `Paused` or `Resuming`. A tenant who can create Sandbox
//! objects therefore cannot forge another sandbox's marker. Only metadata and those two status
//! fields are read.

use crate::contract::TOKEN_SHA256_ANNOTATION;
use crate::key::validate_id;
use crate::table::Paused;
use crate::token::parse_sha256_hex;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::Deserialize;
use std::borrow::Cow;

/// The marker's label; its value is the sandbox ID.
pub const PAUSED_LABEL: &str = "sandboxgateway.io/paused";
/// Who paused it: `Idle` (traffic wakes it) or `Spec` (its owner; traffic does not).
pub const PAUSED_BY_ANNOTATION: &str = "sandboxgateway.io/paused-by";

/// A `Sandbox` reduced to its metadata and the two status fields that vouch for its marker
/// (serde skips the rest unparsed).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PausedSandbox {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PausedStatus>,
}

/// `status.sandboxId` and `status.phase`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PausedStatus {
    #[serde(default)]
    pub sandbox_id: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
}

impl kube::Resource for PausedSandbox {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Sandbox".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "sandboxgateway.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "sandboxes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The paused entry a marked `Sandbox` stands for: its ID and what a wake needs. `None` when the
/// marker is malformed (a bad ID, or a token annotation that is not a SHA-256) or the status does
/// not vouch for it (another ID, or a phase that is not a pause's): such a sandbox stays unknown
/// (404), so neither a bad annotation nor a forged label opens or blocks it.
pub fn paused_entry(s: &PausedSandbox) -> Option<(String, Paused)> {
    let meta = &s.metadata;
    let id = meta.labels.as_ref()?.get(PAUSED_LABEL)?;
    if validate_id(id.as_bytes()).is_err() || meta.deletion_timestamp.is_some() {
        return None;
    }
    let st = s.status.as_ref()?;
    let vouched = st.sandbox_id.as_deref() == Some(id.as_str())
        && matches!(
            st.phase.as_deref(),
            Some("Pausing") | Some("Paused") | Some("Resuming")
        );
    if !vouched {
        return None;
    }
    let annotations = meta.annotations.as_ref();
    let token_sha256 = match annotations.and_then(|a| a.get(TOKEN_SHA256_ANNOTATION)) {
        None => None,
        Some(h) => Some(parse_sha256_hex(h)?),
    };
    let wakeable = annotations
        .and_then(|a| a.get(PAUSED_BY_ANNOTATION))
        .is_none_or(|by| by != "Spec");
    Some((
        id.clone(),
        Paused {
            token_sha256,
            wakeable,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sandbox(labels: serde_json::Value, annotations: serde_json::Value) -> PausedSandbox {
        serde_json::from_value(json!({
            "apiVersion": "sandboxgateway.io/v1alpha1", "kind": "Sandbox",
            "metadata": { "name": "s", "namespace": "ns", "uid": "u",
                          "labels": labels, "annotations": annotations },
            "spec": { "poolRef": "p" },
            "status": { "phase": "Paused", "sandboxId": "abc" }
        }))
        .unwrap()
    }

    #[test]
    fn reads_the_marker_and_refuses_malformed_ones() {
        let sha = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
        let (id, p) = paused_entry(&sandbox(
            json!({ PAUSED_LABEL: "abc" }),
            json!({ TOKEN_SHA256_ANNOTATION: sha, PAUSED_BY_ANNOTATION: "Idle" }),
        ))
        .unwrap();
        assert_eq!(id, "abc");
        assert_eq!(p.token_sha256, parse_sha256_hex(sha));
        assert!(p.wakeable);
        let (_, p) = paused_entry(&sandbox(
            json!({ PAUSED_LABEL: "abc" }),
            json!({ PAUSED_BY_ANNOTATION: "Spec" }),
        ))
        .unwrap();
        assert!(!p.wakeable && p.token_sha256.is_none());
        for (labels, annotations) in [
            (json!({}), json!({})),
            (json!({ PAUSED_LABEL: "Not_An_Id" }), json!({})),
            (
                json!({ PAUSED_LABEL: "abc" }),
                json!({ TOKEN_SHA256_ANNOTATION: "zz" }),
            ),
            // Another ID than the status names: a forged label.
            (json!({ PAUSED_LABEL: "victim" }), json!({})),
        ] {
            assert!(paused_entry(&sandbox(labels, annotations)).is_none());
        }
        // The status must vouch: no status (a new object), or a phase that is not a pause's.
        let mut s = sandbox(json!({ PAUSED_LABEL: "abc" }), json!({}));
        s.status = None;
        assert!(paused_entry(&s).is_none());
        let with_phase = |phase: &str| PausedStatus {
            sandbox_id: Some("abc".into()),
            phase: Some(phase.into()),
        };
        for phase in ["Ready", "Pending", "Released"] {
            s.status = Some(with_phase(phase));
            assert!(paused_entry(&s).is_none(), "{phase}");
        }
        for phase in ["Pausing", "Paused", "Resuming"] {
            s.status = Some(with_phase(phase));
            assert!(paused_entry(&s).is_some(), "{phase}");
        }
    }

    #[test]
    fn is_the_sandbox_resource_to_kube() {
        use kube::Resource;
        assert_eq!(
            PausedSandbox::url_path(&(), Some("ns")),
            "/apis/sandboxgateway.io/v1alpha1/namespaces/ns/sandboxes"
        );
    }
}
