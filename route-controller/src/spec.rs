//! The settings a pool and a sandbox resolve to, parsed and range-checked once per reconcile.
//! An invalid value is an [`Invalid`] (shown as a status condition and an Event); nothing acts
//! on a value it could not parse.

use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use routing::contract::{DEFAULT_PORT, SANDBOX_ID_LABEL};

use crate::crd::{IdlePolicy, OnEmpty, SandboxPoolSpec, SandboxSpec, POOL_LABEL};

/// Why a spec cannot be acted on (the condition's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// The field, as the user wrote it (`spec.idleTimeout`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> Invalid {
    Invalid {
        field,
        problem: problem.into(),
    }
}

/// Idle timeouts shorter than this are refused: the gateways report activity about once a second,
/// so a shorter timeout could release a sandbox between a request and its report. Production
/// timeouts are minutes; the floor is low so tests and demos can show a release in seconds.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest idle timeout and lifetime accepted (a year).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Startup timeout of a pool that sets none.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a claim waits for a warm pod when the pool sets no `claimWait`.
pub const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Parses a Kubernetes-style duration (`"90s"`, `"15m"`, `"1h30m"`) within `min..=MAX_DURATION`.
pub fn parse_duration(field: &'static str, raw: &str, min: Duration) -> Result<Duration, Invalid> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|e| invalid(field, format!("{raw:?} is not a duration ({e})")))?;
    if d < min || d > MAX_DURATION {
        return Err(invalid(
            field,
            format!(
                "{raw:?} is out of range ({} to {})",
                humantime::format_duration(min),
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(d)
}

fn opt_duration(
    field: &'static str,
    raw: Option<&str>,
    min: Duration,
) -> Result<Option<Duration>, Invalid> {
    raw.map(|r| parse_duration(field, r, min)).transpose()
}

fn port(field: &'static str, raw: Option<i32>) -> Result<Option<u16>, Invalid> {
    match raw {
        None => Ok(None),
        Some(p) => match u16::try_from(p) {
            Ok(p) if p != 0 => Ok(Some(p)),
            _ => Err(invalid(field, format!("{p} is not a port (1-65535)"))),
        },
    }
}

/// A pool's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub replicas: u32,
    pub port: u16,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub startup_timeout: Duration,
    pub on_empty: OnEmpty,
    pub claim_wait: Duration,
    pub idle_policy: IdlePolicy,
    /// The pool has `volumeClaimTemplates`: every pod is built for its sandbox.
    pub per_sandbox_volumes: bool,
}

impl PoolSettings {
    /// Parses and checks a pool's spec, template included.
    pub fn resolve(spec: &SandboxPoolSpec) -> Result<Self, Invalid> {
        check_template(&spec.template)?;
        let replicas = u32::try_from(spec.replicas)
            .map_err(|_| invalid("spec.replicas", "must not be negative"))?;
        check_volume_templates(spec)?;
        Ok(PoolSettings {
            replicas,
            port: port("spec.port", spec.port)?.unwrap_or(DEFAULT_PORT),
            idle_timeout: opt_duration(
                "spec.idleTimeout",
                spec.idle_timeout.as_deref(),
                MIN_IDLE_TIMEOUT,
            )?,
            max_lifetime: opt_duration(
                "spec.maxLifetime",
                spec.max_lifetime.as_deref(),
                Duration::from_secs(1),
            )?,
            startup_timeout: opt_duration(
                "spec.startupTimeout",
                spec.startup_timeout.as_deref(),
                Duration::from_secs(1),
            )?
            .unwrap_or(DEFAULT_STARTUP_TIMEOUT),
            on_empty: spec.on_empty.unwrap_or_default(),
            claim_wait: opt_duration("spec.claimWait", spec.claim_wait.as_deref(), Duration::ZERO)?
                .unwrap_or(DEFAULT_CLAIM_WAIT),
            idle_policy: spec.idle_policy.unwrap_or_default(),
            per_sandbox_volumes: !spec.volume_claim_templates.is_empty(),
        })
    }
}

/// A sandbox's settings: its overrides over its pool's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxSettings {
    pub port: u16,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub require_token: bool,
    pub idle_policy: IdlePolicy,
    /// `spec.paused: true`: paused by its owner, and traffic does not wake it.
    pub paused: bool,
}

impl SandboxSettings {
    /// Parses a sandbox's overrides over `pool`.
    pub fn resolve(spec: &SandboxSpec, pool: &PoolSettings) -> Result<Self, Invalid> {
        Ok(SandboxSettings {
            port: port("spec.port", spec.port)?.unwrap_or(pool.port),
            idle_timeout: opt_duration(
                "spec.idleTimeout",
                spec.idle_timeout.as_deref(),
                MIN_IDLE_TIMEOUT,
            )?
            .or(pool.idle_timeout),
            max_lifetime: opt_duration(
                "spec.maxLifetime",
                spec.max_lifetime.as_deref(),
                Duration::from_secs(1),
            )?
            .or(pool.max_lifetime),
            require_token: spec.require_token.unwrap_or(true),
            idle_policy: spec.idle_policy.unwrap_or(pool.idle_policy),
            paused: spec.paused.unwrap_or(false),
        })
    }
}

/// What `volumeClaimTemplates` must be: each named with a DNS label (the claim is
/// `<sandbox>-<name>`), names unique and not a volume the template defines itself, and no warm
/// pods (`replicas: 0`: a running pod cannot have a sandbox's volumes mounted).
fn check_volume_templates(spec: &SandboxPoolSpec) -> Result<(), Invalid> {
    let field = "spec.volumeClaimTemplates";
    if spec.volume_claim_templates.is_empty() {
        return Ok(());
    }
    if spec.replicas != 0 {
        return Err(invalid(
            "spec.replicas",
            "must be 0 with volumeClaimTemplates (each pod is built for its sandbox, with its \
             volumes)",
        ));
    }
    let own: Vec<&str> = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(|v| v.iter().map(|v| v.name.as_str()).collect())
        .unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    for t in &spec.volume_claim_templates {
        let name = t.metadata.name.as_deref().unwrap_or("");
        let dns_label = !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !dns_label {
            return Err(invalid(
                field,
                format!("{name:?} is not a DNS label of at most 40 characters"),
            ));
        }
        if !seen.insert(name) || own.contains(&name) {
            return Err(invalid(
                field,
                format!("the volume name {name:?} is used twice"),
            ));
        }
    }
    Ok(())
}

/// What a template must be for the pool to run it: at least one container, each named and with
/// an image; no route label (a warm pod must never be routable); not on the host network (the
/// gateway routes only to a pod's own IP); no labels of the controller's own.
pub fn check_template(t: &PodTemplateSpec) -> Result<(), Invalid> {
    let field = "spec.template";
    if let Some(labels) = t.metadata.as_ref().and_then(|m| m.labels.as_ref()) {
        for reserved in [SANDBOX_ID_LABEL, POOL_LABEL] {
            if labels.contains_key(reserved) {
                return Err(invalid(
                    field,
                    format!("the label {reserved} is set by the controller, not the template"),
                ));
            }
        }
    }
    let Some(spec) = t.spec.as_ref() else {
        return Err(invalid(field, "has no spec"));
    };
    if spec.containers.is_empty() {
        return Err(invalid(field, "has no containers"));
    }
    for c in &spec.containers {
        if c.name.is_empty() {
            return Err(invalid(field, "a container has no name"));
        }
        if c.image.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(
                field,
                format!("container {:?} has no image", c.name),
            ));
        }
    }
    if spec.host_network == Some(true) {
        return Err(invalid(
            field,
            "hostNetwork pods cannot be sandboxes (the gateway routes to a pod's own IP)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub(crate) fn template() -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "sandbox".into(),
                    image: Some("example/sandbox:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    fn pool() -> SandboxPoolSpec {
        SandboxPoolSpec {
            template: template(),
            replicas: 3,
            port: None,
            idle_timeout: Some("15m".into()),
            max_lifetime: None,
            startup_timeout: None,
            on_empty: None,
            claim_wait: None,
            idle_policy: None,
            volume_claim_templates: Vec::new(),
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let p = PoolSettings::resolve(&pool()).unwrap();
        assert_eq!(p.port, DEFAULT_PORT);
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(900)));
        assert_eq!(p.startup_timeout, DEFAULT_STARTUP_TIMEOUT);
        assert_eq!(p.on_empty, OnEmpty::Wait);
        let s = SandboxSettings::resolve(
            &SandboxSpec {
                pool_ref: "p".into(),
                idle_timeout: Some("1h30m".into()),
                max_lifetime: Some("2h".into()),
                port: Some(9000),
                require_token: Some(false),
                idle_policy: Some(IdlePolicy::Pause),
                paused: None,
            },
            &p,
        )
        .unwrap();
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(5400)));
        assert_eq!(s.max_lifetime, Some(Duration::from_secs(7200)));
        assert_eq!((s.port, s.require_token), (9000, false));
        assert_eq!((s.idle_policy, s.paused), (IdlePolicy::Pause, false));
        assert_eq!(p.idle_policy, IdlePolicy::Release);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let p = PoolSettings::resolve(&pool()).unwrap();
        let base = SandboxSpec {
            pool_ref: "p".into(),
            idle_timeout: None,
            max_lifetime: None,
            port: None,
            require_token: None,
            idle_policy: None,
            paused: None,
        };
        for (spec, field) in [
            (
                SandboxSpec {
                    idle_timeout: Some("1s".into()),
                    ..base.clone()
                },
                "spec.idleTimeout",
            ),
            (
                SandboxSpec {
                    idle_timeout: Some("soon".into()),
                    ..base.clone()
                },
                "spec.idleTimeout",
            ),
            (
                SandboxSpec {
                    max_lifetime: Some("400d".into()),
                    ..base.clone()
                },
                "spec.maxLifetime",
            ),
            (
                SandboxSpec {
                    port: Some(70000),
                    ..base.clone()
                },
                "spec.port",
            ),
            (
                SandboxSpec {
                    port: Some(0),
                    ..base.clone()
                },
                "spec.port",
            ),
        ] {
            assert_eq!(
                SandboxSettings::resolve(&spec, &p).unwrap_err().field,
                field
            );
        }
        let mut neg = pool();
        neg.replicas = -1;
        assert_eq!(
            PoolSettings::resolve(&neg).unwrap_err().field,
            "spec.replicas"
        );
    }

    #[test]
    fn volume_templates_need_names_and_no_warm_pods() {
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        let claim = |name: &str| PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut p = pool();
        p.volume_claim_templates = vec![claim("data")];
        assert_eq!(
            PoolSettings::resolve(&p).unwrap_err().field,
            "spec.replicas"
        );
        p.replicas = 0;
        assert!(PoolSettings::resolve(&p).unwrap().per_sandbox_volumes);
        for bad in [
            vec![claim("")],
            vec![claim("Data")],
            vec![claim("data"), claim("data")],
            vec![claim("-x")],
        ] {
            p.volume_claim_templates = bad;
            assert_eq!(
                PoolSettings::resolve(&p).unwrap_err().field,
                "spec.volumeClaimTemplates"
            );
        }
    }

    #[test]
    fn templates_that_would_break_the_contract_are_refused() {
        let mut routable = template();
        routable.metadata = Some(ObjectMeta {
            labels: Some([(SANDBOX_ID_LABEL.to_string(), "x".to_string())].into()),
            ..Default::default()
        });
        let mut no_image = template();
        no_image.spec.as_mut().unwrap().containers[0].image = None;
        let mut host = template();
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut empty = template();
        empty.spec.as_mut().unwrap().containers.clear();
        for t in [routable, no_image, host, empty, PodTemplateSpec::default()] {
            assert!(check_template(&t).is_err(), "{t:?}");
        }
        assert!(check_template(&template()).is_ok());
    }
}
