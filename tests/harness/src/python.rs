//! Real third-party sandbox software, in Python (`tests/python/`, deps pinned in
//! `tests/python/requirements.txt`): MCP servers over SSE and the MCP SDK's own client, run as
//! child processes with the venv's interpreter. Missing deps are an error telling how to install
//! them (`make pydeps`), never a skipped test.

use crate::envoy::repo_root;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The interpreter: `$SANDBOX_GATEWAY_PYTHON`, else `.venv/bin/python`. Checked to have the
/// pinned `mcp` installed, so a stale or missing venv fails here with the fix, not later with an
/// import error from a child process.
pub fn python_bin() -> Result<PathBuf> {
    let p = std::env::var_os("SANDBOX_GATEWAY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let reqs = repo_root().join("tests/python/requirements.txt");
    let want = std::fs::read_to_string(&reqs)
        .with_context(|| format!("reading {}", reqs.display()))?
        .lines()
        .find_map(|l| l.strip_prefix("mcp==").map(str::to_string))
        .context("tests/python/requirements.txt pins no mcp version")?;
    let fix = "Run `make pydeps` (pip-installs tests/python/requirements.txt into .venv; `make \
               test` does it), or set SANDBOX_GATEWAY_PYTHON to an interpreter that has them.";
    let out = Command::new(&p)
        .args([
            "-c",
            "import importlib.metadata as m, uvicorn, mcp.client.sse; print(m.version('mcp'))",
        ])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => bail!("Python not found at {} ({e}). {fix}", p.display()),
    };
    let have = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || have != want {
        bail!(
            "the end-to-end tests' Python deps are missing from {} (want mcp=={want}, have {}): \
             {}. {fix}",
            p.display(),
            if have.is_empty() { "none" } else { &have },
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(p)
}

fn script(name: &str) -> PathBuf {
    repo_root().join("tests/python").join(name)
}

/// MCP servers over SSE (`tests/python/mcp_sse_server.py`), one process, each server on its own
/// loopback port. Killed on drop; the script also exits by itself when its stdin closes, so it
/// cannot outlive a test process that died.
pub struct McpServers {
    child: Child,
    _stdin: ChildStdin,
    ports: HashMap<String, u16>,
    /// The servers' stderr (the SDK logs each refused Host there).
    log: tempfile::NamedTempFile,
}

impl McpServers {
    /// `apps`: `(name, kind)`, kind as the script takes it (`root`, `mount:/base/{port}`,
    /// `forwarded-prefix`).
    pub fn start(apps: &[(&str, &str)]) -> Result<McpServers> {
        let mut cmd = Command::new(python_bin()?);
        cmd.arg(script("mcp_sse_server.py"));
        for (name, kind) in apps {
            cmd.arg("--app").arg(format!("{name}={kind}"));
        }
        let log = tempfile::NamedTempFile::new()?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.reopen()?)
            .spawn()
            .context("starting tests/python/mcp_sse_server.py")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            bail!("no pipes to the MCP server process");
        };
        // Read READY lines on a thread, so a server that never starts cannot hang the test.
        let (tx, rx) = mpsc::channel();
        let want = apps.len();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..want {
                let line = lines.next().map(|l| l.unwrap_or_default());
                if tx.send(line).is_err() {
                    return;
                }
            }
            // Keep draining, so a chatty server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut servers = McpServers {
            child,
            _stdin: stdin,
            ports: HashMap::new(),
            log,
        };
        for _ in 0..want {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Some(line)) => line,
                Ok(None) => bail!("the MCP server process exited at start:\n{}", servers.log()),
                Err(_) => bail!("the MCP servers did not start in 60 s:\n{}", servers.log()),
            };
            let mut parts = line.split_whitespace();
            let (Some("READY"), Some(name), Some(port)) =
                (parts.next(), parts.next(), parts.next())
            else {
                bail!("unexpected line from the MCP server process: {line:?}");
            };
            servers.ports.insert(name.to_string(), port.parse()?);
        }
        Ok(servers)
    }

    /// What the servers wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The port of server `name`.
    pub fn port(&self, name: &str) -> Result<u16> {
        self.ports
            .get(name)
            .copied()
            .with_context(|| format!("no MCP server named {name}"))
    }
}

impl Drop for McpServers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One session of the MCP SDK's client (`tests/python/mcp_sse_client.py`).
#[derive(Debug, Clone)]
pub struct McpScenario {
    pub name: String,
    /// The SSE endpoint, e.g. `http://127.0.0.1:10000/sandboxes/box/8000/sse`.
    pub url: String,
    /// Request headers on every request of the session (a `Host` here replaces the URL's).
    pub headers: Vec<(String, String)>,
}

/// Runs the scenarios, in order, in one client process; returns each one's result object
/// (`ok`, `tools`/`add`/`whoami` or `error`, and `responses`). The process runs on a blocking
/// thread: its sessions go through a gateway the calling runtime may be serving.
pub async fn mcp_client(scenarios: &[McpScenario]) -> Result<Vec<Value>> {
    let arg: Vec<Value> = scenarios
        .iter()
        .map(|s| {
            let headers: serde_json::Map<String, Value> = s
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect();
            serde_json::json!({"name": s.name, "url": s.url, "headers": headers})
        })
        .collect();
    let arg = Value::from(arg).to_string();
    let python = python_bin()?;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script("mcp_sse_client.py"))
            .arg(arg)
            .stdin(Stdio::null())
            .output()
    })
    .await?
    .context("running tests/python/mcp_sse_client.py")?;
    ensure!(
        out.status.success(),
        "the MCP client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "MCP client output is not JSON: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        results.len() == scenarios.len(),
        "want {} results, got {results:?}",
        scenarios.len()
    );
    Ok(results)
}
