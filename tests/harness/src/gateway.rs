//! A gateway under test: the [`GatewayUnderTest`] trait every deployment mode implements (the
//! e2e tests' shared cases run against it), the routes file, and filter mode itself: local
//! sandboxes, a routes file and a real Envoy loading `libsandbox_gateway.so`, all on loopback
//! with OS-chosen ports.

use crate::envoy::{render, repo_root, yaml_string, Envoy, EnvoyOptions};
use anyhow::Result;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A running gateway in some mode (filter: [`FilterGateway`]; ext_proc:
/// [`crate::extproc::ExtProcGateway`]).
pub trait GatewayUnderTest: Send + Sync {
    fn addr(&self) -> SocketAddr;
    /// The routes file this gateway's route source reads.
    fn routes_path(&self) -> &Path;
    fn set_routes(&self, routes: &[RouteEntry]) -> Result<()> {
        write_routes(self.routes_path(), routes)
    }
    /// A counter of the gateway's own, by its module name (`miss_holds_displaced`): the
    /// module's Envoy stat `dynamicmodulescustom.<name>`, or sandbox-extproc's `sandbox_extproc_<name>_total`.
    fn counter(&self, name: &str) -> Result<u64>;
    /// Overwrites the routes file with arbitrary bytes (a bad edit), atomically.
    fn write_routes_raw(&self, bytes: &[u8]) -> Result<()> {
        let path = self.routes_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// One line of the routes file.
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub id: String,
    pub addr: SocketAddr,
    pub ready: bool,
    pub token_sha256: Option<String>,
}

impl RouteEntry {
    pub fn new(id: &str, addr: SocketAddr) -> Self {
        RouteEntry {
            id: id.into(),
            addr,
            ready: true,
            token_sha256: None,
        }
    }
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }
    pub fn token_sha256(mut self, hex: &str) -> Self {
        self.token_sha256 = Some(hex.into());
        self
    }
}

/// Writes the routes file atomically (temp file + rename), as operators and ConfigMaps do.
pub fn write_routes(path: &Path, routes: &[RouteEntry]) -> Result<()> {
    let sandboxes: Vec<Value> = routes
        .iter()
        .map(|r| {
            json!({"id": r.id, "ip": r.addr.ip().to_string(), "port": r.addr.port(),
                   "ready": r.ready, "access_token_sha256": r.token_sha256})
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&json!({"sandboxes": sandboxes}))?,
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The module config tests use unless they override fields.
pub fn default_filter_config(routes_path: &Path) -> Value {
    json!({
        "route_source": {"type": "file", "path": routes_path, "poll_interval_ms": 50},
        "host_domains": ["sandbox.test"],
        "path_prefix": "/sandboxes",
        "miss_hold_ms": 300
    })
}

pub fn bootstrap(filter_config: &Value, admin_port: u16, listen_port: u16) -> Result<String> {
    let tmpl = std::fs::read_to_string(repo_root().join("envoy/gateway.yaml.tmpl"))?;
    render(
        &tmpl,
        &[
            ("ADMIN_PORT", admin_port.to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
            ("FILTER_CONFIG", yaml_string(&filter_config.to_string())),
        ],
    )
}

/// A scratch dir with a routes file holding `routes`, and the default config for it with
/// `overrides` merged in (shared by every mode's fixture).
pub fn scratch_config(
    routes: &[RouteEntry],
    overrides: Value,
) -> Result<(tempfile::TempDir, PathBuf, Value)> {
    let dir = tempfile::tempdir()?;
    let routes_path = dir.path().join("routes.json");
    write_routes(&routes_path, routes)?;
    let mut cfg = default_filter_config(&routes_path);
    if let (Some(c), Some(o)) = (cfg.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            c.insert(k.clone(), v.clone());
        }
    }
    Ok((dir, routes_path, cfg))
}

pub struct FilterGateway {
    pub envoy: Envoy,
    pub routes_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl FilterGateway {
    /// Starts Envoy with `routes` and the default config with `overrides` merged in.
    pub fn start(routes: &[RouteEntry], overrides: Value) -> Result<Self> {
        let (dir, routes_path, cfg) = scratch_config(routes, overrides)?;
        let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&cfg, 0, 0)?))?;
        Ok(FilterGateway {
            envoy,
            routes_path,
            _dir: dir,
        })
    }
}

impl GatewayUnderTest for FilterGateway {
    fn addr(&self) -> SocketAddr {
        self.envoy.listener
    }
    fn counter(&self, name: &str) -> Result<u64> {
        Ok(self
            .envoy
            .stat(&format!("dynamicmodulescustom.{name}"))?
            .unwrap_or(0))
    }
    fn routes_path(&self) -> &Path {
        &self.routes_path
    }
}
