//! `sandbox-extproc last-active`: asks one or more replicas and prints the max per sandbox, as a
//! table for people or JSON for scripts.

use proto::v1::activity_service_client::ActivityServiceClient;
use proto::v1::GetLastActiveRequest;
use routing::bearer::{BearerToken, AUTHORIZATION};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("the bearer token cannot be sent as gRPC metadata")]
    Token,
    #[error("{endpoint}: {source}")]
    Call {
        endpoint: String,
        source: tonic::Status,
    },
}

/// One replica's answer.
#[derive(Debug, Clone)]
pub struct ReplicaAnswer {
    pub endpoint: String,
    pub replica: String,
    pub collecting_since_ms: u64,
    /// Entries the replica dropped since it started (table full); a change between two passes
    /// means it may have lost a sandbox's activity.
    pub evicted_total: u64,
    /// Unix ms of its latest eviction, 0 = never.
    pub last_eviction_ms: u64,
}

/// The merged view: per sandbox, the max over every replica that answered.
#[derive(Debug, Clone, Default)]
pub struct LastActive {
    pub replicas: Vec<ReplicaAnswer>,
    pub sandboxes: BTreeMap<String, u64>,
    /// Asked for but unknown to every replica.
    pub unknown: Vec<String>,
}

/// Queries every endpoint. Any failure is an error: a partial answer could make a caller think a
/// busy sandbox is idle (docs/design.md#last-active-semantics: never a false release).
pub async fn last_active(
    endpoints: &[String],
    ids: &[String],
    timeout: Duration,
    token: Option<&BearerToken>,
) -> Result<LastActive, CliError> {
    let auth: Option<tonic::metadata::AsciiMetadataValue> = token
        .map(|t| t.authorization().parse().map_err(|_| CliError::Token))
        .transpose()?;
    let mut out = LastActive::default();
    let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
    for endpoint in endpoints {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|source| CliError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|source| CliError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        let mut req = tonic::Request::new(GetLastActiveRequest {
            sandbox_ids: ids.to_vec(),
        });
        if let Some(v) = &auth {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        let resp = ActivityServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .get_last_active(req)
            .await
            .map_err(|source| CliError::Call {
                endpoint: endpoint.clone(),
                source,
            })?
            .into_inner();
        for e in resp.entries {
            let v = out.sandboxes.entry(e.sandbox_id).or_insert(0);
            *v = (*v).max(e.last_active_ms);
        }
        for id in resp.unknown_ids {
            *unknown.entry(id).or_insert(0) += 1;
        }
        out.replicas.push(ReplicaAnswer {
            endpoint: endpoint.clone(),
            replica: resp.replica,
            collecting_since_ms: resp.collecting_since_ms,
            evicted_total: resp.evicted_total,
            last_eviction_ms: resp.last_eviction_ms,
        });
    }
    out.unknown = unknown
        .into_iter()
        .filter(|(id, _)| !out.sandboxes.contains_key(id))
        .map(|(id, _)| id)
        .collect();
    Ok(out)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn to_json(la: &LastActive) -> serde_json::Value {
    serde_json::json!({
        "replicas": la.replicas.iter().map(|r| serde_json::json!({
            "endpoint": r.endpoint,
            "replica": r.replica,
            "collecting_since_ms": r.collecting_since_ms,
            "evicted_total": r.evicted_total,
            "last_eviction_ms": r.last_eviction_ms,
        })).collect::<Vec<_>>(),
        "sandboxes": la.sandboxes.iter().map(|(id, ms)| serde_json::json!({
            "sandbox_id": id, "last_active_ms": ms,
        })).collect::<Vec<_>>(),
        "unknown_ids": la.unknown,
    })
}

pub fn to_table(la: &LastActive) -> String {
    use std::fmt::Write as _;
    let now = now_ms();
    let mut s = String::new();
    for r in &la.replicas {
        let _ = writeln!(
            s,
            "# replica {} ({}) collecting since {}",
            r.replica,
            r.endpoint,
            rfc3339(r.collecting_since_ms)
        );
        if r.evicted_total > 0 {
            let _ = writeln!(
                s,
                "# replica {} EVICTED {} entries (table full), latest at {}: its answer may miss sandboxes",
                r.replica,
                r.evicted_total,
                rfc3339(r.last_eviction_ms)
            );
        }
    }
    let w = la
        .sandboxes
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = writeln!(s, "{:<w$}  {:<24}  IDLE", "SANDBOX", "LAST ACTIVE (UTC)");
    for (id, ms) in &la.sandboxes {
        let idle = Duration::from_secs(now.saturating_sub(*ms) / 1000);
        let _ = writeln!(
            s,
            "{id:<w$}  {:<24}  {}",
            rfc3339(*ms),
            humantime::format_duration(idle)
        );
    }
    for id in &la.unknown {
        let _ = writeln!(s, "{id:<w$}  {:<24}  -", "unknown");
    }
    s
}
