//! The controller's API: the `SandboxPool` and `Sandbox` custom resources
//! (`sandboxgateway.io/v1alpha1`). The CRD YAML under `deploy/crds/` is generated from these
//! types by `sandbox-controller crd`; a test fails when the committed copy is stale.
//!
//! Durations are strings in the Kubernetes style (`"90s"`, `"15m"`, `"1h30m"`); the controller
//! parses and range-checks them ([`crate::spec`]) and reports a bad one as a condition rather than
//! acting on a guess.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of both kinds.
pub const GROUP: &str = "sandboxgateway.io";
/// The finalizer on every `Sandbox`: its route is taken away before the object goes.
pub const FINALIZER: &str = "sandboxgateway.io/release";
/// Label on every pod a pool creates: the pool's name (the pool's `status.selector`).
pub const POOL_LABEL: &str = "sandboxgateway.io/pool";
/// Annotation on a pool's pods: the hash of the template they were created from.
pub const TEMPLATE_HASH_ANNOTATION: &str = "sandboxgateway.io/template-hash";
/// Annotation on a claimed pod: the name of the `Sandbox` that owns it (its owner reference
/// carries the UID).
pub const SANDBOX_NAME_ANNOTATION: &str = "sandboxgateway.io/sandbox";

/// The paused marker on a `Sandbox` (label: its ID; annotation: who paused it), shared with the
/// gateway, which watches `Sandbox` objects with this label read-only
/// (docs/controller.md#pause-and-wake).
pub use routing::paused::{PAUSED_BY_ANNOTATION, PAUSED_LABEL};

/// What idleness does to a sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IdlePolicy {
    /// Release it: the route, the pod, the ID and the token are gone.
    #[default]
    Release,
    /// Pause it: the pod is deleted, the ID, token and per-sandbox volumes are kept, and the
    /// next request wakes it.
    Pause,
}

/// What a claim does when its pool has no warm pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OnEmpty {
    /// Wait up to `claimWait` for a warm pod (the pool refills meanwhile), then fail.
    #[default]
    Wait,
    /// Start a pod for this claim at once (a cold start: the template's startup time).
    Cold,
    /// Fail the claim at once.
    Fail,
}

/// A pool of warm sandboxes: pods from one template, kept Ready and unclaimed.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sandboxgateway.io",
    version = "v1alpha1",
    kind = "SandboxPool",
    namespaced,
    shortname = "sbp",
    status = "SandboxPoolStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Starting","type":"integer","jsonPath":".status.starting"}"#,
    printcolumn = r#"{"name":"Claimed","type":"integer","jsonPath":".status.claimed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolSpec {
    /// The pod every sandbox of this pool runs. The controller adds its own labels and
    /// annotations; it never changes the containers.
    pub template: PodTemplateSpec,
    /// Warm sandboxes to keep: unclaimed and Ready.
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    /// The sandbox port requests go to when they name none (the gateway's port annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Default idle timeout of the pool's sandboxes (no traffic on any gateway for this long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Default maximum lifetime of the pool's sandboxes, from the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// A pod not Ready this long after it was created is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<String>,
    /// What a claim does when no warm pod is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_empty: Option<OnEmpty>,
    /// How long a claim waits for a warm pod when `onEmpty` is `Wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_wait: Option<String>,
    /// What idleness does to the pool's sandboxes (default `Release`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    /// Volumes made once per sandbox (`<sandbox>-<name>`, owned by the Sandbox) and mounted by
    /// every pod it gets, so their files survive a pause. The template's containers mount them
    /// by `metadata.name`. A pool with these keeps no warm pods (`replicas` must be 0): each pod
    /// is built for its sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<PersistentVolumeClaim>,
}

/// What the controller last saw of a pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Warm pods: unclaimed, Ready, from the current template.
    #[serde(default)]
    pub replicas: i32,
    /// Unclaimed pods not Ready yet.
    #[serde(default)]
    pub starting: i32,
    /// Pods bound to a `Sandbox`.
    #[serde(default)]
    pub claimed: i32,
    /// Pods that failed (or missed the startup timeout) and are being replaced.
    #[serde(default)]
    pub failed: i32,
    /// Warm pods still from an older template (replaced a few at a time).
    #[serde(default)]
    pub outdated: i32,
    /// The label selector of the pool's pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Hash of the current template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// `Ready`, `TemplateInvalid`, `ReplicaFailure`; a condition that stops holding is removed.
    /// Always serialized (even empty): status writes are merge patches, and an omitted list
    /// would leave a cleared condition in place.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One sandbox: a claim on a pool.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sandboxgateway.io",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    shortname = "sbx",
    status = "SandboxStatus",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".status.sandboxId"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Launch","type":"string","jsonPath":".status.launch","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The pool (same namespace) the sandbox is claimed from.
    pub pool_ref: String,
    /// Overrides the pool's idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Overrides the pool's maximum lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<String>,
    /// Overrides the pool's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Whether every request must carry the sandbox's access token (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_token: Option<bool>,
    /// Overrides the pool's idle policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    /// `true`: pause now and stay paused (traffic does not wake it); `false` or absent: run (a
    /// paused sandbox resumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// Where a sandbox is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Waiting for a pod.
    #[default]
    Pending,
    /// Bound to a Ready pod and routed.
    Ready,
    /// Its route is being taken away.
    Releasing,
    /// Its route is gone; the object waits for deletion (or is being deleted).
    Released,
    /// It could not be given a pod (see the conditions).
    Failed,
    /// Its route is being taken away and its pod deleted; it keeps its ID, token and volumes.
    Pausing,
    /// No pod; the next request (or `spec.paused: false`) resumes it.
    Paused,
    /// Getting a pod again (same ID, token and volumes).
    Resuming,
}

impl Phase {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Ready => "Ready",
            Phase::Releasing => "Releasing",
            Phase::Released => "Released",
            Phase::Failed => "Failed",
            Phase::Pausing => "Pausing",
            Phase::Paused => "Paused",
            Phase::Resuming => "Resuming",
        }
    }
}

/// How a sandbox got its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Launch {
    /// A warm pod from the pool.
    Warm,
    /// A pod started for this claim.
    Cold,
}

/// Why a sandbox was released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReleaseReason {
    /// The `Sandbox` was deleted.
    Deleted,
    /// No gateway saw traffic for it for its idle timeout.
    Idle,
    /// It reached its maximum lifetime.
    Expired,
    /// Its pod failed or was deleted by someone else.
    PodFailed,
    /// Its pool was deleted.
    PoolDeleted,
}

impl ReleaseReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::Deleted => "Deleted",
            ReleaseReason::Idle => "Idle",
            ReleaseReason::Expired => "Expired",
            ReleaseReason::PodFailed => "PodFailed",
            ReleaseReason::PoolDeleted => "PoolDeleted",
        }
    }
}

/// Why a sandbox is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PauseReason {
    /// No traffic for its idle timeout (policy `Pause`): the next request wakes it.
    Idle,
    /// Its owner set `spec.paused: true`: it stays paused until they clear it.
    Spec,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Idle => "Idle",
            PauseReason::Spec => "Spec",
        }
    }
}

/// Annotation a user (or `sandbox-controller resume`) sets to resume a sandbox paused for
/// idleness without sending it traffic: any value different from the last one acted on.
pub const RESUME_ANNOTATION: &str = "sandboxgateway.io/resume-requested";

/// What the controller last did with a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Pending, Ready, Releasing, Released, Failed, Pausing, Paused, Resuming.
    #[serde(default)]
    pub phase: Phase,
    /// The gateway's route key: a DNS label, unique in the cluster, never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// The pod bound to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The bound pod's UID (the release deletes exactly this pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The bound pod's IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// Warm or Cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// When the pod was bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<Time>,
    /// When it was first Ready (routed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
    /// The latest activity any gateway reported; only ever moves forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<Time>,
    /// Why it was released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_reason: Option<ReleaseReason>,
    /// When it was last paused (its pod deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<Time>,
    /// Why it is pausing or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<PauseReason>,
    /// The last `sandboxgateway.io/resume-requested` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_request: Option<String>,
    /// When it last became Ready again after a pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<Time>,
    /// Resumes in a row that failed (pod failed, or not Ready within the pool's
    /// `startupTimeout`); the next resume waits a backoff that doubles with each. Cleared by a
    /// resume that ends Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_failures: Option<u32>,
    /// When the last resume failed (the backoff counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_failed_at: Option<Time>,
    /// The Secret (same namespace) holding its access token under the key `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// How to reach it through the gateway, when the controller knows the gateway's domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Invalid`, `PoolMissing`, `TokenMissing`, `ResumeFailed`; removed when they stop
    /// holding.
    /// Always serialized (even empty): status writes are merge patches, and an omitted list
    /// would leave a cleared condition in place.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
