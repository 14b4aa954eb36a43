//! `sandbox-bench`: what does the sandbox gateway cost? Starts upstream sandboxes, plain and
//! module-mode Envoys (and ext_proc mode when it exists), drives the same workloads through each,
//! interleaved round by round, and reports medians, ratios to plain Envoy, a JSON file and an SVG
//! plot. See BENCHMARKS.md; every benchmark of the workspace is listed in benches/README.md.

// The crate's unsafe code (libc calls, the counting allocator) is all in the library's `sys`.
#![deny(unsafe_code)]

mod cli;
mod loadgen;
mod plot;
mod report;
mod variants;
mod workloads;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use hyper::header::HeaderValue;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use report::{Cell, Memory};
use sandbox_gateway_bench::{procfs, sys};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{info, warn};
use variants::{Setup, Variant, VariantKind};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sandbox_bench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = cli::Args::parse().resolve();
    // A machine with fewer CPUs than the pinning asks for runs unpinned rather than failing.
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !args.no_pin && (args.envoy_cpus.iter().chain(&args.load_cpus)).any(|&c| c >= ncpu) {
        warn!(
            ncpu,
            "not enough CPUs for --envoy-cpus/--load-cpus: running unpinned"
        );
        args.no_pin = true;
    }

    // Decided before any thread exists: the env var is read by the Envoy launcher.
    let module_dir = module_dir(&args);
    std::env::set_var("SANDBOX_GATEWAY_MODULE_DIR", &module_dir);
    info!(module_dir = %module_dir.display(), "using libsandbox_gateway.so from here");
    // sandbox-extproc from the same build as the module, unless told otherwise; quiet, since
    // per-request logging would be measured as gateway cost.
    if std::env::var_os("SANDBOX_EXTPROC_BIN").is_none() {
        let bin = module_dir.join("sandbox-extproc");
        if bin.exists() {
            std::env::set_var("SANDBOX_EXTPROC_BIN", bin);
        }
    }
    if std::env::var_os("SANDBOX_EXTPROC_LOG").is_none() {
        std::env::set_var("SANDBOX_EXTPROC_LOG", "warn");
    }

    // The runtime's threads inherit the main thread's mask: load generator and upstreams share
    // the load CPUs, away from Envoy's.
    if !args.no_pin {
        sys::pin_current_thread(&args.load_cpus).context("pinning the load generator")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.load_cpus.len().max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args, ncpu))
}

/// `--module-dir`, else `$SANDBOX_GATEWAY_MODULE_DIR`, else the release build if there is one.
fn module_dir(args: &cli::Args) -> PathBuf {
    if let Some(d) = &args.module_dir {
        return d.clone();
    }
    if let Some(d) = std::env::var_os("SANDBOX_GATEWAY_MODULE_DIR") {
        return d.into();
    }
    let root = sandbox_gateway_harness::envoy::repo_root();
    let release = root.join("target/release");
    if release.join("libsandbox_gateway.so").exists() {
        release
    } else {
        root.join("target/debug")
    }
}

/// `ncpu`: the machine's CPUs, counted before pinning (afterwards the mask says 1).
async fn run(args: cli::Args, ncpu: usize) -> Result<()> {
    let workloads = workloads::all(&args);
    if workloads.is_empty() {
        bail!("no workloads selected (--workloads)");
    }
    let mut kinds = vec![];
    for kind in VariantKind::ALL {
        if !args.variants.is_empty() && !args.variants.iter().any(|v| v == kind.name()) {
            continue;
        }
        match variants::available(kind) {
            Ok(()) => kinds.push(kind),
            Err(why) => warn!(variant = kind.name(), "skipped: {why}"),
        }
    }
    if kinds.is_empty() {
        bail!("no variants selected (--variants)");
    }

    let n_ids = workloads
        .iter()
        .map(|w| w.spread.max_ids())
        .max()
        .unwrap_or(1);
    let upstreams = variants::start_upstreams(args.upstreams).await?;
    let upstream_addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let dir = tempfile::tempdir()?;
    let routes_path = dir.path().join("routes.json");
    variants::write_route_file(&routes_path, n_ids, &upstream_addrs)?;
    let setup = Setup {
        workers: args.workers,
        envoy_cpus: (!args.no_pin).then(|| args.envoy_cpus.clone()),
        upstreams: upstream_addrs,
        routes_path,
    };
    let mut started: Vec<Variant> = vec![];
    for &kind in &kinds {
        info!(variant = kind.name(), routes = n_ids, "starting");
        started.push(variants::start(kind, &setup, n_ids).await?);
    }

    let ids: Vec<HeaderValue> = (0..n_ids)
        .map(|i| HeaderValue::from_str(&workloads::sandbox_id(i)))
        .collect::<Result<_, _>>()?;
    let post_body = Bytes::from(vec![b'x'; args.post_bytes]);
    let opts_for = |v: &Variant| loadgen::LoadOpts {
        targets: v.targets.clone(),
        ids: Arc::new(ids.clone()),
        post_body: post_body.clone(),
        sse_events: args.sse_events,
        zipf_s: args.zipf_s,
    };
    let opts: Vec<_> = started.iter().map(opts_for).collect();

    let runs = workloads.len() * started.len() * (args.rounds as usize + 1);
    let pb = ProgressBar::new(runs as u64);
    if args.no_progress {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} (eta {eta}) {msg}")?
            .progress_chars("=> "),
    );

    // Warm-up once per pair: connection pools, page cache, the module's first lookups.
    for w in &workloads {
        for (v, o) in started.iter().zip(&opts) {
            pb.set_message(format!("warm-up {} / {}", w.name, v.kind.name()));
            loadgen::run(w, o, args.warmup).await?;
            pb.inc(1);
        }
    }

    let cpu_at_start = procfs::CpuTimes::now()?;
    let mut cells: Vec<Cell> = workloads
        .iter()
        .flat_map(|w| started.iter().map(|v| Cell::new(&w.name, w.unit, v.kind)))
        .collect();
    let n_var = started.len();
    for round in 1..=args.rounds {
        for (w_i, w) in workloads.iter().enumerate() {
            // Interleave variants, and rotate who goes first each round so no variant always
            // runs right after the same neighbour.
            for step in 0..n_var {
                let v_i = (step + round as usize) % n_var;
                let v = &mut started[v_i];
                pb.set_message(format!("round {round}: {} / {}", w.name, v.kind.name()));
                let cpu0 = v.cpu_seconds()?;
                let stats = loadgen::run(w, &opts[v_i], args.duration).await?;
                let cpu = (!v.gateway_pids().is_empty())
                    .then(|| v.cpu_seconds().map(|c| c - cpu0))
                    .transpose()?;
                v.check_alive()?;
                cells[w_i * n_var + v_i].add(round, &stats, cpu)?;
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    // On a shared VM the hypervisor's steal is the main source of noise: say how much there was.
    let steal_percent = cpu_at_start.steal_percent_until(procfs::CpuTimes::now()?);

    let memory: Vec<Memory> = started
        .iter()
        .map(|v| Memory {
            variant: v.kind,
            envoy_rss_kib: v.envoy_pid().and_then(|p| procfs::rss_kib(p).ok()),
            sidecar_rss_kib: {
                let pids = v.sidecar_pids();
                (!pids.is_empty())
                    .then(|| pids.iter().filter_map(|&p| procfs::rss_kib(p).ok()).sum())
            },
        })
        .collect();
    let summaries = report::summarize(&cells);
    let table = format!(
        "{}\nCPU steal during the measured rounds: {steal_percent:.1}% of all CPU time (a VM's \
         CPUs waiting for the hypervisor; high steal means noisy wall-clock numbers).\n",
        report::table(&summaries, &memory)
    );
    println!("{table}");

    std::fs::create_dir_all(&args.out)?;
    let machine = serde_json::json!({
        "nproc": ncpu,
        "cpu_model": procfs::cpu_model(),
        "module_dir": std::env::var("SANDBOX_GATEWAY_MODULE_DIR").unwrap_or_default(),
        "cpu_steal_percent": steal_percent,
    });
    let json = serde_json::json!({
        "machine": machine,
        "extproc_bin": std::env::var("SANDBOX_EXTPROC_BIN").unwrap_or_default(),
        "args": &args,
        "workloads": &workloads,
        "memory": &memory,
        "summaries": &summaries,
    });
    let json_path = args.out.join("report.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(args.out.join("table.md"), &table)?;
    let svg_path = args.out.join("latency.svg");
    let title = format!(
        "sandbox-gateway: latency by percentile (median of {} interleaved rounds, {} Envoy worker(s))",
        args.rounds, args.workers
    );
    plot::latency_svg(&svg_path, &summaries, &title)?;
    println!(
        "wrote {}, {} and {}",
        json_path.display(),
        args.out.join("table.md").display(),
        svg_path.display()
    );

    let problems = report::sanity_problems(&summaries);
    for p in &problems {
        warn!("{p}");
    }
    if args.quick {
        if !problems.is_empty() {
            bail!("quick bench: {} problem(s), see above", problems.len());
        }
        println!(
            "quick bench: {} workload/variant pairs served, no errors",
            summaries.len()
        );
    }
    drop(started);
    for u in upstreams {
        u.shutdown().await;
    }
    Ok(())
}
