//! `sandbox-echo-server --name NAME --listen ADDR`: runs one local sandbox server (the harness's
//! `SandboxServer`: JSON echo, SSE, WebSocket, `/bench`) until SIGINT/SIGTERM. The upstream of
//! `benches/instructions_per_request.sh` and `benches/filter_vs_static.sh`, and a sandbox to put
//! behind your own Envoy by hand.
//!
//! Prints `listening on <addr>` on stdout once bound so scripts can wait for it
//! (and learn the port when ADDR uses port 0); logs go to stderr.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use sandbox_gateway_harness::sandbox::SandboxServer;

/// One local sandbox server: echoes requests as JSON, streams SSE, answers WebSockets.
#[derive(Parser, Debug)]
#[command(name = "sandbox-echo-server")]
struct Args {
    /// The sandbox's name, reported in every echo.
    #[arg(long)]
    name: String,
    /// Address to listen on (`IP:PORT`; port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Usage mistakes get clap's message and exit code 2, not an error backtrace.
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let server = SandboxServer::start(&args.name, args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", server.addr)?;
        stdout.flush()?;
    }
    server.run_until_signal().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_as_the_bench_scripts_pass_them() {
        Args::command().debug_assert();
        for argv in [
            &[
                "sandbox-echo-server",
                "--name",
                "bench",
                "--listen",
                "127.0.0.1:0",
            ][..],
            &[
                "sandbox-echo-server",
                "--name=bench",
                "--listen=127.0.0.1:0",
            ][..],
        ] {
            let a = Args::try_parse_from(argv).unwrap();
            assert_eq!((a.name.as_str(), a.listen.port()), ("bench", 0));
        }
        assert!(Args::try_parse_from(["sandbox-echo-server", "--name", "x"]).is_err());
        assert!(
            Args::try_parse_from(["sandbox-echo-server", "--name", "x", "--listen", "x"]).is_err()
        );
    }
}
