//! The `claim` and `release` commands, as a script runs them: the real binary with a
//! kubeconfig for the in-process API server, against a running controller.

mod support;

use std::process::Command;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use routing::contract::{token_sha256_hex, SANDBOX_ID_LABEL, TOKEN_SHA256_ANNOTATION};
use sandbox_controller::context::Config;
use sandbox_controller::crd::Sandbox;
use serde_json::{json, Value};
use support::*;

fn cli(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sandbox-controller"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "error")
        .output()
        .expect("run sandbox-controller")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_wait_json_prints_a_working_token_and_release_takes_it_away() {
    let s = stack(Config::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    s.api.kubeconfig(&kc).unwrap();
    make_pool(&s.client, "cli", 1, json!({})).await;
    wait_warm(&s.client, "cli", 1).await;

    let kc2 = kc.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &kc2,
            &[
                "claim",
                "--pool",
                "cli",
                "--wait",
                "--json",
                "--timeout",
                "30s",
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["phase"], "Ready");
    let id = v["sandboxId"].as_str().unwrap().to_string();
    let token = v["token"].as_str().unwrap().to_string();
    let pods = Api::<Pod>::namespaced(s.client.clone(), NS)
        .list(&ListParams::default().labels(&format!("{SANDBOX_ID_LABEL}={id}")))
        .await
        .unwrap()
        .items;
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0].annotations().get(TOKEN_SHA256_ANNOTATION),
        Some(&token_sha256_hex(token.as_bytes())),
        "the printed token is the one the gateway checks"
    );

    // An unknown ID is an error that changes nothing.
    let kc2 = kc.clone();
    let bad = tokio::task::spawn_blocking(move || cli(&kc2, &["release", "nosuchsandbox"]))
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0 sandboxes match"));

    let kc2 = kc.clone();
    let id2 = id.clone();
    let out = tokio::task::spawn_blocking(move || cli(&kc2, &["release", &id2]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = v["name"].as_str().unwrap();
    wait_gone(Api::<Sandbox>::namespaced(s.client.clone(), NS), name).await;
    wait_gone(
        Api::<Pod>::namespaced(s.client.clone(), NS),
        &pods[0].name_any(),
    )
    .await;
}
