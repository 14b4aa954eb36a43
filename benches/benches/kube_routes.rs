//! Kubernetes route feed at scale (a benchmark, not a test): how long the initial list of 10k and
//! 100k labelled pods takes to become a synced route table (what a restarted replica waits for
//! before it is ready), split into the fake API server's share (building and serializing the
//! pages, timed inside it) and the client's (everything else), how much memory each route costs,
//! and how long a watch event takes to make a sandbox routable / unroutable (p50/p99 over 1000+).
//!
//! `cargo bench -p sandbox-gateway-bench --bench kube_routes [-- --sizes 10000,100000 --events 1000]`
//!
//! The fake API server runs in a child process (this binary with `--serve`), so the memory and
//! CPU measured here are the route source's alone: kube client + watcher, PodIndex, route table.
//! Memory is live heap bytes (a counting allocator), not RSS, so it is what stays after the list.

#![deny(unsafe_code)]

use clap::Parser;
use routing::config::{KubeSourceConfig, RouteSourceConfig};
use routing::stats::SourceStats;
use routing::RouteTable;
use sandbox_gateway_apiserver::pods::{fake_pod, pod_ip, ready_sandbox_pods, set_ready};
use sandbox_gateway_apiserver::FakeApiServer;
use sandbox_gateway_bench::sys::{live_heap_bytes, CountingAlloc};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Kubernetes route feed at scale: initial list time, heap per route, watch propagation delay.
#[derive(Parser, Debug)]
#[command(name = "kube_routes")]
struct Args {
    /// Route table sizes (labelled pods) to list, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Watch events (add, then unready) timed over the first table.
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Internal: run as the fake API server child with this many ready pods.
    #[arg(long, value_name = "PODS", hide = true)]
    serve: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Child: a fake API server with `n` ready pods; prints its port, then applies commands from
/// stdin (`add <i>`, `unready <i>`) so the parent can time propagation.
async fn serve(n: usize) {
    let api = FakeApiServer::start().await.expect("fake API server");
    api.apply_all(ready_sandbox_pods("bench", "sb", n));
    println!("{}", api.addr().port());
    let stdin = BufReader::new(std::io::stdin());
    let mut lines = stdin.lines();
    while let Some(Ok(line)) = tokio::task::block_in_place(|| lines.next()) {
        let mut parts = line.split_whitespace();
        let (cmd, i) = (
            parts.next().unwrap_or(""),
            parts
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0),
        );
        if cmd == "list-time" {
            println!("{}", api.list_time().as_micros());
            continue;
        }
        let mut p = fake_pod(
            "bench",
            &format!("sb{i}"),
            Some(&format!("sb{i}")),
            Some(&pod_ip(i)),
            true,
        );
        if cmd == "unready" {
            if let Some(existing) = api.get("bench", &format!("sb{i}")) {
                p = existing;
            }
            set_ready(&mut p, false);
        }
        api.apply(p);
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(n) = args.serve {
        rt.block_on(serve(n));
        return;
    }
    let (sizes, events) = (args.sizes, args.events);
    let exe = std::env::current_exe().expect("own path");
    println!(
        "{:>8} {:>14} {:>12} {:>12} {:>16} {:>14}",
        "routes", "initial list", "server", "client", "heap/route", "heap total"
    );
    let mut last = None;
    for &n in &sizes {
        let mut child = Command::new(&exe)
            .args(["--serve", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fake API server");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut port = String::new();
        out.read_line(&mut port).expect("port");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: b\n  user: {{}}\ncontexts:\n- name: b\n  context:\n    cluster: b\n    user: b\ncurrent-context: b\n",
            port.trim()
        )).expect("kubeconfig");
        let cfg = RouteSourceConfig::Kubernetes(KubeSourceConfig {
            namespaces: vec![],
            label: routing::contract::SANDBOX_ID_LABEL.into(),
            kubeconfig: Some(kubeconfig),
            default_port: 8080,
        });
        let before = live_heap_bytes();
        let table = Arc::new(RouteTable::new());
        let t0 = Instant::now();
        routing::source::start(
            &cfg,
            Arc::clone(&table),
            Arc::new(SourceStats::default()),
            rt.handle(),
            false,
        )
        .expect("start");
        while !table.is_synced() {
            std::thread::sleep(Duration::from_micros(200));
        }
        let list_time = t0.elapsed();
        assert_eq!(table.len() as usize, n, "every pod must be a route");
        // The server's share: building and serializing the list pages. The rest is the
        // client's (receiving, parsing, indexing), plus loopback transfer.
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "list-time").expect("command");
        let mut line = String::new();
        out.read_line(&mut line).expect("list time");
        let server = Duration::from_micros(line.trim().parse().expect("list time in µs"));
        let client = list_time.saturating_sub(server);
        child.stdin = Some(stdin);
        // Let the list's transient buffers go before counting what stays.
        std::thread::sleep(Duration::from_millis(500));
        let heap = live_heap_bytes() - before;
        println!(
            "{n:>8} {:>12.0}ms {:>10.0}ms {:>10.0}ms {:>14}B {:>12.1}MB",
            list_time.as_secs_f64() * 1e3,
            server.as_secs_f64() * 1e3,
            client.as_secs_f64() * 1e3,
            heap / n as isize,
            heap as f64 / 1e6
        );
        // Propagation is measured on the first (smallest) table: the fake server's own cost per
        // event grows with its state, and that is not the gateway's.
        if last.is_none() {
            last = Some((table, child, dir));
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    // Propagation over the first table.
    let Some((table, mut child, _dir)) = last else {
        return;
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let base = 10_000_000;
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for k in 0..events {
        let i = base + k;
        let id = format!("sb{i}");
        let t = Instant::now();
        writeln!(stdin, "add {i}").expect("command");
        // Event-driven: woken by the upsert itself (no spinning on a 2-core machine).
        let got = rt.block_on(table.wait_for(&id, Duration::from_secs(30)));
        assert!(got.is_some(), "{id} never became routable");
        up.push(t.elapsed());
        let t = Instant::now();
        writeln!(stdin, "unready {i}").expect("command");
        // A not-ready pod stays in the table as known-not-ready; unroutable = ready flag off.
        while table.get(&id).is_some_and(|r| r.spec.ready) {
            std::thread::sleep(Duration::from_micros(50));
        }
        down.push(t.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "propagation over {events} events (API server apply → route table), table of {} routes:",
        table.len()
    );
    println!(
        "  to routable:   p50 {:?}  p99 {:?}  max {:?}",
        pct(&mut up, 0.5),
        pct(&mut up, 0.99),
        pct(&mut up, 1.0)
    );
    println!(
        "  to unroutable: p50 {:?}  p99 {:?}  max {:?}",
        pct(&mut down, 0.5),
        pct(&mut down, 0.99),
        pct(&mut down, 1.0)
    );
}
