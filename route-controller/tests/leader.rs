//! Leader election with the real binary: two `sandbox-controller run --leader-elect` processes
//! on a 2 s Lease against the in-process API server. The leader is frozen (SIGSTOP) past its
//! Lease: the standby takes over and claims; the old leader, resumed (SIGCONT), gets none of its
//! writes accepted and exits. Each process has its own bearer token, so the API server's write
//! log says whose writes landed.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use sandbox_controller::crd::Phase;
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_harness::kubelet::{KubeletOptions, TestKubelet};
use serde_json::json;
use support::*;

struct Proc {
    child: Child,
    name: String,
    metrics: std::net::SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(api: &FakeApiServer, dir: &std::path::Path, name: &str) -> Proc {
    let metrics = sandbox_gateway_harness::loopback::child_addr().unwrap();
    let kc = dir.join(format!("{name}.kubeconfig"));
    api.kubeconfig_with_token(&kc, name).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sandbox-controller"))
        .args([
            "run",
            "--leader-elect",
            "--lease-namespace",
            NS,
            "--lease-duration",
            "2s",
            "--identity",
            name,
            "--metrics-bind-address",
            &metrics.to_string(),
            "--wake-bind-address",
            &sandbox_gateway_harness::loopback::child_addr()
                .unwrap()
                .to_string(),
        ])
        .env("KUBECONFIG", &kc)
        .env("RUST_LOG", "warn,sandbox_controller=info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc {
        child,
        name: name.into(),
        metrics,
    }
}

async fn holder(client: &kube::Client, not: Option<&str>) -> String {
    let api: Api<Lease> = Api::namespaced(client.clone(), NS);
    let not = not.map(str::to_string);
    let cond = move |l: Option<&Lease>| {
        l.and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| Some(h) != not.as_deref())
    };
    let l = tokio::time::timeout(WAIT, await_condition(api, "sandbox-controller", cond))
        .await
        .expect("a leader")
        .unwrap()
        .unwrap();
    l.spec.unwrap().holder_identity.unwrap()
}

fn accepted_writes(api: &FakeApiServer, who: &str, after: usize) -> Vec<String> {
    api.write_log()[after..]
        .iter()
        .filter(|w| w.bearer.as_deref() == Some(who) && w.status < 300)
        .map(|w| format!("{} {}", w.method, w.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_loses_the_lease_and_none_of_its_writes_land() {
    init_tracing();
    let api = FakeApiServer::start().await.unwrap();
    let client = api.client().unwrap();
    let _kubelet = TestKubelet::start(client.clone(), KubeletOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let procs = [
        spawn(&api, dir.path(), "ctl-a"),
        spawn(&api, dir.path(), "ctl-b"),
    ];

    let first = holder(&client, None).await;
    make_pool(&client, "ha", 2, json!({})).await;
    wait_warm(&client, "ha", 2).await;
    let leader = procs.iter().find(|p| p.name == first).unwrap();
    let standby = procs.iter().find(|p| p.name != first).unwrap();
    assert!(
        !accepted_writes(&api, &first, 0).is_empty(),
        "the leader filled the pool"
    );
    assert!(
        accepted_writes(&api, &standby.name, 0)
            .iter()
            .all(|w| w.contains("/leases")),
        "a standby writes nothing but its Lease attempts: {:?}",
        accepted_writes(&api, &standby.name, 0)
    );

    // Both replicas are ready (a standby's caches are warm), and say who leads.
    for p in &procs {
        let ready = get(p.metrics, "/readyz").await.unwrap();
        assert!(ready.starts_with("HTTP/1.1 200"), "{}: {ready}", p.name);
        let m = get(p.metrics, "/metrics").await.unwrap();
        let want = if p.name == first { 1 } else { 0 };
        assert!(
            m.contains(&format!("sandboxgateway_leader {want}")),
            "{}: {m}",
            p.name
        );
        if p.name == first {
            assert!(
                m.contains("sandboxgateway_pool_pods{phase=\"warm\",pool=\"ha\"} 2"),
                "{m}"
            );
        }
    }

    // Freeze the leader past its Lease.
    let pid = leader.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let frozen_at = Instant::now();
    let second = holder(&client, Some(&first)).await;
    assert_eq!(second, standby.name);
    eprintln!(
        "standby holds the Lease {:?} after the leader froze",
        frozen_at.elapsed()
    );
    // The new leader claims while the old one is frozen.
    make_sandbox(&client, "during", "ha", json!({})).await;
    wait_phase(&client, "during", Phase::Ready).await;

    // Resume the old leader: its caches now see a Sandbox to claim and a pool to refill, but its
    // deadline has passed, so it must not write; it notices it lost the Lease and exits.
    let resume_mark = api.write_log().len();
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    make_sandbox(&client, "after", "ha", json!({})).await;
    wait_phase(&client, "after", Phase::Ready).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leader = procs.into_iter().find(|p| p.name == first).unwrap();
    let status = loop {
        if let Some(s) = leader.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the old leader never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !status.success(),
        "it exits with an error (lost leadership)"
    );
    let landed = accepted_writes(&api, &first, resume_mark);
    assert!(
        landed.is_empty(),
        "the resumed old leader's writes landed: {landed:?}"
    );
}
