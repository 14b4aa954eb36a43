//! The controller's errors. Each variant is a label of `sandboxgateway_reconcile_errors_total`
//! (see [`Error::metric_label`]), so an operator sees which kind of failure is rising.

use std::time::Duration;

/// A reconcile or idle-pass failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be (de)serialized (a bug, or a field the API server rejected).
    #[error("serialization: {0}")]
    Serialize(#[from] serde_json::Error),
    /// This replica is not (or no longer) the leader: it must not write.
    #[error("not the leader: writes are fenced")]
    NotLeader,
    /// The OS random number generator failed (IDs, tokens).
    #[error(transparent)]
    Random(#[from] crate::ids::RandomError),
    /// An object lacks something every object has (name, namespace, uid).
    #[error("object without {0}")]
    MissingField(&'static str),
    /// A release could not delete the sandbox's pod (it kept changing): retried.
    #[error("the route of pod {0} is not removed yet")]
    RouteNotRemoved(String),
    /// A claim with this sandbox's name exists but is not this sandbox's (a Sandbox deleted and
    /// created again under one name, its old volume not collected yet): retried, never used.
    #[error("the PersistentVolumeClaim {0} belongs to another (or a deleted) sandbox")]
    VolumeNotOwned(String),
    /// A sandbox-extproc replica failed (idle pass).
    #[error("activity replica {endpoint}: {why}")]
    Replica { endpoint: String, why: String },
}

impl Error {
    /// The metric label of this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::NotLeader => "not_leader",
            Error::Random(_) => "random",
            Error::MissingField(_) => "missing_field",
            Error::Replica { .. } => "replica",
            Error::RouteNotRemoved(_) => "route_not_removed",
            Error::VolumeNotOwned(_) => "volume_not_owned",
        }
    }

    /// How soon to retry after this error.
    pub fn retry_after(&self) -> Duration {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => Duration::from_millis(50),
            Error::NotLeader => Duration::from_secs(2),
            _ => Duration::from_secs(1),
        }
    }
}

/// Whether a kube error is the API server's 409 Conflict (a lost race, not a failure).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether a kube error is a 404 Not Found.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The namespace of a namespaced object (every Sandbox, pool and pod has one).
pub fn namespace_of<K: kube::ResourceExt>(obj: &K) -> Result<String> {
    obj.namespace()
        .ok_or(Error::MissingField("metadata.namespace"))
}
