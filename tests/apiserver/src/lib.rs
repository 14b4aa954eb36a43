//! A small in-test Kubernetes API server: a generic object store that the real `kube` client,
//! `kube::runtime` watchers and controllers (and kubectl) talk to over plain HTTP on 127.0.0.1.
//! Its own crate so that tests of anything that talks to Kubernetes (the module's route source,
//! the controller) can use it without Envoy or the e2e harness.
//!
//! **Resources** are a table ([`ResourceType`]: group, version, plural, kind, scope,
//! subresources, short names; see [`builtin_resources`]): core v1 pods, secrets, events,
//! services, configmaps, namespaces; `coordination.k8s.io/v1` leases; `discovery.k8s.io/v1`
//! endpointslices; `events.k8s.io/v1` events; and the custom resources
//! `sandboxgateway.io/v1alpha1` `sandboxpools` (status and scale subresources) and `sandboxes`
//! (status). [`FakeApiServer::register_resource`] adds more; an unknown resource is a 404.
//! Paths: `/api/v1/{plural}`, `/api/v1/namespaces/{ns}/{plural}[/{name}[/status|/scale]]` and
//! the same under `/apis/{group}/{version}`.
//!
//! **Reads**, for every resource, faithful where the gateway's route source and kube's watcher
//! depend on them:
//! - get; list and watch with `labelSelector` (`key`, `!key`, `key=value`, `key!=value`, comma
//!   conjunctions), `fieldSelector` (`path=value`, `path!=value` for any dotted path, e.g.
//!   `metadata.name`, as kube's `watch_object` sends), `resourceVersion`,
//!   `resourceVersionMatch`, `limit`/`continue`, `watch`, `allowWatchBookmarks`,
//!   `timeoutSeconds` and `sendInitialEvents`.
//! - Paged lists as the API server pages them: `limit=N` returns at most N matching items and an
//!   opaque `continue` token while more remain; every page of one list comes from the snapshot
//!   the first page was served from (same items, same `resourceVersion`), whatever changes in
//!   between; a token can be sent again for the same page. A token that is not ours is a 400;
//!   one whose snapshot is gone (compacted by [`FakeApiServer::compact`], or evicted: the server
//!   keeps the [`MAX_LIST_SNAPSHOTS`] newest) is a 410 `Expired`, after which kube's watcher
//!   starts a new list.
//! - Every mutation bumps one global resourceVersion. Watches replay logged events newer than the
//!   requested resourceVersion, then stream live ones, filtered like the API server's watch cache:
//!   an update that makes an object stop matching the selector arrives as `DELETED`, one that
//!   makes it start matching as `ADDED`.
//! - A resourceVersion older than the compaction point gets an `ERROR` event with a 410
//!   `Expired` Status, after which kube's watcher relists.
//!
//! **Writes**, with the API server's rules (Status errors as it sends them):
//! - create (`POST`): `generateName` (5 random characters, retried on a collision), `uid`,
//!   `creationTimestamp`, `generation` 1; 409 `AlreadyExists`; a body `resourceVersion` is a 400.
//! - replace (`PUT`) and patch (`PATCH`): a `metadata.resourceVersion` in the body (or left in
//!   the patched object) that is not the stored one is a 409 `Conflict`. Patch types: JSON patch
//!   (RFC 6902, a failed `test` is a 422 `Invalid` as on the real server), merge patch, strategic
//!   merge patch (as a merge patch) and server-side apply (as a merge patch of the JSON body,
//!   field managers ignored, creating a missing object); see the `patch` module. An update that
//!   changes nothing writes nothing (same resourceVersion, no event).
//! - With a `status` subresource, writes to the object keep the stored `status` and writes to
//!   `/status` change only `status` (a create drops `status`). `generation` is bumped when
//!   anything outside `metadata` and `status` changes. `/scale` answers an `autoscaling/v1`
//!   Scale built from the resource's scale paths; `PUT`/`PATCH` of it set the spec replicas.
//! - delete: `preconditions` (`uid`, `resourceVersion`) → 409 on a mismatch; an object with
//!   finalizers only gets a `deletionTimestamp` (`MODIFIED`) and goes (`DELETED`) when an
//!   update empties them; once an object is removed, every object whose `ownerReferences` name
//!   its uid (and has no other owner left) is deleted the same way, like the garbage collector
//!   (synchronously; `Foreground` is treated as `Background`, `Orphan` skips it). Removals answer
//!   a `Success` Status. No `deletecollection`, no grace periods, no dry runs.
//!
//! **Discovery**: `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}` and
//! `/version`, in the unaggregated form; `/openapi/*` is a 404. `kubectl get sbp,sbx` works.
//!
//! **Test controls**: test-side [`FakeApiServer::apply_object`] / [`get_object`] /
//! [`list_objects`] / [`delete_object`] (and the Pod shorthands [`FakeApiServer::apply`],
//! `apply_all`, `get`, `delete`); [`FakeApiServer::inject_conflicts`] and
//! [`FakeApiServer::inject_errors`] (the next n writes to a resource fail with 409 / 500);
//! [`FakeApiServer::set_latency`] (every request); [`FakeApiServer::set_watch_lag`] (live watch
//! events arrive late, reads stay current); [`FakeApiServer::write_counts`] (API writes by verb
//! and resource); [`FakeApiServer::drop_watches`] cuts watch streams mid-body;
//! [`FakeApiServer::stop`] / [`FakeApiServer::restart`] make the server unreachable and bring it
//! back on the same port with the same state.
//!
//! [`get_object`]: FakeApiServer::get_object
//! [`list_objects`]: FakeApiServer::list_objects
//! [`delete_object`]: FakeApiServer::delete_object
//!
//! What kube 5's `watcher` (default `ListWatch`, `MostRecent`) sends, as checked by the tests:
//! `GET /api/v1/pods?&labelSelector=…&limit=500` (no resourceVersion: a consistent read), then
//! `GET /api/v1/pods?&watch=true&timeoutSeconds=290&labelSelector=…&allowWatchBookmarks=true&resourceVersion=<list rv>`.
//! A watch cut mid-chunk ends quietly on kube's side (it maps "unexpected EOF during chunk" to a
//! clean end) and the watcher re-watches from its last resourceVersion; only a 410 makes it relist.

#![forbid(unsafe_code)]

#[cfg(test)]
mod control_tests;
mod discovery;
mod handlers;
mod http;
mod listwatch;
mod objects;
mod patch;
pub mod pods;
pub mod registry;
mod store;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;
mod writes;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use pods::{
    fake_pod, set_annotation, set_deletion_timestamp, set_label, set_pod_ip, set_ready,
    LabelSelector,
};
pub use registry::{builtin_resources, ResourceType, ScalePaths};
use store::{Signal, State};

/// Server options.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often open watches that asked for bookmarks get a `BOOKMARK` event.
    /// `Duration::ZERO` disables periodic bookmarks ([`FakeApiServer::send_bookmark`] still works).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// How many requests the server has answered, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// List requests answered with a PodList (each page of a paged list is one).
    pub lists: u64,
    /// Watch requests that opened a stream (including ones that only carried a 410 ERROR).
    pub watches: u64,
    /// Watch streams that started with a 410 `Expired` ERROR event, and list pages refused with
    /// 410 `Expired` (their continue token's snapshot was gone).
    pub expired: u64,
    /// Requests rejected with an error Status (bad path, method, selector or parameters).
    pub rejected: u64,
}

/// API writes received, by verb (each request counts, whether it succeeded, was refused or
/// hit an injected fault; test-side helpers like [`FakeApiServer::apply_object`] do not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// `POST`s (and server-side applies of a missing object are counted as patches).
    pub creates: u64,
    /// `PUT`s, of the object or a subresource.
    pub updates: u64,
    /// `PATCH`es, of the object or a subresource.
    pub patches: u64,
    /// `DELETE`s.
    pub deletes: u64,
}

/// One write request as the server answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRecord {
    pub method: String,
    pub path: String,
    /// The `Authorization: Bearer` token, if any.
    pub bearer: Option<String>,
    pub status: u16,
}

impl WriteCounts {
    /// All writes.
    pub fn total(&self) -> u64 {
        self.creates + self.updates + self.patches + self.deletes
    }
}

/// Paged lists whose snapshots are kept for their next pages, newest first; an older one's
/// next page gets 410 `Expired`, as a real API server answers a compacted continue token.
pub const MAX_LIST_SNAPSHOTS: usize = 64;

struct Shared {
    state: Mutex<State>,
    signals: broadcast::Sender<Signal>,
    opts: Options,
    addr: SocketAddr,
    /// [`FakeApiServer::set_latency`], in nanoseconds.
    latency: AtomicU64,
    /// [`FakeApiServer::set_watch_lag`], in nanoseconds.
    watch_lag: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge every other connection.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency.load(Ordering::Relaxed))
    }

    fn watch_lag(&self) -> Duration {
        Duration::from_nanos(self.watch_lag.load(Ordering::Relaxed))
    }
}

struct Running {
    accept: JoinHandle<()>,
    /// Dropping or setting it closes every connection of this incarnation.
    shutdown: watch::Sender<bool>,
}

/// Handle to a running fake API server. Dropping it stops the server.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl FakeApiServer {
    /// Starts a server on an ephemeral 127.0.0.1 port with default options.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts a server on an ephemeral 127.0.0.1 port.
    pub async fn start_with(opts: Options) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (signals, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(signals.clone())),
            signals,
            opts,
            addr,
            latency: AtomicU64::new(0),
            watch_lag: AtomicU64::new(0),
        });
        let server = Self {
            shared,
            addr,
            running: Mutex::new(None),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let (shutdown, rx) = watch::channel(false);
        let accept = tokio::spawn(http::accept_loop(listener, self.shared.clone(), rx));
        let old = self.running().replace(Running { accept, shutdown });
        if let Some(old) = old {
            old.accept.abort();
        }
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listening address (stable across [`stop`](Self::stop)/[`restart`](Self::restart)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Config` pointing at this server (no TLS, no auth, default namespace `default`).
    pub fn client_config(&self) -> kube::Config {
        match self.url().parse() {
            Ok(uri) => kube::Config::new(uri),
            Err(e) => unreachable!("a socket address always makes a valid URI: {e}"),
        }
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Result<kube::Client> {
        kube::Client::try_from(self.client_config())
    }

    /// Writes a kubeconfig for this server (one cluster, one context, an empty user).
    pub fn kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        self.write_kubeconfig(path, "{}")
    }

    /// Writes a kubeconfig whose user sends `token` as a bearer token, so
    /// [`write_log`](Self::write_log) tells clients apart.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) -> std::io::Result<()> {
        self.write_kubeconfig(path, &format!("{{token: {token}}}"))
    }

    fn write_kubeconfig(&self, path: &Path, user: &str) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: fake\n  user: {user}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            url = self.url(),
        );
        std::fs::write(path, text)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Moves the compaction point to the current resourceVersion: a watch from any older
    /// resourceVersion gets a 410 `Expired` ERROR event, and so does the next page of a list
    /// that began before it. Open watches are not affected.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        let rv = st.rv;
        st.log.retain(|e| e.rv > rv);
        st.snapshots.retain(|_, s| s.rv >= rv);
    }

    /// Sends a `BOOKMARK` now to every open watch that asked for bookmarks.
    pub fn send_bookmark(&self) {
        let _ = self.shared.signals.send(Signal::Bookmark);
    }

    /// Cuts every open watch stream abruptly (the chunked body ends without its terminator,
    /// so the client sees a broken connection, not a clean end of stream).
    pub fn drop_watches(&self) {
        let _ = self.shared.signals.send(Signal::Drop);
    }

    /// Closes the listener and every open connection. New connections are refused until
    /// [`restart`](Self::restart).
    pub async fn stop(&self) {
        let running = self.running().take();
        if let Some(Running { accept, shutdown }) = running {
            let _ = shutdown.send(true);
            accept.abort();
            let _ = accept.await;
        }
    }

    /// Listens again on the same port with the same state (after [`stop`](Self::stop)).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// Requests served so far, by kind.
    pub fn request_counts(&self) -> RequestCounts {
        self.shared.lock().counts
    }

    /// Time the server has spent building and serializing list responses, so a benchmark can
    /// tell the server's share of a list from the client's.
    pub fn list_time(&self) -> Duration {
        self.shared.lock().list_time
    }

    /// Every request's path and query as received (percent-encoded), oldest first.
    pub fn request_log(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Every write request so far (create, update, patch, delete), with the bearer token it
    /// carried (a kubeconfig user's `token`) and the status it got: which client's writes were
    /// accepted.
    pub fn write_log(&self) -> Vec<WriteRecord> {
        self.shared.lock().write_log.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(Running { accept, shutdown }) = self.running().take() {
            let _ = shutdown.send(true);
            accept.abort();
        }
    }
}
