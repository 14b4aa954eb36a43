//! The things being compared. Each variant is a way to reach the same upstream sandboxes; all are
//! started once and stay up for the whole run so rounds can interleave them.
//!
//! Adding a variant (ext_proc mode, a future Envoy build, …) means: a `VariantKind`, a line in
//! `VariantKind::ALL`, and a start function returning a `Variant` with its listener and the pids
//! whose CPU and memory count as "the gateway".

use crate::loadgen;
use crate::workloads::sandbox_id;
use anyhow::{bail, Context, Result};
use hyper::header::HeaderValue;
use sandbox_gateway_bench::procfs;
use sandbox_gateway_harness::envoy::{render, repo_root, yaml_string, Envoy, EnvoyOptions};
use sandbox_gateway_harness::extproc::{extproc_bin, extproc_bootstrap, message_timeout, ExtProc};
use sandbox_gateway_harness::gateway::{write_routes, RouteEntry};
use sandbox_gateway_harness::sandbox::SandboxServer;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VariantKind {
    /// Load generator straight to the upstream sandboxes: the floor, no proxy at all.
    Direct,
    /// Envoy with one static route and no module: what plain Envoy costs. The baseline.
    Static,
    /// Envoy + libsandbox_gateway.so routing by sandbox ID from a routes file (ORIGINAL_DST).
    Module,
    /// Envoy + ext_proc to sandbox-extproc (headers-only), same routes file.
    ExtProc,
}

impl VariantKind {
    pub const ALL: [VariantKind; 4] = [
        VariantKind::Direct,
        VariantKind::Static,
        VariantKind::Module,
        VariantKind::ExtProc,
    ];
    pub const BASELINE: VariantKind = VariantKind::Static;

    pub fn name(self) -> &'static str {
        match self {
            VariantKind::Direct => "direct",
            VariantKind::Static => "static",
            VariantKind::Module => "module",
            VariantKind::ExtProc => "extproc",
        }
    }
}

/// What every Envoy variant is started with.
pub struct Setup {
    pub workers: u32,
    pub envoy_cpus: Option<Vec<usize>>,
    pub upstreams: Vec<SocketAddr>,
    pub routes_path: PathBuf,
}

/// A started variant.
pub struct Variant {
    pub kind: VariantKind,
    /// Where load goes: connection `i` uses `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    // Envoy before the sidecar: fields drop in order, so Envoy is killed before what it talks to.
    envoy: Option<Envoy>,
    /// A helper process that is part of the gateway (sandbox-extproc); killed on drop.
    sidecar: Option<ExtProc>,
}

impl Variant {
    /// Processes whose CPU time counts as the gateway's: Envoy plus any sidecar.
    pub fn gateway_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.envoy.iter().map(Envoy::pid).collect();
        pids.extend(self.sidecar_pids());
        pids
    }

    pub fn envoy_pid(&self) -> Option<u32> {
        self.envoy.as_ref().map(Envoy::pid)
    }

    pub fn sidecar_pids(&self) -> Vec<u32> {
        self.sidecar.iter().filter_map(ExtProc::pid).collect()
    }

    /// CPU seconds used so far by the gateway's processes.
    pub fn cpu_seconds(&self) -> Result<f64> {
        self.gateway_pids()
            .into_iter()
            .map(procfs::cpu_seconds)
            .sum()
    }

    /// Fails if Envoy died (a crash must fail the run, not show up as a slow variant).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(e) = self.envoy.as_mut() {
            if !e.alive() {
                let log = e.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                bail!(
                    "{} Envoy exited; log (last lines first):\n{}",
                    self.kind.name(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }
}

/// Whether a variant can run here; `Err(reason)` is printed and the variant skipped.
pub fn available(kind: VariantKind) -> std::result::Result<(), String> {
    match kind {
        VariantKind::ExtProc => {
            if !repo_root().join("envoy/extproc.yaml.tmpl").exists() {
                return Err("envoy/extproc.yaml.tmpl is missing".into());
            }
            extproc_bin().map(|_| ()).map_err(|e| e.to_string())
        }
        _ => Ok(()),
    }
}

/// Starts one variant and waits until it serves the highest sandbox ID in the routes file.
pub async fn start(kind: VariantKind, setup: &Setup, n_ids: usize) -> Result<Variant> {
    let variant = match kind {
        VariantKind::Direct => Variant {
            kind,
            targets: setup.upstreams.clone(),
            envoy: None,
            sidecar: None,
        },
        VariantKind::Static => {
            let tmpl = std::fs::read_to_string(repo_root().join("envoy/static.yaml.tmpl"))?;
            let up = setup.upstreams[0];
            let bootstrap = render(
                &tmpl,
                &[
                    ("ADMIN_PORT", "0".into()),
                    ("LISTEN_PORT", "0".into()),
                    ("UPSTREAM_HOST", up.ip().to_string()),
                    ("UPSTREAM_PORT", up.port().to_string()),
                ],
            )?;
            envoy_variant(kind, setup, bootstrap).await?
        }
        VariantKind::Module => {
            let tmpl = std::fs::read_to_string(repo_root().join("envoy/gateway.yaml.tmpl"))?;
            let bootstrap = render(
                &tmpl,
                &[
                    ("ADMIN_PORT", "0".into()),
                    ("LISTEN_PORT", "0".into()),
                    (
                        "FILTER_CONFIG",
                        yaml_string(&gateway_config(setup).to_string()),
                    ),
                ],
            )?;
            envoy_variant(kind, setup, bootstrap).await?
        }
        VariantKind::ExtProc => {
            // The module's config, served by sandbox-extproc on Envoy's CPUs: its cost is part
            // of what this mode costs.
            let cfg = gateway_config(setup);
            let timeout = message_timeout(&cfg);
            let extproc =
                on_pinned_thread(setup.envoy_cpus.clone(), move || ExtProc::start(&cfg, &[]))
                    .await
                    .context("starting sandbox-extproc")?;
            let bootstrap = extproc_bootstrap(0, 0, extproc.extproc, timeout)?;
            let mut v = envoy_variant(kind, setup, bootstrap).await?;
            v.sidecar = Some(extproc);
            v
        }
    };
    // Every ID must route before measuring: a 100k-entry routes file takes a moment to load.
    let last = HeaderValue::from_str(&sandbox_id(n_ids.saturating_sub(1)))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = variant.targets[0];
        match loadgen::probe(addr, last.clone()).await {
            Ok(200) => break,
            res if Instant::now() > deadline => {
                bail!("{} never served {last:?}: {res:?}", kind.name())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(variant)
}

async fn envoy_variant(kind: VariantKind, setup: &Setup, bootstrap: String) -> Result<Variant> {
    let opts = EnvoyOptions {
        bootstrap,
        concurrency: setup.workers,
        listener_name: "sandboxes".into(),
        env: vec![("SANDBOX_GATEWAY_LOG".into(), "warn".into())],
    };
    let envoy = on_pinned_thread(setup.envoy_cpus.clone(), move || Envoy::start(opts))
        .await
        .with_context(|| format!("starting the {} Envoy", kind.name()))?;
    Ok(Variant {
        kind,
        targets: vec![envoy.listener],
        envoy: Some(envoy),
        sidecar: None,
    })
}

/// The module's (and sandbox-extproc's) config: routes from the bench's routes file.
fn gateway_config(setup: &Setup) -> serde_json::Value {
    serde_json::json!({
        // The bench never rewrites the file; a slow poll keeps the stat() off Envoy's CPU.
        "route_source": {"type": "file", "path": setup.routes_path, "poll_interval_ms": 1000},
    })
}

/// Runs `f` (which starts a process) on a new thread pinned to `cpus`: the child and every
/// thread it ever creates (Envoy workers, the module's runtime) inherit the mask, which pinning
/// after the fact could miss. A fresh thread rather than tokio's blocking pool, whose threads
/// are reused and would stay pinned.
async fn on_pinned_thread<T: Send + 'static>(
    cpus: Option<Vec<usize>>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let res = match &cpus {
            Some(cpus) => sandbox_gateway_bench::sys::pin_current_thread(cpus),
            None => Ok(()),
        }
        .and_then(|()| f());
        let _ = tx.send(res);
    });
    rx.await.context("process start thread")?
}

/// Upstream sandbox servers in this process (on the load CPUs): many IDs, few listeners.
pub async fn start_upstreams(n: usize) -> Result<Vec<SandboxServer>> {
    let mut servers = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        servers.push(SandboxServer::start(&format!("up{i}"), ([127, 0, 0, 1], 0).into()).await?);
    }
    Ok(servers)
}

/// Writes the module's routes file: ID `i` → upstream `i % len`.
pub fn write_route_file(path: &Path, n_ids: usize, upstreams: &[SocketAddr]) -> Result<()> {
    let routes: Vec<RouteEntry> = (0..n_ids)
        .map(|i| RouteEntry::new(&sandbox_id(i), upstreams[i % upstreams.len()]))
        .collect();
    write_routes(path, &routes)
}
