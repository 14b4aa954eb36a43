//! The API's write rules on the store, as the real API server applies them: create (with
//! `generateName`), update of the object or its status (resourceVersion precondition,
//! `generation`, no-op detection, the last finalizer's removal) and delete (preconditions,
//! finalizers, owner-reference cascade through [`State::remove`]).

use std::sync::Arc;

use serde_json::{json, Value};

use crate::pods::{new_uid, now_rfc3339};
use crate::registry::ResId;
use crate::store::{comparable, has_finalizers, str_at, ApiError, State, Stored};

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// The object itself: `status` is kept as stored when the resource has a status subresource.
    Main,
    /// `/status`: only `status` changes.
    Status,
}

/// The `DeleteOptions` this server honours.
#[derive(Debug, Default)]
pub(crate) struct DeleteOpts {
    pub(crate) uid: Option<String>,
    pub(crate) resource_version: Option<String>,
    /// `propagationPolicy: Orphan` (or `orphanDependents: true`): no cascade.
    pub(crate) orphan: bool,
}

/// What a delete did.
pub(crate) enum Deleted {
    /// Finalizers remain: the object is kept with a `deletionTimestamp`.
    Pending(Arc<Stored>),
    /// Removed; the final object.
    Gone(Value),
}

impl State {
    /// `POST`: a new object in namespace `ns` (ignored for cluster-scoped resources).
    pub(crate) fn create(
        &mut self,
        res: ResId,
        ns: Option<&str>,
        mut body: Value,
    ) -> Result<Arc<Stored>, ApiError> {
        let rt = self.registry.get(res).clone();
        if !body.is_object() || (!body["metadata"].is_object() && !body["metadata"].is_null()) {
            return Err(ApiError::bad_request(
                "the body is not an object with metadata",
            ));
        }
        let ns = self.ns_key(res, ns);
        if rt.namespaced {
            if let Some(own) = str_at(&body, "namespace") {
                if own != ns {
                    let msg = "the namespace of the provided object does not match the namespace sent on the request";
                    return Err(ApiError::bad_request(msg));
                }
            }
        }
        if str_at(&body, "resourceVersion").is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match (str_at(&body, "name"), str_at(&body, "generateName")) {
            (Some(name), _) => {
                if self.object(res, &ns, name).is_some() {
                    return Err(ApiError::already_exists(&rt, name));
                }
                name.to_string()
            }
            (None, Some(prefix)) => {
                // The API server's generator: 5 characters from an alphabet without vowels,
                // retried on a collision.
                let fresh = (0..8)
                    .map(|_| format!("{prefix}{}", random_suffix()))
                    .find(|n| self.object(res, &ns, n).is_none());
                match fresh {
                    Some(n) => n,
                    None => return Err(ApiError::already_exists(&rt, prefix)),
                }
            }
            (None, None) => {
                return Err(ApiError::invalid(format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    rt.name()
                )))
            }
        };
        body["metadata"]["name"] = json!(name);
        if let Some(m) = body["metadata"].as_object_mut() {
            for system in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                m.remove(system);
            }
        }
        if rt.status {
            if let Some(m) = body.as_object_mut() {
                m.remove("status");
            }
        }
        Ok(self.put(res, ns, name, body))
    }

    /// `PUT` (or a patch's result): replaces the stored object, or only its status.
    /// A `metadata.resourceVersion` in `new` is a precondition.
    pub(crate) fn update(
        &mut self,
        res: ResId,
        ns: &str,
        name: &str,
        part: Part,
        new: Value,
    ) -> Result<Arc<Stored>, ApiError> {
        let rt = self.registry.get(res).clone();
        let Some(prev) = self.object(res, ns, name).cloned() else {
            return Err(ApiError::not_found(&rt, name));
        };
        if !new.is_object() || !(new["metadata"].is_object() || new["metadata"].is_null()) {
            return Err(ApiError::bad_request(
                "the body is not an object with metadata",
            ));
        }
        if let Some(own) = str_at(&new, "name") {
            if own != name {
                let msg = format!(
                    "the name of the object ({own}) does not match the name on the URL ({name})"
                );
                return Err(ApiError::bad_request(msg));
            }
        }
        if rt.namespaced && str_at(&new, "namespace").is_some_and(|n| n != ns) {
            let msg = "the namespace of the provided object does not match the namespace sent on the request";
            return Err(ApiError::bad_request(msg));
        }
        if let Some(rv) = str_at(&new, "resourceVersion") {
            if Some(rv) != str_at(&prev.value, "resourceVersion") {
                return Err(ApiError::modified(&rt, name));
            }
        }
        let mut next = match part {
            Part::Status => {
                let mut next = prev.value.clone();
                next["status"] = new["status"].clone();
                next
            }
            Part::Main => {
                let mut next = new;
                if rt.status {
                    next["status"] = prev.value["status"].clone();
                }
                let (m, old) = (&mut next["metadata"], &prev.value["metadata"]);
                for kept in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                ] {
                    match old.get(kept) {
                        Some(v) => m[kept] = v.clone(),
                        None => {
                            if let Some(m) = m.as_object_mut() {
                                m.remove(kept);
                            }
                        }
                    }
                }
                next
            }
        };
        if next["status"].is_null() {
            if let Some(m) = next.as_object_mut() {
                m.remove("status");
            }
        }
        next["metadata"]["name"] = json!(name);
        next["kind"] = json!(rt.kind);
        next["apiVersion"] = json!(rt.api_version());
        if let Some(m) = next["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        // No change, no write: the API server answers a no-op update with the stored object.
        if comparable(&next) == comparable(&prev.value) {
            return Ok(prev);
        }
        if str_at(&prev.value, "deletionTimestamp").is_some() && !has_finalizers(&next) {
            // The last finalizer is gone: the object goes, in the state this update gave it
            // (one DELETED event, as the API server's store deletes it in the update).
            let gone = self.remove_as(res, ns, name, Some(next), true);
            return Ok(Stored::new(gone.unwrap_or(Value::Null)));
        }
        Ok(self.put(res, ns.to_string(), name.to_string(), next))
    }

    /// `DELETE`: removes the object, or marks it with a `deletionTimestamp` while finalizers
    /// remain.
    pub(crate) fn delete(
        &mut self,
        res: ResId,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Deleted, ApiError> {
        let rt = self.registry.get(res).clone();
        let Some(prev) = self.object(res, ns, name).cloned() else {
            return Err(ApiError::not_found(&rt, name));
        };
        let checks = [
            ("UID", "uid", &opts.uid),
            ("ResourceVersion", "resourceVersion", &opts.resource_version),
        ];
        for (what, field, want) in checks {
            let have = str_at(&prev.value, field).unwrap_or("");
            if let Some(want) = want.as_deref().filter(|w| *w != have) {
                let why = format!("Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}");
                return Err(ApiError::conflict(&rt, name, &why));
            }
        }
        if has_finalizers(&prev.value) {
            if str_at(&prev.value, "deletionTimestamp").is_some() {
                return Ok(Deleted::Pending(prev));
            }
            let mut next = prev.value.clone();
            next["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(Deleted::Pending(self.put(
                res,
                ns.to_string(),
                name.to_string(),
                next,
            )));
        }
        match self.remove(res, ns, name, !opts.orphan) {
            Some(gone) => Ok(Deleted::Gone(gone)),
            None => Err(ApiError::not_found(&rt, name)),
        }
    }
}

/// 5 characters from the API server's name-generator alphabet (no vowels, no look-alikes).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let seed = new_uid();
    let mut h =
        std::hash::BuildHasher::build_hasher(&std::collections::hash_map::RandomState::new());
    std::hash::Hasher::write(&mut h, seed.as_bytes());
    let mut x = std::hash::Hasher::finish(&h);
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize];
            x /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}
