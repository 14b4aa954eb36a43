//! `demo-sandbox --name NAME --listen ADDR`: runs one local sandbox server (the
//! gateway demo's upstream) until SIGINT/SIGTERM.
//!
//! Prints `listening on <addr>` on stdout once bound so scripts can wait for it
//! (and learn the port when ADDR uses port 0); logs go to stderr.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use anyhow::{bail, Context};
use sandbox_gateway_tests::sandbox::SandboxServer;

const USAGE: &str = "usage: demo-sandbox --name NAME --listen IP:PORT";

struct Args {
    name: String,
    listen: SocketAddr,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut name = None;
    let mut listen = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).context(USAGE);
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--listen" => {
                let raw = value()?;
                listen = Some(
                    raw.parse()
                        .with_context(|| format!("bad --listen {raw:?}"))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Args {
        name: name.context(USAGE)?,
        listen: listen.context(USAGE)?,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Usage mistakes get a plain message and exit code 2, not an error backtrace.
    let args = parse_args().unwrap_or_else(|err| {
        eprintln!("demo-sandbox: {err:#}");
        std::process::exit(2);
    });
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
