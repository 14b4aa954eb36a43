//! Against a real cluster (none is reachable from CI, hence `#[ignore]`):
//! `cargo test -p sandbox-gateway-routing --test real_cluster -- --ignored`
//! Uses `$KUBECONFIG` or `~/.kube/config`; needs list/watch on pods. Read-only: it creates nothing.

use routing::config::{KubeSourceConfig, RouteSourceConfig};
use routing::contract::SANDBOX_ID_LABEL;
use routing::stats::SourceStats;
use routing::RouteTable;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
#[ignore = "needs a real Kubernetes cluster from the current kubeconfig"]
fn syncs_labelled_pods_from_the_current_cluster() {
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".kube/config")))
        .expect("no KUBECONFIG and no HOME");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let table = Arc::new(RouteTable::new());
    let cfg = RouteSourceConfig::Kubernetes(KubeSourceConfig {
        namespaces: vec![],
        label: SANDBOX_ID_LABEL.into(),
        kubeconfig: Some(kubeconfig),
        default_port: 8080,
    });
    let stats = Arc::new(SourceStats::default());
    routing::source::start(
        &cfg,
        Arc::clone(&table),
        Arc::clone(&stats),
        rt.handle(),
        false,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !table.is_synced() {
        assert!(Instant::now() < deadline, "no initial list within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "synced {} sandbox routes; ids: {:?}",
        table.len(),
        table.ids()
    );
}
