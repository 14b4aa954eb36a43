//! `sandbox-deploy-gen` (`make deploy-bootstrap`): writes deploy/base/envoy-configmap.yaml from
//! envoy/gateway.yaml.tmpl and deploy/base/envoy-configmap.yaml.tmpl. `--check` only reports
//! whether the committed file is up to date (exit status 1 if not).

use std::process::ExitCode;

use sandbox_gateway_deploy_gen::{generate_in, repo_root, OUTPUT};

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(_) => {
            eprintln!("usage: sandbox-deploy-gen [--check]");
            return ExitCode::from(2);
        }
    };
    let root = repo_root();
    let fresh = match generate_in(&root) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("sandbox-deploy-gen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = root.join(OUTPUT);
    let current = std::fs::read_to_string(&path).ok();
    if current.as_deref() == Some(fresh.as_str()) {
        println!("{OUTPUT} is up to date");
        return ExitCode::SUCCESS;
    }
    if check {
        eprintln!("{OUTPUT} is stale: run `make deploy-bootstrap`");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(&path, fresh) {
        eprintln!("sandbox-deploy-gen: writing {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {OUTPUT}");
    ExitCode::SUCCESS
}
