//! `sandbox-controller`: `run` the controller, print the `crd`s, `claim` and `release` sandboxes.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sandbox-controller",
    version,
    about = "sandbox-gateway's control plane"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions (YAML) to stdout.
    Crd,
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Crd => print!("{}", sandbox_controller::crds_yaml()?),
    }
    Ok(())
}
