//! `sandbox-deploy-gen` (`make deploy-bootstrap`): writes deploy/base/envoy-configmap.yaml from
//! envoy/gateway.yaml.tmpl and deploy/base/envoy-configmap.yaml.tmpl. `--check` only reports
//! whether the committed file is up to date (exit status 1 if not).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use sandbox_gateway_deploy_gen::{generate_in, repo_root, OUTPUT};

/// Writes the Kubernetes Envoy bootstrap from the shared template and the deploy-only parts.
#[derive(Parser, Debug)]
#[command(name = "sandbox-deploy-gen", version, about)]
struct Args {
    /// Only report whether the committed file is up to date (exit status 1 if not).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let check = Args::parse().check;
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
