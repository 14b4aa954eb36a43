//! Cost of merging reports into the last-active aggregate, in-process: a timed run, not a test.
//!
//! `cargo bench -p sandbox-gateway-bench --bench last_active_merge [-- <sandboxes> <rounds>]`
//! (`make bench-last-active` runs it after `last_active`)
//!
//! Times, per merged entry: updates of sandboxes already known (the normal case: every report
//! interval re-sends the active ones), inserts into a full table (a flood of new IDs: every
//! insert past the bound evicts) with the slowest batch among them (the lock is held that long),
//! the same updates from two threads at once, and one `sweep`.

#![deny(unsafe_code)]

use anyhow::Result;
use clap::Parser;
use sandbox_extproc::aggregate::Aggregator;
use std::time::{Duration, Instant};

const BATCH: usize = 10_000;

fn ns_per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Merges `ids` in batches; returns the slowest batch (the lock is held that long).
fn merge_all(a: &Aggregator, ids: &[String], ts: u64) -> Duration {
    let mut slowest = Duration::ZERO;
    for chunk in ids.chunks(BATCH) {
        let t = Instant::now();
        a.merge(chunk.iter().map(|s| (s.as_str(), ts)));
        slowest = slowest.max(t.elapsed());
    }
    slowest
}

/// Merges into the last-active aggregate: updates, a flood into a full table, two threads, sweep.
#[derive(Parser, Debug)]
#[command(name = "last_active_merge")]
struct Args {
    /// Sandboxes in the aggregate (also its bound).
    #[arg(default_value_t = 100_000)]
    sandboxes: usize,
    /// Rounds of each measure (the median is printed).
    #[arg(default_value_t = 5)]
    rounds: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (n, rounds) = (args.sandboxes, args.rounds);
    let ids: Vec<String> = (0..n).map(|i| format!("sandbox-{i:07}")).collect();
    let fresh: Vec<String> = (0..n).map(|i| format!("flood-{i:07}")).collect();
    let forget = Duration::from_secs(3600);

    let (mut update, mut update_2t, mut sweep) = (vec![], vec![], vec![]);
    let (mut insert_full, mut slowest_full) = (vec![], vec![]);
    let mut evicted = 0;
    for r in 0..rounds {
        let base = 1_790_000_000_000u64 + r as u64 * 10 * n as u64;

        // Updates of known sandboxes, nothing evicted.
        let a = Aggregator::new(n, forget);
        merge_all(&a, &ids, base);
        let t = Instant::now();
        merge_all(&a, &ids, base + 1);
        update.push(ns_per(t.elapsed(), n));

        // Two reporters' streams merging the same sandboxes at once.
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..2 {
                let (a, ids) = (&a, &ids);
                s.spawn(move || {
                    merge_all(a, ids, base + 2 + k);
                });
            }
        });
        update_2t.push(ns_per(t.elapsed(), 2 * n));

        // One sweep over every entry, every route present.
        let t = Instant::now();
        a.sweep(base, |_| true);
        sweep.push(t.elapsed().as_secs_f64() * 1e3);

        // The table is full: n new IDs, each insert past the bound evicts.
        let t = Instant::now();
        slowest_full.push(merge_all(&a, &fresh, base + 3).as_secs_f64() * 1e3);
        insert_full.push(ns_per(t.elapsed(), n));
        assert!(a.len() <= n);
        evicted = a.evicted();
    }
    println!("{n} sandboxes, {rounds} rounds, batches of {BATCH} (median of rounds):");
    println!(
        "  update known sandbox        {:>9.1} ns/entry",
        median(update)
    );
    println!(
        "  update, 2 threads at once   {:>9.1} ns/entry",
        median(update_2t)
    );
    println!(
        "  insert into a full table    {:>9.1} ns/entry   ({evicted} evicted per round)",
        median(insert_full)
    );
    println!(
        "  slowest batch, full table   {:>9.2} ms",
        median(slowest_full)
    );
    println!("  sweep (all routes present)  {:>9.2} ms", median(sweep));
    Ok(())
}
