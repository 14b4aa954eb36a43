//! The Kubernetes route contract, in one place: which Pod is a route, and which label and
//! annotations say where it is (docs/design.md#kubernetes-route-contract).
//!
//! Read by the Kubernetes route source, written by the controller when it claims a pod, and used
//! by the in-process API server's fixtures and the tests, so every party agrees by construction.
//! Any pod that satisfies it is routable: the gateway does not need our controller.

use sha2::{Digest, Sha256};

/// The label whose value is the sandbox ID (a DNS label). Its presence makes a pod a candidate
/// route; warm, unclaimed pods never carry it.
pub const SANDBOX_ID_LABEL: &str = "sandboxgateway.io/sandbox-id";

/// Optional annotation: the port requests go to when the request names none.
pub const PORT_ANNOTATION: &str = "sandboxgateway.io/port";

/// Optional annotation: lowercase hex SHA-256 of the sandbox's access token. When present, every
/// request must carry the token.
pub const TOKEN_SHA256_ANNOTATION: &str = "sandboxgateway.io/access-token-sha256";

/// The port of a pod without [`PORT_ANNOTATION`] (the source's `default_port`, unless set).
pub const DEFAULT_PORT: u16 = 8080;

/// The value of [`TOKEN_SHA256_ANNOTATION`] for `token`.
pub fn token_sha256_hex(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

/// The facts about a pod that decide whether it is a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodFacts {
    /// The label is present and holds a valid sandbox ID.
    pub has_valid_id: bool,
    /// The pod has an IP of its own (not host network), and its annotations parsed.
    pub has_ip: bool,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodFacts {
    /// The routability rule: labelled with a valid ID, an IP, Ready, not being deleted.
    pub fn routable(&self) -> bool {
        self.has_valid_id && self.has_ip && self.ready && !self.deleting
    }

    /// Known to the gateway even when not routable: a labelled pod that is coming up (no IP yet,
    /// not Ready) gets 503 `sandbox_not_ready` with `Retry-After`, not 404. A terminating pod is
    /// not known: its sandbox is going away.
    pub fn known(&self) -> bool {
        self.has_valid_id && !self.deleting
    }
}

/// Whether a pod's conditions say it is Ready (the kubelet's `Ready` = `True`).
pub fn is_ready<'a>(conditions: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    conditions
        .into_iter()
        .any(|(type_, status)| type_ == "Ready" && status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routable_needs_every_fact() {
        let ok = PodFacts {
            has_valid_id: true,
            has_ip: true,
            ready: true,
            deleting: false,
        };
        assert!(ok.routable() && ok.known());
        for broken in [
            PodFacts {
                has_valid_id: false,
                ..ok
            },
            PodFacts {
                has_ip: false,
                ..ok
            },
            PodFacts { ready: false, ..ok },
            PodFacts {
                deleting: true,
                ..ok
            },
        ] {
            assert!(!broken.routable(), "{broken:?}");
        }
        assert!(PodFacts {
            ready: false,
            has_ip: false,
            ..ok
        }
        .known());
        assert!(!PodFacts {
            deleting: true,
            ..ok
        }
        .known());
    }

    #[test]
    fn ready_condition_and_token_hash() {
        assert!(is_ready([("PodScheduled", "True"), ("Ready", "True")]));
        assert!(!is_ready([("Ready", "False"), ("ContainersReady", "True")]));
        assert!(!is_ready([]));
        // sha256("secret"), the form the route source parses back.
        let h = token_sha256_hex(b"secret");
        assert_eq!(
            h,
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert!(crate::token::parse_sha256_hex(&h).is_some());
    }
}
