//! Gateway configuration: the JSON users write, parsed once into typed structs.
//!
//! Shared by the Envoy module (filter config string) and sandbox-extproc. Unknown fields and bad
//! values are errors that name the field: a half-understood config must never start serving.

use crate::bearer::BearerToken;
use crate::key::{validate_id, HeaderNames, KeyConfig};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid sandbox_gateway config: field `{path}`: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid sandbox_gateway config: field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field_err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// Where routes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSourceConfig {
    File {
        path: PathBuf,
        poll_interval: Duration,
    },
    Kubernetes(KubeSourceConfig),
}

/// Pods labelled `label` in `namespaces` (empty: all) are routes (see `pod_index`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSourceConfig {
    pub namespaces: Vec<String>,
    pub label: String,
    /// A kubeconfig file; `None` means in-cluster service-account config.
    pub kubeconfig: Option<PathBuf>,
    /// Port for pods without the `sandboxgateway.io/port` annotation.
    pub default_port: u16,
}

/// What the upstream sees of a path-prefix key (`"path_prefix_mode"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathPrefixMode {
    /// `<prefix>/<id>/<port>/rest` goes upstream as `/rest`, and `x-forwarded-prefix` says what
    /// was removed (servers that build URLs prepend it).
    #[default]
    Strip,
    /// The path goes upstream as received, for servers configured with the prefix as their base
    /// URL (e.g. Jupyter's `base_url`, an app mounted under it). No `x-forwarded-prefix`: by
    /// convention it names a prefix that was removed, and a server honouring it would double it.
    Keep,
}

/// The Host (`:authority`) a routed request goes upstream with (`"upstream_host"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamHost {
    /// The client's Host, unchanged.
    #[default]
    Keep,
    /// `localhost:<port>` (the port the request is routed to), with the client's Host in
    /// `x-forwarded-host`: for servers that accept only a loopback Host (DNS-rebinding checks).
    Localhost,
}

/// The whole, validated gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub keys: KeyConfig,
    pub path_prefix_mode: PathPrefixMode,
    pub upstream_host: UpstreamHost,
    pub routes: RouteSourceConfig,
    pub miss_hold: Duration,
    pub retry_after_secs: u32,
    pub access_token_header: String,
    pub activity_stream_throttle: Duration,
    /// Push activity to sandbox-extproc's ActivityService (module only; None = no reporting).
    pub activity_report: Option<ActivityReportConfig>,
    /// Streams one sandbox may have open through this gateway process at once; past it a new
    /// request gets 429 `sandbox_busy` (docs/design.md#limits).
    pub max_streams_per_sandbox: u32,
    /// Requests held on a miss at once, all clients together (docs/design.md#limits).
    pub max_held_misses: usize,
    /// Wake paused sandboxes on traffic (`"wake"`; None = off: no paused set, no wakes).
    pub wake: Option<WakeConfig>,
}

/// How the gateway wakes paused sandboxes (`"wake"`, docs/design.md#pause-and-wake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeConfig {
    /// `http://host:port` of the controller's WakeService. The host is resolved on every
    /// attempt and every address asked: a headless Service name reaches every replica.
    pub endpoint: String,
    /// Sent as `authorization: Bearer <token>` (`token_file`, read once at load).
    pub token: Option<BearerToken>,
    /// How long a request is held for a wake before `503 sandbox_waking`.
    pub timeout: Duration,
    /// Requests held for wakes at once (all sandboxes); past it `429 too_many_wakes`.
    pub max_held: usize,
}

/// Where and how often the module reports activity (`"activity_report"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityReportConfig {
    /// `http://host:port` of sandbox-extproc's ActivityService.
    pub endpoint: String,
    pub interval: Duration,
    /// Sent as `authorization: Bearer <token>` on every Report stream (`token_file`, read once
    /// at config load). None: no credentials (the server must then run unauthenticated).
    pub token: Option<BearerToken>,
}

// ---- wire format -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_header_keys")]
    header_keys: RawHeaderKeys,
    #[serde(default)]
    host_domains: Vec<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    /// Absent: strip. Given without `path_prefix`: an error (it would do nothing).
    #[serde(default)]
    path_prefix_mode: Option<PathPrefixMode>,
    #[serde(default)]
    upstream_host: UpstreamHost,
    route_source: RawRouteSource,
    #[serde(default = "default_miss_hold_ms")]
    miss_hold_ms: u64,
    #[serde(default = "default_retry_after_s")]
    retry_after_s: u32,
    /// Absent: the header preset's token header (see `default_token_header`).
    #[serde(default)]
    access_token_header: Option<String>,
    #[serde(default = "default_activity_throttle_ms")]
    activity_stream_throttle_ms: u64,
    #[serde(default)]
    activity_report: Option<RawActivityReport>,
    #[serde(default = "default_max_streams_per_sandbox")]
    max_streams_per_sandbox: u32,
    #[serde(default = "default_max_held_misses")]
    max_held_misses: usize,
    #[serde(default)]
    wake: Option<RawWake>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWake {
    endpoint: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_wake_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_held_wakes")]
    max_held: usize,
}

/// 30 s: a resume from a warm pool takes milliseconds, a cold pod with volumes seconds; past
/// 30 s a client is better told to retry than kept waiting.
fn default_wake_timeout_ms() -> u64 {
    30_000
}
/// Held wakes cost what held misses cost; only requests with a valid token get one.
fn default_max_held_wakes() -> usize {
    10_000
}
/// The longest wake hold accepted: Envoy's default stream idle timeout is 5 minutes.
pub const MAX_WAKE_TIMEOUT_MS: u64 = 240_000;

fn wake(
    raw: Option<RawWake>,
    routes: &RouteSourceConfig,
) -> Result<Option<WakeConfig>, ConfigError> {
    let Some(w) = raw else { return Ok(None) };
    if !matches!(routes, RouteSourceConfig::Kubernetes(_)) {
        return Err(field_err(
            "wake",
            "needs route_source kubernetes (paused sandboxes are known from their Sandbox objects)",
        ));
    }
    let host = w.endpoint.strip_prefix("http://").unwrap_or("");
    if host.is_empty()
        || host.contains('/')
        || !host.contains(':')
        || w.endpoint.bytes().any(|b| b.is_ascii_whitespace())
    {
        return Err(field_err(
            "wake.endpoint",
            format!("{:?} must look like http://host:port", w.endpoint),
        ));
    }
    if !(1000..=MAX_WAKE_TIMEOUT_MS).contains(&w.timeout_ms) {
        return Err(field_err(
            "wake.timeout_ms",
            format!("must be from 1000 to {MAX_WAKE_TIMEOUT_MS}"),
        ));
    }
    if w.max_held == 0 || w.max_held > 1_000_000 {
        return Err(field_err("wake.max_held", "must be from 1 to 1000000"));
    }
    let token = w
        .token_file
        .map(|p| BearerToken::from_file(&p))
        .transpose()
        .map_err(|e| field_err("wake.token_file", e.to_string()))?;
    Ok(Some(WakeConfig {
        endpoint: w.endpoint,
        token,
        timeout: Duration::from_millis(w.timeout_ms),
        max_held: w.max_held,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivityReport {
    endpoint: String,
    #[serde(default = "default_report_interval_ms")]
    interval_ms: u64,
    #[serde(default)]
    token_file: Option<PathBuf>,
}

fn default_report_interval_ms() -> u64 {
    1000
}

fn activity_report(
    raw: Option<RawActivityReport>,
) -> Result<Option<ActivityReportConfig>, ConfigError> {
    let Some(r) = raw else { return Ok(None) };
    // Plain-text gRPC (h2c) only: the reporter has no TLS. A host is required.
    let host = r.endpoint.strip_prefix("http://").unwrap_or("");
    if host.is_empty()
        || host.starts_with('/')
        || r.endpoint.bytes().any(|b| b.is_ascii_whitespace())
    {
        return Err(field_err(
            "activity_report.endpoint",
            format!("{:?} must look like http://host:port", r.endpoint),
        ));
    }
    if !(100..=60_000).contains(&r.interval_ms) {
        return Err(field_err(
            "activity_report.interval_ms",
            "must be from 100 to 60000",
        ));
    }
    // Read here, once: a missing or empty file refuses the config instead of surfacing later as
    // a reporter the server silently refuses.
    let token = r
        .token_file
        .map(|p| BearerToken::from_file(&p))
        .transpose()
        .map_err(|e| field_err("activity_report.token_file", e.to_string()))?;
    Ok(Some(ActivityReportConfig {
        endpoint: r.endpoint,
        interval: Duration::from_millis(r.interval_ms),
        token,
    }))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawHeaderKeys {
    Preset(String),
    Custom(RawHeaderNames),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderNames {
    id: String,
    port: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
enum RawRouteSource {
    File {
        path: PathBuf,
        #[serde(default = "default_poll_ms")]
        poll_interval_ms: u64,
    },
    Kubernetes {
        #[serde(default)]
        namespaces: Vec<String>,
        #[serde(default = "default_label")]
        label: String,
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
        #[serde(default = "default_pod_port")]
        default_port: u16,
    },
}

fn default_label() -> String {
    crate::contract::SANDBOX_ID_LABEL.into()
}
fn default_pod_port() -> u16 {
    crate::contract::DEFAULT_PORT
}

fn default_header_keys() -> RawHeaderKeys {
    RawHeaderKeys::Preset("default".into())
}
fn default_miss_hold_ms() -> u64 {
    500
}
fn default_retry_after_s() -> u32 {
    1
}
/// The gateway's token header when `access_token_header` is not given. The `e2b` preset uses
/// E2B's gateway token header, so envd's own `X-Access-Token` passes through to the sandbox
/// untouched (the gateway strips its token header from every request).
fn default_token_header(e2b_preset: bool) -> &'static str {
    if e2b_preset {
        "e2b-traffic-access-token"
    } else {
        "x-access-token"
    }
}
fn default_activity_throttle_ms() -> u64 {
    1000
}
fn default_poll_ms() -> u64 {
    200
}
/// 1,000 open streams (WebSockets, SSE, requests in flight) per sandbox and gateway replica:
/// far above what one sandbox's users open (a Jupyter tab holds a few), and low enough that one
/// hung or flooded sandbox takes at most 2% of the 50,000 connections a replica is sized for.
fn default_max_streams_per_sandbox() -> u32 {
    1000
}
/// 10,000 held misses: a held request costs a task and a timer (~1 KiB) besides the stream
/// Envoy keeps anyway.
fn default_max_held_misses() -> usize {
    10_000
}

/// Upper bounds that keep a typo from turning into an hour-long hold.
const MAX_MISS_HOLD_MS: u64 = 30_000;
const MAX_POLL_MS: u64 = 60_000;

impl GatewayConfig {
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(json);
        let raw: RawConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Json {
                path: e.path().to_string(),
                source: e.into_inner(),
            })?;
        let e2b_preset = matches!(&raw.header_keys, RawHeaderKeys::Preset(p) if p == "e2b");
        let headers = match raw.header_keys {
            RawHeaderKeys::Preset(p) => match p.as_str() {
                "default" => Some(HeaderNames::default()),
                "e2b" => Some(HeaderNames::e2b()),
                "off" => None,
                other => {
                    return Err(field_err(
                        "header_keys",
                        format!("unknown preset {other:?}; use \"default\", \"e2b\", \"off\" or {{\"id\": ..., \"port\": ...}}"),
                    ))
                }
            },
            RawHeaderKeys::Custom(n) => {
                check_header_name("header_keys.id", &n.id)?;
                check_header_name("header_keys.port", &n.port)?;
                if n.id == n.port {
                    return Err(field_err("header_keys", "id and port must differ"));
                }
                Some(HeaderNames {
                    id: n.id,
                    port: n.port,
                })
            }
        };
        for d in &raw.host_domains {
            check_domain(d)?;
        }
        if let Some(p) = &raw.path_prefix {
            check_path_prefix(p)?;
        }
        if raw.path_prefix_mode.is_some() && raw.path_prefix.is_none() {
            return Err(field_err(
                "path_prefix_mode",
                "has no effect without path_prefix",
            ));
        }
        // An explicit `access_token_header` always wins over the preset's.
        let access_token_header = raw
            .access_token_header
            .unwrap_or_else(|| default_token_header(e2b_preset).into());
        check_header_name("access_token_header", &access_token_header)?;
        if raw.miss_hold_ms > MAX_MISS_HOLD_MS {
            return Err(field_err(
                "miss_hold_ms",
                format!("must be at most {MAX_MISS_HOLD_MS}"),
            ));
        }
        if raw.retry_after_s == 0 || raw.retry_after_s > 3600 {
            return Err(field_err("retry_after_s", "must be from 1 to 3600"));
        }
        if raw.activity_stream_throttle_ms == 0 || raw.activity_stream_throttle_ms > 60_000 {
            return Err(field_err(
                "activity_stream_throttle_ms",
                "must be from 1 to 60000",
            ));
        }
        if raw.max_streams_per_sandbox == 0 || raw.max_streams_per_sandbox > 1_000_000 {
            return Err(field_err(
                "max_streams_per_sandbox",
                "must be from 1 to 1000000",
            ));
        }
        if raw.max_held_misses == 0 || raw.max_held_misses > 1_000_000 {
            return Err(field_err("max_held_misses", "must be from 1 to 1000000"));
        }
        let routes = match raw.route_source {
            RawRouteSource::File {
                path,
                poll_interval_ms,
            } => {
                if path.as_os_str().is_empty() {
                    return Err(field_err("route_source.path", "must not be empty"));
                }
                if poll_interval_ms == 0 || poll_interval_ms > MAX_POLL_MS {
                    return Err(field_err(
                        "route_source.poll_interval_ms",
                        format!("must be from 1 to {MAX_POLL_MS}"),
                    ));
                }
                RouteSourceConfig::File {
                    path,
                    poll_interval: Duration::from_millis(poll_interval_ms),
                }
            }
            RawRouteSource::Kubernetes {
                namespaces,
                label,
                kubeconfig,
                default_port,
            } => {
                for ns in &namespaces {
                    if validate_id(ns.as_bytes()).is_err() {
                        return Err(field_err(
                            "route_source.namespaces",
                            format!("{ns:?} is not a namespace name"),
                        ));
                    }
                }
                if label.is_empty() || label.contains(['=', ',', '!', ' ']) {
                    return Err(field_err(
                        "route_source.label",
                        format!("{label:?} is not a label key"),
                    ));
                }
                if default_port == 0 {
                    return Err(field_err(
                        "route_source.default_port",
                        "must be from 1 to 65535",
                    ));
                }
                RouteSourceConfig::Kubernetes(KubeSourceConfig {
                    namespaces,
                    label,
                    kubeconfig,
                    default_port,
                })
            }
        };
        let wake = wake(raw.wake, &routes)?;
        Ok(GatewayConfig {
            wake,
            keys: KeyConfig {
                headers,
                host_domains: raw.host_domains,
                path_prefix: raw.path_prefix,
            },
            path_prefix_mode: raw.path_prefix_mode.unwrap_or_default(),
            upstream_host: raw.upstream_host,
            routes,
            miss_hold: Duration::from_millis(raw.miss_hold_ms),
            retry_after_secs: raw.retry_after_s,
            access_token_header,
            activity_stream_throttle: Duration::from_millis(raw.activity_stream_throttle_ms),
            activity_report: activity_report(raw.activity_report)?,
            max_streams_per_sandbox: raw.max_streams_per_sandbox,
            max_held_misses: raw.max_held_misses,
        })
    }
}

/// Envoy stores header names lowercase; a name with uppercase would never match.
fn check_header_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(field_err(
            field,
            format!("{name:?} is not a lowercase HTTP header name"),
        ))
    }
}

fn check_domain(d: &str) -> Result<(), ConfigError> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(field_err(
            "host_domains",
            format!("{d:?} is not a lowercase DNS name (no leading dot, no port)"),
        ))
    }
}

fn check_path_prefix(p: &str) -> Result<(), ConfigError> {
    let ok = p.len() > 1
        && p.starts_with('/')
        && !p.ends_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    if ok {
        Ok(())
    } else {
        Err(field_err(
            "path_prefix",
            format!("{p:?} must start with '/', not end with '/', and have no query"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GatewayConfig, String> {
        GatewayConfig::from_json(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"{"route_source": {"type": "file", "path": "/tmp/r.json"}}"#).unwrap();
        assert_eq!(c.keys.headers, Some(HeaderNames::default()));
        assert!(c.keys.host_domains.is_empty());
        assert_eq!(c.keys.path_prefix, None);
        assert_eq!(c.miss_hold, Duration::from_millis(500));
        assert_eq!(c.retry_after_secs, 1);
        assert_eq!(c.access_token_header, "x-access-token");
        assert_eq!(c.activity_report, None);
        // Today's forwarding: the prefix stripped, the client's Host kept.
        assert_eq!(c.path_prefix_mode, PathPrefixMode::Strip);
        assert_eq!(c.upstream_host, UpstreamHost::Keep);
        let r = parse(
            r#"{"route_source": {"type": "file", "path": "/r"}, "activity_report": {"endpoint": "http://127.0.0.1:18090"}}"#,
        )
        .unwrap();
        assert_eq!(
            r.activity_report,
            Some(ActivityReportConfig {
                endpoint: "http://127.0.0.1:18090".into(),
                interval: Duration::from_millis(1000),
                token: None,
            })
        );
        assert_eq!(
            c.routes,
            RouteSourceConfig::File {
                path: "/tmp/r.json".into(),
                poll_interval: Duration::from_millis(200)
            }
        );
    }

    #[test]
    fn kubernetes_source_defaults() {
        let c = parse(r#"{"route_source": {"type": "kubernetes"}}"#).unwrap();
        assert_eq!(
            c.routes,
            RouteSourceConfig::Kubernetes(KubeSourceConfig {
                namespaces: vec![],
                label: crate::contract::SANDBOX_ID_LABEL.into(),
                kubeconfig: None,
                default_port: crate::contract::DEFAULT_PORT,
            })
        );
    }

    #[test]
    fn wake_defaults() {
        let c = parse(
            r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "http://ctl.ns.svc:9090"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.wake,
            Some(WakeConfig {
                endpoint: "http://ctl.ns.svc:9090".into(),
                token: None,
                timeout: Duration::from_secs(30),
                max_held: 10_000,
            })
        );
        assert_eq!(
            parse(r#"{"route_source": {"type": "kubernetes"}}"#)
                .unwrap()
                .wake,
            None
        );
    }

    #[test]
    fn presets_and_custom_headers() {
        let base = r#""route_source": {"type": "file", "path": "/r"}"#;
        let c = parse(&format!(r#"{{"header_keys": "e2b", {base}}}"#)).unwrap();
        assert_eq!(c.keys.headers, Some(HeaderNames::e2b()));
        // The e2b preset's token is E2B's gateway token, never envd's own `X-Access-Token`.
        assert_eq!(c.access_token_header, "e2b-traffic-access-token");
        // An explicit header wins over the preset's, whichever order they come in.
        let c = parse(&format!(
            r#"{{"access_token_header": "x-gw-token", "header_keys": "e2b", {base}}}"#
        ))
        .unwrap();
        assert_eq!(c.access_token_header, "x-gw-token");
        let c = parse(&format!(r#"{{"header_keys": "default", {base}}}"#)).unwrap();
        assert_eq!(c.access_token_header, "x-access-token");
        let c = parse(&format!(r#"{{"header_keys": "off", {base}}}"#)).unwrap();
        assert_eq!(c.keys.headers, None);
        let c = parse(&format!(
            r#"{{"header_keys": {{"id": "x-box", "port": "x-box-port"}}, {base}}}"#
        ))
        .unwrap();
        assert_eq!(c.keys.headers.unwrap().id, "x-box");
    }

    #[test]
    fn forwarding_options() {
        let base = r#""route_source": {"type": "file", "path": "/r"}, "path_prefix": "/s""#;
        let c = parse(&format!(r#"{{"path_prefix_mode": "keep", {base}}}"#)).unwrap();
        assert_eq!(c.path_prefix_mode, PathPrefixMode::Keep);
        let c = parse(&format!(r#"{{"path_prefix_mode": "strip", {base}}}"#)).unwrap();
        assert_eq!(c.path_prefix_mode, PathPrefixMode::Strip);
        let c = parse(&format!(r#"{{"upstream_host": "localhost", {base}}}"#)).unwrap();
        assert_eq!(c.upstream_host, UpstreamHost::Localhost);
        let c = parse(&format!(r#"{{"upstream_host": "keep", {base}}}"#)).unwrap();
        assert_eq!(c.upstream_host, UpstreamHost::Keep);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "bogus": 1}"#,
                "bogus",
            ),
            (r#"{}"#, "route_source"),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "miss_hold_ms": 999999}"#,
                "miss_hold_ms",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "miss_hold_ms": -1}"#,
                "miss_hold_ms",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "host_domains": ["Sandbox.Local"]}"#,
                "host_domains",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "host_domains": [".x.io"]}"#,
                "host_domains",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "path_prefix": "sandboxes"}"#,
                "path_prefix",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "header_keys": "nope"}"#,
                "header_keys",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "path_prefix": "/s", "path_prefix_mode": "drop"}"#,
                "path_prefix_mode",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "path_prefix_mode": "keep"}"#,
                "path_prefix_mode",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "upstream_host": "127.0.0.1"}"#,
                "upstream_host",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "header_keys": {"id": "X-Id", "port": "p"}}"#,
                "header_keys.id",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "access_token_header": ""}"#,
                "access_token_header",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "retry_after_s": 0}"#,
                "retry_after_s",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r", "poll_interval_ms": 0}}"#,
                "poll_interval_ms",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r", "extra": true}}"#,
                "extra",
            ),
            (r#"{"route_source": {"type": "kube"}}"#, "kube"),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "activity_report": {"endpoint": "127.0.0.1:1"}}"#,
                "activity_report.endpoint",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "activity_report": {"endpoint": "http://x:1", "interval_ms": 5}}"#,
                "activity_report.interval_ms",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "activity_report": {"endpoint": "http://x:1", "every": 5}}"#,
                "every",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "activity_report": {"endpoint": "http://x:1", "token_file": "/nonexistent/token"}}"#,
                "activity_report.token_file",
            ),
            (
                r#"{"route_source": {"type": "kubernetes", "namespaces": ["Bad_NS"]}}"#,
                "route_source.namespaces",
            ),
            (
                r#"{"route_source": {"type": "kubernetes", "label": "a=b"}}"#,
                "route_source.label",
            ),
            (
                r#"{"route_source": {"type": "kubernetes", "default_port": 0}}"#,
                "default_port",
            ),
            (
                r#"{"route_source": {"type": "kubernetes", "bogus": 1}}"#,
                "bogus",
            ),
            (
                r#"{"route_source": {"type": "file", "path": "/r"}, "wake": {"endpoint": "http://c:9090"}}"#,
                "wake",
            ),
            (
                r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "c:9090"}}"#,
                "wake.endpoint",
            ),
            (
                r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "http://c"}}"#,
                "wake.endpoint",
            ),
            (
                r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "http://c:1", "timeout_ms": 999999}}"#,
                "wake.timeout_ms",
            ),
            (
                r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "http://c:1", "max_held": 0}}"#,
                "wake.max_held",
            ),
            (
                r#"{"route_source": {"type": "kubernetes"}, "wake": {"endpoint": "http://c:1", "token_file": "/nonexistent/t"}}"#,
                "wake.token_file",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err(json);
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn activity_report_token_file_is_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let cfg = |p: &std::path::Path| {
            format!(
                r#"{{"route_source": {{"type": "file", "path": "/r"}}, "activity_report": {{"endpoint": "http://x:1", "token_file": {p:?}}}}}"#
            )
        };
        std::fs::write(&path, "tok-1\n").unwrap();
        let c = parse(&cfg(&path)).unwrap();
        let token = c.activity_report.unwrap().token.unwrap();
        assert_eq!(token.authorization(), "Bearer tok-1");
        // Changing the file later changes nothing: it was read once.
        std::fs::write(&path, "").unwrap();
        assert!(token.accepts(b"Bearer tok-1"));
        let e = parse(&cfg(&path)).unwrap_err();
        assert!(
            e.contains("activity_report.token_file") && e.contains("empty"),
            "{e}"
        );
    }
}
