//! File route source: a JSON routes file, re-read when it changes.
//!
//! The embedded default. Polling (not inotify) so it works the same for in-place edits, atomic
//! renames and Kubernetes ConfigMap symlink swaps. A bad edit is logged and ignored: the last good
//! table keeps serving. The file must be valid at start, so a gateway never starts half-routed.

use crate::key::validate_id;
use crate::stats::SourceStats;
use crate::table::{RouteSpec, RouteTable};
use crate::token::parse_sha256_hex;
use serde::Deserialize;
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum RouteFileError {
    #[error("routes file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("routes file {path}: {path_in_json}: {source}")]
    Json {
        path: PathBuf,
        path_in_json: String,
        source: serde_json::Error,
    },
    #[error("routes file {path}: sandboxes[{index}] ({id:?}): {reason}")]
    Invalid {
        path: PathBuf,
        index: usize,
        id: String,
        reason: &'static str,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sandboxes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    id: String,
    ip: IpAddr,
    port: u16,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    access_token_sha256: Option<String>,
}

fn yes() -> bool {
    true
}

/// Parses and validates a routes file. All-or-nothing: one bad entry rejects the file.
pub fn parse_routes(path: &Path, bytes: &[u8]) -> Result<Vec<RouteSpec>, RouteFileError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| RouteFileError::Json {
        path: path.to_owned(),
        path_in_json: e.path().to_string(),
        source: e.into_inner(),
    })?;
    let mut seen = HashSet::with_capacity(raw.sandboxes.len());
    let mut out = Vec::with_capacity(raw.sandboxes.len());
    for (index, r) in raw.sandboxes.into_iter().enumerate() {
        let invalid = |reason| RouteFileError::Invalid {
            path: path.to_owned(),
            index,
            id: r.id.clone(),
            reason,
        };
        if validate_id(r.id.as_bytes()).is_err() {
            return Err(invalid(
                "id is not a lowercase DNS label (1-63 chars of a-z, 0-9, '-')",
            ));
        }
        if r.port == 0 {
            return Err(invalid("port must be from 1 to 65535"));
        }
        if r.ip.is_unspecified() || r.ip.is_multicast() {
            return Err(invalid("ip must be a unicast address"));
        }
        let token_sha256 = match &r.access_token_sha256 {
            None => None,
            Some(h) => Some(
                parse_sha256_hex(h)
                    .ok_or_else(|| invalid("access_token_sha256 must be 64 hex digits"))?,
            ),
        };
        if !seen.insert(r.id.clone()) {
            return Err(invalid("duplicate id"));
        }
        out.push(RouteSpec {
            id: r.id,
            ip: r.ip,
            port: r.port,
            ready: r.ready,
            token_sha256,
            pod_uid: None,
            resource_version: 0,
        });
    }
    Ok(out)
}

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn signature(path: &Path) -> std::io::Result<Signature> {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows symlinks, so a ConfigMap `..data` swap changes the inode we see.
    let m = std::fs::metadata(path)?;
    Ok(Signature {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// What one poll did.
#[derive(Debug, PartialEq, Eq)]
pub enum PollOutcome {
    Unchanged,
    Applied {
        upserted: usize,
        removed: usize,
    },
    /// The file is unreadable or invalid; the previous routes stay.
    Rejected,
}

pub struct FileSource {
    path: PathBuf,
    table: Arc<RouteTable>,
    stats: Arc<SourceStats>,
    last_sig: Option<Signature>,
    last_hash: Option<u64>,
    ids: HashSet<String>,
}

impl FileSource {
    /// Loads the file into `table`. Fails if it is missing or invalid.
    pub fn open(
        path: PathBuf,
        table: Arc<RouteTable>,
        stats: Arc<SourceStats>,
    ) -> Result<Self, RouteFileError> {
        let mut src = FileSource {
            path,
            table,
            stats,
            last_sig: None,
            last_hash: None,
            ids: HashSet::new(),
        };
        let sig = signature(&src.path).map_err(|e| src.io_err(e))?;
        src.reload(sig)?;
        Ok(src)
    }

    fn io_err(&self, source: std::io::Error) -> RouteFileError {
        RouteFileError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Checks the file and applies it if it changed.
    pub fn poll_once(&mut self) -> PollOutcome {
        let sig = match signature(&self.path) {
            Ok(s) => s,
            Err(e) => {
                if self.last_sig.take().is_some() {
                    self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "routes file unreadable; keeping the last good routes");
                }
                return PollOutcome::Rejected;
            }
        };
        if self.last_sig == Some(sig) {
            return PollOutcome::Unchanged;
        }
        match self.reload(sig) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "routes file rejected; keeping the last good routes");
                PollOutcome::Rejected
            }
        }
    }

    fn reload(&mut self, sig: Signature) -> Result<PollOutcome, RouteFileError> {
        // Remember the signature even if the content is bad, so a bad edit is reported once.
        self.last_sig = Some(sig);
        let bytes = std::fs::read(&self.path).map_err(|e| self.io_err(e))?;
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let hash = h.finish();
        if self.last_hash == Some(hash) {
            return Ok(PollOutcome::Unchanged);
        }
        let specs = parse_routes(&self.path, &bytes)?;
        self.last_hash = Some(hash);
        let new_ids: HashSet<String> = specs.iter().map(|s| s.id.clone()).collect();
        let mut removed = 0;
        for gone in self.ids.difference(&new_ids) {
            removed += usize::from(self.table.remove(gone));
        }
        let mut upserted = 0;
        for spec in specs {
            upserted += usize::from(self.table.upsert(spec));
        }
        self.stats
            .routes
            .store(new_ids.len() as u64, Ordering::Relaxed);
        self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), routes = new_ids.len(), upserted, removed,
            "routes file applied");
        self.ids = new_ids;
        Ok(PollOutcome::Applied { upserted, removed })
    }

    /// Polls every `interval` until `shutdown` resolves.
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => { self.poll_once(); }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TargetBuf;

    fn write(path: &Path, s: &str) {
        // Write-then-rename, like a careful operator (and like ConfigMap updates).
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, s).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn target(t: &RouteTable, id: &str) -> Option<String> {
        let mut b = TargetBuf::new();
        t.get(id).map(|r| r.target(None, &mut b).to_string())
    }

    #[test]
    fn parse_rejects_bad_entries_with_a_clear_message() {
        let p = Path::new("/r.json");
        let cases = [
            (
                r#"{"sandboxes": [{"id": "A", "ip": "127.0.0.1", "port": 1}]}"#,
                "sandboxes[0]",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "nope", "port": 1}]}"#,
                "sandboxes[0].ip",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 0}]}"#,
                "port",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 70000}]}"#,
                "sandboxes[0].port",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "0.0.0.0", "port": 1}]}"#,
                "unicast",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 1, "x": 1}]}"#,
                "x",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 1, "access_token_sha256": "ab"}]}"#,
                "access_token_sha256",
            ),
            (
                r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 1}, {"id": "a", "ip": "127.0.0.2", "port": 1}]}"#,
                "duplicate",
            ),
            (r#"{"sandboxes": "#, "EOF"),
            (r#"[]"#, "expected struct"),
        ];
        for (json, needle) in cases {
            let e = parse_routes(p, json.as_bytes())
                .expect_err(json)
                .to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn open_requires_a_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        let t = Arc::new(RouteTable::new());
        let stats = Arc::new(SourceStats::default());
        assert!(FileSource::open(path.clone(), t.clone(), stats.clone()).is_err());
        write(&path, "{");
        assert!(FileSource::open(path.clone(), t.clone(), stats.clone()).is_err());
        assert!(t.is_empty());
    }

    #[test]
    fn hot_reload_add_change_remove_and_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        write(
            &path,
            r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.1", "port": 8001},
                              {"id": "b", "ip": "127.0.0.2", "port": 8002}]}"#,
        );
        let t = Arc::new(RouteTable::new());
        let stats = Arc::new(SourceStats::default());
        let mut src = FileSource::open(path.clone(), t.clone(), stats.clone()).unwrap();
        assert_eq!(target(&t, "a").as_deref(), Some("127.0.0.1:8001"));
        assert_eq!(src.poll_once(), PollOutcome::Unchanged);

        // Change a, remove b, add c.
        write(
            &path,
            r#"{"sandboxes": [{"id": "a", "ip": "127.0.0.9", "port": 9001},
                              {"id": "c", "ip": "127.0.0.3", "port": 8003, "ready": false}]}"#,
        );
        assert_eq!(
            src.poll_once(),
            PollOutcome::Applied {
                upserted: 2,
                removed: 1
            }
        );
        assert_eq!(target(&t, "a").as_deref(), Some("127.0.0.9:9001"));
        assert_eq!(target(&t, "b"), None);
        assert!(!t.get("c").unwrap().spec.ready);
        assert_eq!(t.len(), 2);

        // A bad edit changes nothing and is reported once.
        write(&path, r#"{"sandboxes": [{"id": "BAD"}]}"#);
        assert_eq!(src.poll_once(), PollOutcome::Rejected);
        assert_eq!(src.poll_once(), PollOutcome::Unchanged);
        assert_eq!(target(&t, "a").as_deref(), Some("127.0.0.9:9001"));
        assert_eq!(stats.reloads_failed.load(Ordering::Relaxed), 1);

        // A deleted file keeps the routes too.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(src.poll_once(), PollOutcome::Rejected);
        assert_eq!(t.len(), 2);

        // And the next good file applies.
        write(&path, r#"{"sandboxes": []}"#);
        assert!(matches!(
            src.poll_once(),
            PollOutcome::Applied { removed: 2, .. }
        ));
        assert!(t.is_empty());
        assert_eq!(stats.routes.load(Ordering::Relaxed), 0);
    }
}
