//! sandbox-extproc under test: the real binary as a child process (so tests can kill and restart
//! it), and a gateway in ext_proc mode (Envoy with `envoy/extproc.yaml.tmpl` talking to it).

use crate::envoy::{render, repo_root, Envoy, EnvoyOptions};
use crate::gateway::RouteEntry;
use anyhow::{bail, Context, Result};
use routing::bearer::BearerToken;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary: `$SANDBOX_EXTPROC_BIN`, else `target/debug/sandbox-extproc` (`make test` builds it).
pub fn extproc_bin() -> Result<PathBuf> {
    let p = std::env::var_os("SANDBOX_EXTPROC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/sandbox-extproc"));
    if !p.exists() {
        bail!(
            "sandbox-extproc not found at {}. Build it first: `cargo build -p sandbox-gateway-extproc` \
             (make test does), or set SANDBOX_EXTPROC_BIN.",
            p.display()
        );
    }
    Ok(p)
}

/// A running sandbox-extproc; killed on drop.
pub struct ExtProc {
    child: Option<Child>,
    /// ext_proc listener.
    pub extproc: SocketAddr,
    /// ActivityService listener.
    pub activity: SocketAddr,
    pub metrics: SocketAddr,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    /// Sent by [`ExtProc::last_active`] (set by [`ExtProc::start_with_token`]).
    pub token: Option<BearerToken>,
}

impl ExtProc {
    /// Starts with `config` (the gateway JSON) on OS-chosen ports.
    pub fn start(config: &Value, extra_args: &[&str]) -> Result<ExtProc> {
        Self::start_inner(config, extra_args, None)
    }

    /// Like `start`, with the ActivityService requiring `token` (`--activity-token-file`).
    pub fn start_with_token(config: &Value, token: &str) -> Result<ExtProc> {
        Self::start_inner(config, &[], Some(token))
    }

    /// Like `start_with_token`, with extra command-line arguments.
    pub fn start_with_args_and_token(
        config: &Value,
        extra_args: &[&str],
        token: &str,
    ) -> Result<ExtProc> {
        Self::start_inner(config, extra_args, Some(token))
    }

    fn start_inner(config: &Value, extra_args: &[&str], token: Option<&str>) -> Result<ExtProc> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("config.json"), config.to_string())?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let token = match token {
            Some(t) => {
                let path = dir.path().join("activity-token");
                std::fs::write(&path, format!("{t}\n"))?;
                extra_args.push("--activity-token-file".into());
                extra_args.push(path.display().to_string());
                Some(BearerToken::new(t).context("token must be visible ASCII")?)
            }
            None => None,
        };
        let mut e = ExtProc {
            child: None,
            extproc: any,
            activity: any,
            metrics: any,
            dir,
            extra_args,
            token,
        };
        e.spawn(any, any)?;
        Ok(e)
    }

    fn spawn(&mut self, extproc: SocketAddr, activity: SocketAddr) -> Result<()> {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let bin = extproc_bin()?;
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("config.json"))
            .arg("--listen")
            .arg(extproc.to_string())
            .arg("--activity-listen")
            .arg(activity.to_string())
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready)
            .arg("--shutdown-grace-s")
            .arg("2")
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("SANDBOX_EXTPROC_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let v: Value = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sandbox-extproc exited at start ({status}); log:\n{}",
                    self.log()
                );
            }
            if let Ok(s) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str(&s) {
                    break v;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("sandbox-extproc not ready in 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let addr = |k: &str| -> Result<SocketAddr> {
            v[k].as_str()
                .with_context(|| format!("ready file lacks {k}: {v}"))?
                .parse()
                .context("ready file address")
        };
        self.extproc = addr("extproc")?;
        self.activity = addr("activity")?;
        self.metrics = addr("metrics")?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("extproc.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: no goodbye to anyone, as when a pod is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports (after `kill`).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let (e, a) = (self.extproc, self.activity);
        // The old sockets may linger briefly; retry the bind for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(e, a) {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!(error = %err, "restart: retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub fn activity_endpoint(&self) -> String {
        format!("http://{}", self.activity)
    }

    /// GetLastActive from this replica: sandbox ID → Unix ms.
    pub async fn last_active(&self) -> Result<HashMap<String, u64>> {
        let la = sandbox_extproc::cli::last_active(
            &[self.activity_endpoint()],
            &[],
            Duration::from_secs(5),
            self.token.as_ref(),
        )
        .await?;
        Ok(la.sandboxes.into_iter().collect())
    }

    /// The Prometheus text from /metrics.
    pub fn metrics_text(&self) -> Result<String> {
        crate::envoy::admin_get(self.metrics, "/metrics")
    }
}

impl Drop for ExtProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// ext_proc message timeout for a config: longer than its miss hold (sandbox-extproc answers a
/// held request only after the hold), plus a second for the answer itself.
pub fn message_timeout(config: &Value) -> Duration {
    let hold = config["miss_hold_ms"].as_u64().unwrap_or(500);
    Duration::from_millis(hold + 1000)
}

pub fn extproc_bootstrap(
    admin_port: u16,
    listen_port: u16,
    extproc: SocketAddr,
    message_timeout: Duration,
) -> Result<String> {
    let tmpl = std::fs::read_to_string(repo_root().join("envoy/extproc.yaml.tmpl"))?;
    render(
        &tmpl,
        &[
            ("ADMIN_PORT", admin_port.to_string()),
            ("LISTEN_PORT", listen_port.to_string()),
            ("EXTPROC_HOST", extproc.ip().to_string()),
            ("EXTPROC_PORT", extproc.port().to_string()),
            (
                "MESSAGE_TIMEOUT",
                format!("{:.3}s", message_timeout.as_secs_f64()),
            ),
        ],
    )
}

/// Envoy in ext_proc mode in front of its own sandbox-extproc, both on loopback.
pub struct ExtProcGateway {
    // Envoy first: dropped (killed) before the extproc it talks to.
    pub envoy: Envoy,
    pub extproc: ExtProc,
    pub routes_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ExtProcGateway {
    /// Same defaults and overrides as `FilterGateway::start`, applied to sandbox-extproc's config.
    pub fn start(routes: &[RouteEntry], overrides: Value) -> Result<Self> {
        let (dir, routes_path, cfg) = crate::gateway::scratch_config(routes, overrides)?;
        let extproc = ExtProc::start(&cfg, &[])?;
        let envoy = Envoy::start(EnvoyOptions::sandboxes(extproc_bootstrap(
            0,
            0,
            extproc.extproc,
            message_timeout(&cfg),
        )?))?;
        Ok(ExtProcGateway {
            envoy,
            extproc,
            routes_path,
            _dir: dir,
        })
    }
}

impl crate::gateway::GatewayUnderTest for ExtProcGateway {
    fn addr(&self) -> SocketAddr {
        self.envoy.listener
    }
    fn counter(&self, name: &str) -> Result<u64> {
        let text = self.extproc.metrics_text()?;
        let want = format!("sandbox_extproc_{name}_total ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64))
    }
    fn routes_path(&self) -> &Path {
        &self.routes_path
    }
}

/// Path helper for configs that point sandbox-extproc at an existing routes file.
pub fn file_source(routes: &Path) -> Value {
    serde_json::json!({"type": "file", "path": routes, "poll_interval_ms": 50})
}
