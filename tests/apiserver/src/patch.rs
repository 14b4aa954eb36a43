//! `PATCH` bodies, by content type, applied with the `json-patch` crate:
//! - `application/json-patch+json`: RFC 6902, `test` included. A failed operation (a `test`
//!   that does not hold, a path that does not exist) is a 422 `Invalid`, which is what the API
//!   server answers (its patch handler wraps the patch library's error in a 422 generic server
//!   response, whose reason is `Invalid`); a body that is not a patch is a 400.
//! - `application/merge-patch+json`: RFC 7386.
//! - `application/strategic-merge-patch+json`: treated as a merge patch with `$`-directives
//!   (`$patch`, `$retainKeys`, `$setElementOrder/…`) dropped: lists are replaced whole rather
//!   than merged by key. Good enough for patches that set fields; not for ones that merge
//!   container lists.
//! - `application/apply-patch+yaml` (server-side apply): a merge patch of the (JSON) body, the
//!   field manager ignored, no managed fields, no conflicts between managers; `force` is
//!   accepted and ignored. kube's `Patch::Apply` sends JSON, which is YAML; a body that is not
//!   JSON is a 400 here. A missing object is created, as apply does.
//!
//! The patched object's `metadata.resourceVersion` is then a precondition (see
//! [`crate::store::State::update`]), so a merge patch that carries one fails with a 409 when it
//! is stale, as on the API server.

use json_patch::PatchOperation;
use serde_json::Value;

use crate::store::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    /// The patch type a `Content-Type` names (parameters like `; charset=utf-8` ignored).
    pub(crate) fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" => Ok(Self::Apply),
            other => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {other:?}"),
            )),
        }
    }
}

/// The document after applying `body` (a patch of `kind`) to `doc`.
pub(crate) fn apply(kind: PatchKind, doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut out = doc.clone();
    match kind {
        PatchKind::Json => {
            let ops: Vec<PatchOperation> = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut out, &ops).map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            let mut patch: Value = serde_json::from_slice(body).map_err(|e| {
                let what = if kind == PatchKind::Apply {
                    "apply patch (this fake server reads it as JSON only)"
                } else {
                    "merge patch"
                };
                ApiError::bad_request(format!("invalid {what}: {e}"))
            })?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            if kind == PatchKind::Strategic {
                drop_directives(&mut patch);
            }
            json_patch::merge(&mut out, &patch);
        }
    }
    Ok(out)
}

/// Removes strategic-merge-patch directives (keys starting with `$`), at every depth.
fn drop_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(drop_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patch_kinds() {
        let doc = json!({"metadata": {"resourceVersion": "3"}, "spec": {"a": 1, "b": [1, 2]}});
        let merged = apply(PatchKind::Merge, &doc, br#"{"spec": {"a": null, "c": 2}}"#).unwrap();
        assert_eq!(merged["spec"], json!({"b": [1, 2], "c": 2}));
        let smp = br#"{"spec": {"b": [3], "$retainKeys": ["b"]}}"#;
        assert_eq!(
            apply(PatchKind::Strategic, &doc, smp).unwrap()["spec"]["b"],
            json!([3])
        );
        let ok = br#"[{"op":"test","path":"/metadata/resourceVersion","value":"3"},{"op":"add","path":"/spec/b/-","value":9}]"#;
        assert_eq!(
            apply(PatchKind::Json, &doc, ok).unwrap()["spec"]["b"],
            json!([1, 2, 9])
        );
        let failing = br#"[{"op":"test","path":"/metadata/resourceVersion","value":"2"}]"#;
        let err = apply(PatchKind::Json, &doc, failing).unwrap_err();
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        let err = apply(PatchKind::Json, &doc, br#"{"op":"add"}"#).unwrap_err();
        assert_eq!(err.code, 400);
        assert_eq!(
            apply(PatchKind::Apply, &doc, b"spec: {}").unwrap_err().code,
            400
        );
        assert_eq!(
            PatchKind::from_content_type("text/plain").unwrap_err().code,
            415
        );
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
    }
}
