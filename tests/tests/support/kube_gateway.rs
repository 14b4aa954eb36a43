//! A gateway replica in Kubernetes mode for the e2e tests: the real Envoy with the module, whose
//! `kube` watcher reads the in-test API server through a kubeconfig. Shared by `kube_mode.rs`
//! and `rolling_restart.rs` (`#[path]`-included: each test file is its own crate).

use anyhow::Result;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::envoy::{Envoy, EnvoyOptions};
use sandbox_gateway_harness::gateway::bootstrap;
use serde_json::json;

pub struct KubeGateway {
    pub envoy: Envoy,
    _dir: tempfile::TempDir,
}

impl KubeGateway {
    pub fn start(api: &FakeApiServer) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.kubeconfig(&kubeconfig)?;
        let cfg = json!({
            "route_source": {"type": "kubernetes", "kubeconfig": kubeconfig},
            "miss_hold_ms": 200
        });
        let envoy = Envoy::start(EnvoyOptions::sandboxes(bootstrap(&cfg, 0, 0)?))?;
        Ok(KubeGateway { envoy, _dir: dir })
    }
}
