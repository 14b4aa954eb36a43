//! Kubernetes route source: `kube`'s watcher (list + watch with bookmarks, exponential backoff
//! with jitter) on labelled Pods, feeding the route table through `PodIndex`. Pods are read as
//! [`RoutePod`]s (only the fields a route needs), listed in pages of 500.
//!
//! With `wake` configured it also watches paused `Sandbox` objects (label `sandboxgateway.io/paused`,
//! metadata only) into the table's paused set; the table is synced once both watches are.
//!
//! Fault behaviour: the table keeps serving the last known routes while the API server is
//! unreachable or a watch is being re-established; a relist replaces the view only once it is
//! complete. Memory stays flat while disconnected: the watcher buffers nothing, and the index
//! holds one record per pod plus a bounded set of tombstones.

use crate::config::KubeSourceConfig;
use crate::contract::{PORT_ANNOTATION, TOKEN_SHA256_ANNOTATION};
use crate::key::validate_id;
use crate::paused::{paused_entry, PausedSandbox, PAUSED_LABEL};
use crate::pod_index::{Change, PodIndex, PodInfo};
use crate::route_pod::RoutePod;
use crate::stats::SourceStats;
use crate::table::RouteTable;
use crate::token::parse_sha256_hex;
use futures_util::StreamExt;
use kube::runtime::watcher::{self, Event, ListSemantic};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster Kubernetes config unavailable (set route_source.kubeconfig to run outside a cluster): {0}")]
    InCluster(kube::config::InClusterError),
}

/// How to reach the API server, resolved at config load so a bad kubeconfig fails the config.
pub enum Access {
    Kubeconfig(Box<kube::config::Kubeconfig>),
    InCluster(Box<kube::Config>),
}

pub fn access(cfg: &KubeSourceConfig) -> Result<Access, KubeSourceError> {
    match &cfg.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path)
            .map(|k| Access::Kubeconfig(Box::new(k)))
            .map_err(|source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            }),
        None => kube::Config::incluster()
            .map(|c| Access::InCluster(Box::new(c)))
            .map_err(KubeSourceError::InCluster),
    }
}

/// Reads what the route contract needs from a Pod. `None` if the pod has no UID (not a real
/// object). A pod with a malformed label or annotation is kept but never routable: a bad token
/// annotation must not open a sandbox, a bad port must not guess one.
pub fn pod_info(pod: &RoutePod, label: &str, default_port: u16) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let uid: Arc<str> = meta.uid.as_deref()?.into();
    let namespace: Arc<str> = meta.namespace.as_deref().unwrap_or("").into();
    let key: Arc<str> = format!("{}/{}", namespace, meta.name.as_deref().unwrap_or("")).into();
    let mut routable = true;
    let sandbox_id = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(label))
        .and_then(|id| match validate_id(id.as_bytes()) {
            Ok(_) => Some(id.clone()),
            Err(_) => {
                tracing::warn!(pod = %key, id = %id, "sandbox id label is not a valid id; pod ignored");
                None
            }
        });
    let annotations = meta.annotations.as_ref();
    let port = match annotations.and_then(|a| a.get(PORT_ANNOTATION)) {
        None => default_port,
        Some(p) => match crate::key::parse_port(p.as_bytes()) {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(pod = %key, port = %p, "bad port annotation; pod not routable");
                routable = false;
                default_port
            }
        },
    };
    let token_sha256 = match annotations.and_then(|a| a.get(TOKEN_SHA256_ANNOTATION)) {
        None => None,
        Some(h) => {
            let parsed = parse_sha256_hex(h);
            if parsed.is_none() {
                tracing::warn!(pod = %key, "bad access-token annotation; pod not routable");
                routable = false;
            }
            parsed
        }
    };
    // A host-network pod's IP is its node's, shared with everything else on the node.
    let ip = pod
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .filter(|_| !pod.host_network && routable);
    Some(PodInfo {
        uid,
        key,
        namespace,
        resource_version: meta
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        sandbox_id,
        ip,
        port,
        ready: pod.ready,
        deleting: meta.deletion_timestamp.is_some(),
        token_sha256,
    })
}

fn apply(table: &RouteTable, changes: Vec<Change>) {
    for c in changes {
        match c {
            Change::Upsert(spec) => {
                table.upsert(spec);
            }
            Change::Remove(id) => {
                table.remove(&id);
            }
        }
    }
}

/// One event of either watch.
enum Ev {
    Pod(Result<Event<RoutePod>, watcher::Error>),
    Paused(Result<Event<PausedSandbox>, watcher::Error>),
}

/// Which watch, over which namespace (`None`: all): each must list once before the table is
/// synced.
type Scope = (bool, Option<String>);

/// The paused set as the marker watch builds it: each marked `Sandbox` (by UID) with its ID and
/// marker, every marker naming each ID (so an object that forges another sandbox's ID adds a
/// marker, with its own token, beside the real one instead of replacing it), and the UIDs seen by
/// a relist in progress.
#[derive(Default)]
struct PausedView {
    by_uid: HashMap<String, (String, String)>,
    by_id: HashMap<String, std::collections::BTreeMap<String, crate::table::Paused>>,
    relist: HashMap<Option<String>, HashSet<String>>,
}

impl PausedView {
    fn apply(&mut self, table: &RouteTable, s: &PausedSandbox, scope: &Option<String>) {
        let Some(uid) = s.metadata.uid.clone() else {
            return;
        };
        if let Some(seen) = self.relist.get_mut(scope) {
            seen.insert(uid.clone());
        }
        match paused_entry(s) {
            Some((id, p)) => {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                if let Some((old, _)) = self.by_uid.insert(uid.clone(), (id.clone(), ns)) {
                    if old != id {
                        self.unmark(table, &old, &uid);
                    }
                }
                self.by_id.entry(id.clone()).or_default().insert(uid, p);
                self.publish(table, &id);
            }
            None => self.delete(table, &uid),
        }
    }

    fn unmark(&mut self, table: &RouteTable, id: &str, uid: &str) {
        if let Some(marks) = self.by_id.get_mut(id) {
            marks.remove(uid);
            if marks.is_empty() {
                self.by_id.remove(id);
            }
        }
        self.publish(table, id);
    }

    fn publish(&self, table: &RouteTable, id: &str) {
        let marks = self
            .by_id
            .get(id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        table.set_paused(id, marks);
    }

    fn delete(&mut self, table: &RouteTable, uid: &str) {
        if let Some((id, _)) = self.by_uid.remove(uid) {
            self.unmark(table, &id, uid);
        }
    }

    fn end_relist(&mut self, table: &RouteTable, scope: &Option<String>) {
        let Some(seen) = self.relist.remove(scope) else {
            return;
        };
        let gone: Vec<String> = self
            .by_uid
            .iter()
            .filter(|(uid, (_, ns))| !seen.contains(*uid) && scope.as_ref().is_none_or(|s| s == ns))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.delete(table, &uid);
        }
    }
}

/// Watches until the runtime shuts down. Never returns on API errors: the watcher backs off and
/// retries, and the table keeps its routes meanwhile.
pub async fn run(
    cfg: KubeSourceConfig,
    access: Access,
    table: Arc<RouteTable>,
    stats: Arc<SourceStats>,
) {
    run_with(cfg, access, table, stats, false).await
}

/// [`run`], and with `paused` the paused-marker watch too.
pub async fn run_with(
    cfg: KubeSourceConfig,
    access: Access,
    table: Arc<RouteTable>,
    stats: Arc<SourceStats>,
    paused: bool,
) {
    let client = loop {
        let config = match &access {
            Access::InCluster(c) => Ok((**c).clone()),
            Access::Kubeconfig(kc) => {
                kube::Config::from_custom_kubeconfig((**kc).clone(), &Default::default()).await
            }
        };
        match config
            .map_err(|e| e.to_string())
            .and_then(|c| Client::try_from(c).map_err(|e| e.to_string()))
        {
            Ok(c) => break c,
            Err(e) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "building the Kubernetes client; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let wc = watcher::Config::default()
        .labels(&cfg.label)
        // Consistent lists: a relist from a stale API-server cache could re-add deleted pods.
        .list_semantic(ListSemantic::MostRecent);
    let scopes: Vec<Option<String>> = if cfg.namespaces.is_empty() {
        vec![None]
    } else {
        cfg.namespaces.iter().cloned().map(Some).collect()
    };
    let mut streams: Vec<futures_util::stream::BoxStream<'static, (Scope, Ev)>> = Vec::new();
    for scope in &scopes {
        let api: Api<RoutePod> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let key: Scope = (false, scope.clone());
        streams.push(
            watcher::watcher(api, wc.clone())
                .default_backoff()
                .map(move |ev| (key.clone(), Ev::Pod(ev)))
                .boxed(),
        );
        if paused {
            let api: Api<PausedSandbox> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let pc = watcher::Config::default()
                .labels(PAUSED_LABEL)
                .list_semantic(ListSemantic::MostRecent);
            let key: Scope = (true, scope.clone());
            streams.push(
                watcher::watcher(api, pc)
                    .default_backoff()
                    .map(move |ev| (key.clone(), Ev::Paused(ev)))
                    .boxed(),
            );
        }
    }
    let mut events = futures_util::stream::select_all(streams);
    let mut index = PodIndex::default();
    let mut marks = PausedView::default();
    let mut unsynced: HashSet<Scope> = scopes
        .iter()
        .flat_map(|s| [(false, s.clone()), (true, s.clone())])
        .filter(|(p, _)| paused || !p)
        .collect();
    while let Some((key, ev)) = events.next().await {
        let ev = match ev {
            Ev::Pod(ev) => ev,
            Ev::Paused(ev) => {
                let scope = &key.1;
                match ev {
                    Ok(Event::Init) => {
                        marks.relist.insert(scope.clone(), HashSet::new());
                    }
                    Ok(Event::InitApply(s)) | Ok(Event::Apply(s)) => marks.apply(&table, &s, scope),
                    Ok(Event::Delete(s)) => {
                        if let Some(uid) = s.metadata.uid.as_deref() {
                            marks.delete(&table, uid);
                        }
                    }
                    Ok(Event::InitDone) => {
                        marks.end_relist(&table, scope);
                        if unsynced.remove(&key) && unsynced.is_empty() {
                            table.mark_synced();
                            tracing::info!(
                                routes = table.len(),
                                paused = table.paused_len(),
                                "Kubernetes routes synced"
                            );
                        }
                    }
                    Err(e) => {
                        stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, namespace = ?scope,
                            "paused-sandbox watch failed; keeping the current set and retrying");
                    }
                }
                continue;
            }
        };
        let scope = key.1.clone();
        let changes = match ev {
            Ok(Event::Init) => {
                stats.relists.fetch_add(1, Ordering::Relaxed);
                index.begin_relist(scope.as_deref());
                Vec::new()
            }
            Ok(Event::InitApply(pod)) | Ok(Event::Apply(pod)) => {
                match pod_info(&pod, &cfg.label, cfg.default_port) {
                    Some(info) => index.apply(info),
                    None => Vec::new(),
                }
            }
            Ok(Event::Delete(pod)) => match pod_info(&pod, &cfg.label, cfg.default_port) {
                // Deleted, or left the label selector: the event can't say which (see PodIndex).
                Some(info) => index.delete(&info.uid, info.resource_version),
                None => Vec::new(),
            },
            Ok(Event::InitDone) => {
                let changes = index.end_relist(scope.as_deref());
                if unsynced.remove(&key) && unsynced.is_empty() {
                    // Apply first, then open the doors: misses now mean "no such sandbox".
                    apply(&table, changes);
                    table.mark_synced();
                    tracing::info!(
                        routes = table.len(),
                        pods = index.len(),
                        "Kubernetes routes synced"
                    );
                    publish(&stats, &index, &table);
                    continue;
                }
                changes
            }
            Err(e) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, namespace = ?scope, "pod watch failed; keeping current routes and retrying");
                Vec::new()
            }
        };
        apply(&table, changes);
        publish(&stats, &index, &table);
    }
}

fn publish(stats: &SourceStats, index: &PodIndex, table: &RouteTable) {
    stats.routes.store(table.len(), Ordering::Relaxed);
    stats
        .conflicts
        .store(index.stats.conflicts, Ordering::Relaxed);
    stats
        .ip_fenced
        .store(index.stats.ip_fenced, Ordering::Relaxed);
    stats
        .stale_ignored
        .store(index.stats.stale_ignored, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra_meta: serde_json::Value, status: serde_json::Value) -> RoutePod {
        let mut meta = json!({
            "name": "sb-1", "namespace": "team", "uid": "uid-1", "resourceVersion": "42",
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {"sandboxgateway.io/sandbox-id": "alpha"}
        });
        if let (Some(m), Some(e)) = (meta.as_object_mut(), extra_meta.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": []}, "status": status}))
            .unwrap()
    }

    fn ready(ip: &str) -> serde_json::Value {
        json!({"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]})
    }

    const LABEL: &str = crate::contract::SANDBOX_ID_LABEL;

    #[test]
    fn reads_the_route_contract() {
        let sha = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
        let p = pod(
            json!({"annotations": {PORT_ANNOTATION: "3000", TOKEN_SHA256_ANNOTATION: sha}}),
            ready("10.1.2.3"),
        );
        let i = pod_info(&p, LABEL, 8080).unwrap();
        assert_eq!(&*i.uid, "uid-1");
        assert_eq!(&*i.key, "team/sb-1");
        assert_eq!(i.resource_version, 42);
        assert_eq!(i.created, 1_793_527_200);
        assert_eq!(i.sandbox_id.as_deref(), Some("alpha"));
        assert_eq!(i.ip, Some("10.1.2.3".parse().unwrap()));
        assert_eq!((i.port, i.ready, i.deleting), (3000, true, false));
        assert_eq!(i.token_sha256, parse_sha256_hex(sha));
    }

    #[test]
    fn not_ready_no_ip_deleting_and_defaults() {
        let i = pod_info(&pod(json!({}), json!({"podIP": "10.0.0.1"})), LABEL, 8080).unwrap();
        assert!(!i.ready);
        assert_eq!(i.port, 8080);
        let i = pod_info(
            &pod(
                json!({}),
                json!({"conditions": [{"type": "Ready", "status": "True"}]}),
            ),
            LABEL,
            1,
        )
        .unwrap();
        assert_eq!(i.ip, None);
        let i = pod_info(
            &pod(
                json!({"deletionTimestamp": "2026-11-01T10:05:00Z"}),
                ready("10.0.0.1"),
            ),
            LABEL,
            1,
        )
        .unwrap();
        assert!(i.deleting);
        let no_uid = pod(json!({"uid": null}), ready("10.0.0.1"));
        assert!(pod_info(&no_uid, LABEL, 1).is_none());
    }

    #[test]
    fn malformed_metadata_is_never_routable() {
        let bad_id = pod(json!({"labels": {LABEL: "Not_Valid"}}), ready("10.0.0.1"));
        assert_eq!(pod_info(&bad_id, LABEL, 1).unwrap().sandbox_id, None);
        let bad_port = pod(
            json!({"annotations": {PORT_ANNOTATION: "http"}}),
            ready("10.0.0.1"),
        );
        assert_eq!(pod_info(&bad_port, LABEL, 1).unwrap().ip, None);
        let bad_token = pod(
            json!({"annotations": {TOKEN_SHA256_ANNOTATION: "xyz"}}),
            ready("10.0.0.1"),
        );
        assert_eq!(pod_info(&bad_token, LABEL, 1).unwrap().ip, None);
        let mut host_net = pod(json!({}), ready("10.0.0.1"));
        host_net.host_network = true;
        assert_eq!(pod_info(&host_net, LABEL, 1).unwrap().ip, None);
    }
}
