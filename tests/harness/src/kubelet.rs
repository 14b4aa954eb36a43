//! A test kubelet: it "runs" the pods it sees through the real `kube` client. Each pod gets a
//! loopback IP of its own (127.0.x.y) with a real [`SandboxServer`] listening on the sandbox
//! port there, its status says `Running`, and after a configurable delay `Ready` (or `Failed`, or
//! never Ready, as [`KubeletOptions::fate`] says), so the gateway routes to it for real. A deleted
//! pod's server is stopped, and its address refuses connections afterwards.
//!
//! With [`PodNetwork::Netns`] each pod gets a network namespace of its own instead (root only,
//! Debian's `ip` from iproute2): a veth pair with a /30 (host side 10.77.x.1, pod side
//! 10.77.x.2), the sandbox server listening inside, so traffic to the pod really crosses an
//! interface and arrives from the host's veth address, not from loopback.
//!
//! With [`KubeletOptions::volume_root`] pods get their PersistentVolumeClaims: each claim is a
//! directory `<volume_root>/<namespace>/<claim>` (see [`volume_dir`]), mounted into the pod's
//! sandbox server where its containers' `volumeMounts` say (the server's `/files`). The
//! directory outlives the pod, as a bound volume does, so a later pod mounting the same claim
//! sees what an earlier one wrote.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::sandbox::{Mounts, SandboxServer};

/// Where pods live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// A loopback address of their own (127.x.y.z, see `next_ip`).
    Loopback,
    /// A network namespace of their own, joined to the host by a veth pair.
    Netns,
}

/// What becomes of a pod after `ready_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodFate {
    /// It turns `Ready`.
    Ready,
    /// It fails (`phase: Failed`), as an evicted pod or one whose container exits does.
    Fail,
    /// It keeps running and never turns Ready, as a pod stuck pulling its image or crash
    /// looping does.
    NeverReady,
}

/// How the kubelet treats pods.
#[derive(Clone)]
pub struct KubeletOptions {
    pub network: PodNetwork,
    /// Time from a pod's first sight to `Ready`.
    pub ready_after: Duration,
    /// The port each pod's sandbox server listens on (the pool's sandbox port).
    pub port: u16,
    /// What becomes of each pod, by name, once `ready_after` has passed.
    pub fate: Arc<dyn Fn(&str) -> PodFate + Send + Sync>,
    /// Where PersistentVolumeClaim volumes live ([`volume_dir`]); `None`: pods get no volumes
    /// (their `/files` finds no mount). A pod whose claim directory cannot be made fails.
    pub volume_root: Option<PathBuf>,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        KubeletOptions {
            network: PodNetwork::Loopback,
            ready_after: Duration::from_millis(50),
            port: 8080,
            fate: Arc::new(|_| PodFate::Ready),
            volume_root: None,
        }
    }
}

/// A running test kubelet. Dropping it stops every pod's server.
pub struct TestKubelet {
    task: JoinHandle<()>,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

struct Running {
    /// `None` for a pod that failed before it got a network.
    ip: Option<Ipv4Addr>,
    _server: Option<SandboxServer>,
    /// The pod's network namespace (deleted with the pod).
    _netns: Option<Netns>,
}

/// A network namespace made for one pod; `ip netns del` on drop (which also removes its veth
/// pair).
struct Netns {
    name: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Makes pod `n`'s namespace and veth pair; returns it and the pod's address.
fn make_netns(n: u32) -> anyhow::Result<(Netns, Ipv4Addr)> {
    let name = format!("sbx-{}-{n}", std::process::id());
    ip(&["netns", "add", &name])?;
    let ns = Netns { name: name.clone() };
    let base = n * 4;
    let (hi, lo) = (((base >> 8) & 0xff) as u8, (base & 0xff) as u8);
    let host = Ipv4Addr::new(10, 77, hi, lo + 1);
    let pod = Ipv4Addr::new(10, 77, hi, lo + 2);
    // Interface names are at most 15 bytes.
    let (h, p) = (format!("sbh{n}"), format!("sbp{n}"));
    ip(&["link", "add", &h, "type", "veth", "peer", "name", &p])?;
    ip(&["link", "set", &p, "netns", &name])?;
    ip(&["addr", "add", &format!("{host}/30"), "dev", &h])?;
    ip(&["link", "set", &h, "up"])?;
    ip(&[
        "netns",
        "exec",
        &name,
        "ip",
        "addr",
        "add",
        &format!("{pod}/30"),
        "dev",
        &p,
    ])?;
    ip(&["netns", "exec", &name, "ip", "link", "set", &p, "up"])?;
    ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
    ip(&[
        "netns",
        "exec",
        &name,
        "ip",
        "route",
        "add",
        "default",
        "via",
        &host.to_string(),
    ])?;
    Ok((ns, pod))
}

fn key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

impl TestKubelet {
    /// Starts watching every pod the client can see.
    pub fn start(client: kube::Client, opts: KubeletOptions) -> TestKubelet {
        let running: Arc<Mutex<HashMap<String, Running>>> = Arc::default();
        let r2 = running.clone();
        let task = tokio::spawn(async move {
            let all: Api<Pod> = Api::all(client.clone());
            let mut events = watcher(all, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { continue };
                match ev {
                    Event::Apply(p) | Event::InitApply(p) => {
                        if p.metadata.deletion_timestamp.is_some() {
                            r2.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&key(&p));
                            continue;
                        }
                        let k = key(&p);
                        let fresh = !r2
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .contains_key(&k);
                        let has_ip = p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some();
                        if fresh && !has_ip {
                            start_pod(&client, &p, &opts, &r2).await;
                        }
                    }
                    Event::Delete(p) => {
                        r2.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key(&p));
                    }
                    Event::Init | Event::InitDone => {}
                }
            }
        });
        TestKubelet { task, running }
    }

    /// The IP of a running pod.
    pub fn ip_of(&self, ns: &str, name: &str) -> Option<Ipv4Addr> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{ns}/{name}"))
            .and_then(|r| r.ip)
    }

    /// How many pods it runs (a pod that failed to start counts until it is deleted).
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_pod(
    client: &kube::Client,
    p: &Pod,
    opts: &KubeletOptions,
    running: &Arc<Mutex<HashMap<String, Running>>>,
) {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    let mounts = match &opts.volume_root {
        Some(root) => pod_mounts(p, root).await,
        None => Ok(Mounts::new()),
    };
    let mounts = match mounts {
        Ok(mounts) => mounts,
        Err(e) => {
            let error = format!("{e:#}");
            tracing::warn!(pod = %key(p), %error, "pod volumes not made; the pod fails");
            fail_pod(client, p, &error, running).await;
            return;
        }
    };
    let (ip, netns, server) = match opts.network {
        PodNetwork::Loopback => {
            let ip = crate::loopback::next_ip();
            let addr = SocketAddr::new(IpAddr::V4(ip), opts.port);
            let server = SandboxServer::start_with_mounts(&name, addr, mounts).await;
            (ip, None, server)
        }
        PodNetwork::Netns => {
            static NEXT_NS: AtomicU32 = AtomicU32::new(1);
            match make_netns(NEXT_NS.fetch_add(1, Ordering::Relaxed)) {
                Ok((ns, ip)) => {
                    let path = std::path::Path::new("/var/run/netns").join(&ns.name);
                    let addr = SocketAddr::new(IpAddr::V4(ip), opts.port);
                    let server =
                        SandboxServer::start_in_netns_with_mounts(&name, addr, &path, mounts).await;
                    (ip, Some(ns), server)
                }
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "pod network not made");
                    return;
                }
            }
        }
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            // Never Ready on an address it does not serve: another process may serve it.
            let error = format!("the sandbox server did not start: {e:#}");
            tracing::warn!(pod = %key(p), %error, "the pod fails");
            fail_pod(client, p, &error, running).await;
            return;
        }
    };
    let server = Some(server);
    running.lock().unwrap_or_else(|e| e.into_inner()).insert(
        key(p),
        Running {
            ip: Some(ip),
            _server: server,
            _netns: netns,
        },
    );
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let status = move |ready: bool, phase: &str| {
        json!({ "status": {
            "phase": phase,
            "podIP": ip.to_string(),
            "podIPs": [{ "ip": ip.to_string() }],
            "conditions": [{
                "type": "Ready",
                "status": if ready { "True" } else { "False" },
                "lastTransitionTime": jiff_now(),
            }],
        }})
    };
    let _ = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&status(false, "Running")),
        )
        .await;
    let fate = (opts.fate)(&name);
    let delay = opts.ready_after;
    let running = running.clone();
    let key = key(p);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if !running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key)
        {
            return; // deleted meanwhile
        }
        let body = match fate {
            PodFate::Ready => status(true, "Running"),
            PodFate::Fail => status(false, "Failed"),
            PodFate::NeverReady => return,
        };
        let _ = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await;
    });
}

/// The directory that backs PersistentVolumeClaim `claim` of namespace `ns` for a kubelet whose
/// [`KubeletOptions::volume_root`] is `volume_root`: tests look here to see what a pod wrote.
pub fn volume_dir(volume_root: &Path, ns: &str, claim: &str) -> PathBuf {
    volume_root.join(ns).join(claim)
}

/// A name that is one plain path component, so joining it cannot leave `volume_root`.
fn one_component(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    )
}

/// Makes the directory of each of the pod's PVC volumes and maps its containers' mounts of them
/// (mount path → directory). The first container's mounts come first; a later container adds
/// the mount paths it alone has. Mounts of other volume kinds (emptyDir, configMap, …) are left
/// out: the sandbox server serves no files there.
async fn pod_mounts(p: &Pod, root: &Path) -> anyhow::Result<Mounts> {
    let ns = p.namespace().unwrap_or_default();
    let Some(spec) = &p.spec else {
        return Ok(Mounts::new());
    };
    let mut claims: HashMap<&str, PathBuf> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let Some(pvc) = &v.persistent_volume_claim else {
            continue;
        };
        let claim = &pvc.claim_name;
        anyhow::ensure!(
            one_component(&ns) && one_component(claim),
            "volume {}: claim {claim:?} in namespace {ns:?} is no directory name",
            v.name
        );
        let dir = volume_dir(root, &ns, claim);
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("volume {}: making {}", v.name, dir.display()))?;
        claims.insert(&v.name, dir);
    }
    let mut mounts = Mounts::new();
    for m in spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
    {
        let Some(dir) = claims.get(m.name.as_str()) else {
            continue;
        };
        if mounts.iter().any(|(at, _)| *at == m.mount_path) {
            continue;
        }
        // subPath mounts one directory inside the volume, as the real kubelet does.
        let dir = match m.sub_path.as_deref() {
            None | Some("") => dir.clone(),
            Some(sub) => {
                let inside = Path::new(sub)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
                anyhow::ensure!(
                    inside,
                    "mount {}: subPath {sub:?} leaves the volume",
                    m.mount_path
                );
                let dir = dir.join(sub);
                tokio::fs::create_dir_all(&dir)
                    .await
                    .with_context(|| format!("mount {}: making {}", m.mount_path, dir.display()))?;
                dir
            }
        };
        mounts.push((m.mount_path.clone(), dir));
    }
    Ok(mounts)
}

/// Records a pod that could not start and says so in its status (`phase: Failed`, never
/// Ready, no IP), as a kubelet reports a pod whose volumes it cannot set up.
async fn fail_pod(
    client: &kube::Client,
    p: &Pod,
    message: &str,
    running: &Arc<Mutex<HashMap<String, Running>>>,
) {
    // Tracked, so the pod's own status update is not taken for a new pod to start.
    running.lock().unwrap_or_else(|e| e.into_inner()).insert(
        key(p),
        Running {
            ip: None,
            _server: None,
            _netns: None,
        },
    );
    let api: Api<Pod> = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
    let body = json!({ "status": {
        "phase": "Failed",
        "reason": "VolumeSetupFailed",
        "message": message,
        "conditions": [{
            "type": "Ready",
            "status": "False",
            "lastTransitionTime": jiff_now(),
        }],
    }});
    let _ = api
        .patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await;
}

fn jiff_now() -> serde_json::Value {
    let t =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "sb-1", "namespace": "team" },
            "spec": spec,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn pvc_mounts_map_to_claim_directories() {
        let root = tempfile::tempdir().unwrap();
        let p = pod(json!({
            "volumes": [
                { "name": "data", "persistentVolumeClaim": { "claimName": "sb-1-data" } },
                { "name": "scratch", "emptyDir": {} },
                { "name": "home", "persistentVolumeClaim": { "claimName": "sb-1-home" } },
                { "name": "unmounted", "persistentVolumeClaim": { "claimName": "spare" } },
            ],
            "containers": [
                { "name": "main", "volumeMounts": [
                    { "name": "data", "mountPath": "/data" },
                    { "name": "scratch", "mountPath": "/tmp" },
                    { "name": "home", "mountPath": "/home/u", "subPath": "u" },
                ] },
                { "name": "side", "volumeMounts": [
                    { "name": "home", "mountPath": "/data" },
                    { "name": "home", "mountPath": "/side" },
                ] },
            ],
        }));
        let mounts = pod_mounts(&p, root.path()).await.unwrap();
        let home = volume_dir(root.path(), "team", "sb-1-home");
        assert_eq!(
            mounts,
            vec![
                (
                    "/data".to_string(),
                    volume_dir(root.path(), "team", "sb-1-data")
                ),
                ("/home/u".to_string(), home.join("u")),
                ("/side".to_string(), home.clone()),
            ]
        );
        for (_, dir) in &mounts {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        // Every claim volume gets its directory, mounted or not.
        assert!(volume_dir(root.path(), "team", "spare").is_dir());
    }

    #[tokio::test]
    async fn claims_that_would_leave_the_root_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let vol = |claim: &str| {
            json!({
                "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
                "containers": [{ "name": "c", "volumeMounts": [{ "name": "v", "mountPath": "/v" }] }],
            })
        };
        for claim in ["../escape", "a/b", "", ".."] {
            assert!(
                pod_mounts(&pod(vol(claim)), root.path()).await.is_err(),
                "{claim:?}"
            );
        }
        let sub = pod(json!({
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "ok" } }],
            "containers": [{ "name": "c", "volumeMounts": [
                { "name": "v", "mountPath": "/v", "subPath": "../../x" },
            ] }],
        }));
        assert!(pod_mounts(&sub, root.path()).await.is_err());
        // A claim directory that cannot be made (a file is in the way) is an error too.
        let blocked = tempfile::tempdir().unwrap();
        std::fs::write(blocked.path().join("team"), b"not a directory").unwrap();
        assert!(pod_mounts(&pod(vol("fine")), blocked.path()).await.is_err());
    }
}
