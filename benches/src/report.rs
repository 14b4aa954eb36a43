//! Turns rounds of raw measurements into the report: medians over rounds, ratios to the baseline,
//! a terminal table and JSON.

use crate::loadgen::{new_hist, RunStats};
use crate::variants::VariantKind;
use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Percentiles on the latency plot's x axis.
pub const CURVE_PERCENTILES: [f64; 10] =
    [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];

/// One (round, workload, variant) measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: u32,
    pub ops: u64,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub errors: BTreeMap<String, u64>,
    /// Gateway CPU (Envoy + sidecars) used during the run; None for direct.
    pub gateway_cpu_s: Option<f64>,
}

/// All rounds of one workload on one variant.
pub struct Cell {
    pub workload: String,
    pub unit: &'static str,
    pub variant: VariantKind,
    pub samples: Vec<Sample>,
    /// Latencies of all rounds together, for the plot's percentile curve.
    pub merged: Histogram<u64>,
}

impl Cell {
    pub fn new(workload: &str, unit: &'static str, variant: VariantKind) -> Self {
        Cell {
            workload: workload.into(),
            unit,
            variant,
            samples: vec![],
            merged: new_hist(),
        }
    }

    pub fn add(&mut self, round: u32, s: &RunStats, gateway_cpu_s: Option<f64>) -> Result<()> {
        let ms = |q: f64| s.hist.value_at_quantile(q) as f64 / 1e6;
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        self.samples.push(Sample {
            round,
            ops: s.ops,
            elapsed_s: secs,
            ops_per_s: s.ops as f64 / secs,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: s.hist.max() as f64 / 1e6,
            errors: s.errors.clone(),
            gateway_cpu_s,
        });
        self.merged.add(&s.hist)?;
        Ok(())
    }
}

/// The median-over-rounds view of one cell, with ratios to the baseline variant.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workload: String,
    pub unit: &'static str,
    pub variant: VariantKind,
    pub rounds: usize,
    pub ops_total: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Worst single op over all rounds.
    pub max_ms: f64,
    pub errors: BTreeMap<String, u64>,
    /// Gateway CPU milliseconds per 1000 ops (the same number as CPU seconds per 1M ops).
    pub cpu_ms_per_1k: Option<f64>,
    /// This variant ÷ baseline for the same workload (throughput, p99, CPU per op): each round
    /// is paired with the baseline's run of the same round (they ran back to back), and these are
    /// the medians of the per-round ratios, so drift between rounds cancels out.
    pub ops_ratio: Option<Ratio>,
    pub p99_ratio: Option<Ratio>,
    pub cpu_ratio: Option<Ratio>,
    /// (percentile, ms) over all rounds' latencies, for plotting.
    pub curve: Vec<(f64, f64)>,
    pub samples: Vec<Sample>,
}

/// A paired ratio: the median of the per-round ratios, and their range (the run's noise).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Ratio {
    /// `a[i] / b[i]` for the rounds both sides have; None if there are none.
    fn paired(pairs: impl Iterator<Item = (f64, f64)>) -> Option<Ratio> {
        let r: Vec<f64> = pairs
            .filter(|&(a, b)| b > 0.0 && a.is_finite())
            .map(|(a, b)| a / b)
            .collect();
        if r.is_empty() {
            return None;
        }
        Some(Ratio {
            min: r.iter().copied().fold(f64::INFINITY, f64::min),
            max: r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median: median(r),
        })
    }
}

fn cpu_per_1k(s: &Sample) -> Option<f64> {
    s.gateway_cpu_s.map(|cpu| cpu * 1e6 / s.ops.max(1) as f64)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn summarize(cells: &[Cell]) -> Vec<Summary> {
    let mut out: Vec<Summary> = cells
        .iter()
        .map(|c| {
            let med = |f: fn(&Sample) -> f64| median(c.samples.iter().map(f).collect());
            let mut errors = BTreeMap::new();
            for s in &c.samples {
                for (k, v) in &s.errors {
                    *errors.entry(k.clone()).or_default() += v;
                }
            }
            let cpu: Vec<f64> = c.samples.iter().filter_map(cpu_per_1k).collect();
            Summary {
                workload: c.workload.clone(),
                unit: c.unit,
                variant: c.variant,
                rounds: c.samples.len(),
                ops_total: c.samples.iter().map(|s| s.ops).sum(),
                ops_per_s: med(|s| s.ops_per_s),
                p50_ms: med(|s| s.p50_ms),
                p90_ms: med(|s| s.p90_ms),
                p99_ms: med(|s| s.p99_ms),
                p999_ms: med(|s| s.p999_ms),
                max_ms: c.samples.iter().map(|s| s.max_ms).fold(0.0, f64::max),
                errors,
                cpu_ms_per_1k: (!cpu.is_empty()).then(|| median(cpu)),
                ops_ratio: None,
                p99_ratio: None,
                cpu_ratio: None,
                curve: CURVE_PERCENTILES
                    .iter()
                    .map(|&p| {
                        let v = c.merged.value_at_quantile(p / 100.0) as f64 / 1e6;
                        (p, v)
                    })
                    .collect(),
                samples: c.samples.clone(),
            }
        })
        .collect();
    let baselines: Vec<Summary> = out
        .iter()
        .filter(|s| s.variant == VariantKind::BASELINE)
        .cloned()
        .collect();
    for s in &mut out {
        let Some(b) = baselines.iter().find(|b| b.workload == s.workload) else {
            continue;
        };
        let paired = |f: &dyn Fn(&Sample) -> Option<f64>| {
            Ratio::paired(s.samples.iter().filter_map(|a| {
                let base = b.samples.iter().find(|x| x.round == a.round)?;
                Some((f(a)?, f(base)?))
            }))
        };
        s.ops_ratio = paired(&|x| Some(x.ops_per_s));
        s.p99_ratio = paired(&|x| Some(x.p99_ms));
        s.cpu_ratio = paired(&cpu_per_1k);
    }
    out
}

/// Resident memory of a variant's processes after the run.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub variant: VariantKind,
    pub envoy_rss_kib: Option<u64>,
    pub sidecar_rss_kib: Option<u64>,
}

/// `0.95x (0.90-1.01)`: the median per-round ratio and, with several rounds, their range.
fn ratio_cell(r: Option<Ratio>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.min == r.max => format!("{:.2}x", r.median),
        Some(r) => format!("{:.2}x ({:.2}-{:.2})", r.median, r.min, r.max),
    }
}

fn errors_cell(e: &BTreeMap<String, u64>) -> String {
    if e.is_empty() {
        return "0".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The terminal table (also pasted into BENCHMARKS.md, hence Markdown-compatible).
pub fn table(summaries: &[Summary], memory: &[Memory]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | variant | ops/s | vs static | p50 ms | p90 ms | p99 ms | vs static | p99.9 ms | max ms | errors | gw CPU ms/1k ops | vs static |"
    );
    let _ = writeln!(t, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|");
    let mut last = "";
    for s in summaries {
        let wl = if s.workload == last {
            String::new()
        } else {
            format!("{} ({})", s.workload, s.unit)
        };
        last = &s.workload;
        let _ = writeln!(
            t,
            "| {wl} | {} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {} | {:.3} | {:.2} | {} | {} | {} |",
            s.variant.name(),
            s.ops_per_s,
            ratio_cell(s.ops_ratio),
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            ratio_cell(s.p99_ratio),
            s.p999_ms,
            s.max_ms,
            errors_cell(&s.errors),
            s.cpu_ms_per_1k
                .map_or_else(|| "-".into(), |c| format!("{c:.1}")),
            ratio_cell(s.cpu_ratio),
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "| variant | Envoy RSS MiB | sidecar RSS MiB |");
    let _ = writeln!(t, "|---|--:|--:|");
    let mib =
        |k: Option<u64>| k.map_or_else(|| "-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    for m in memory {
        let _ = writeln!(
            t,
            "| {} | {} | {} |",
            m.variant.name(),
            mib(m.envoy_rss_kib),
            mib(m.sidecar_rss_kib)
        );
    }
    t
}

/// Problems that make a run's results unusable: a cell with no successful ops, or errors on
/// traffic that is all valid. `--quick` fails on any; a full run reports them.
pub fn sanity_problems(summaries: &[Summary]) -> Vec<String> {
    let mut problems = vec![];
    for s in summaries {
        let who = format!("{} / {}", s.workload, s.variant.name());
        if s.ops_total == 0 {
            problems.push(format!("{who}: no successful {}s", s.unit));
        }
        if !s.errors.is_empty() {
            problems.push(format!("{who}: errors {}", errors_cell(&s.errors)));
        }
        if s.p50_ms <= 0.0 || !s.ops_per_s.is_finite() {
            problems.push(format!("{who}: no latency recorded"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_cancels_drift_between_rounds() {
        // The machine slows down by half in round 2; the variant is 10% slower in both rounds.
        let r =
            Ratio::paired([(90.0, 100.0), (45.0, 50.0), (99.0, 100.0)].into_iter()).expect("ratio");
        assert!((r.median - 0.9).abs() < 1e-9, "{r:?}");
        assert!(
            (r.min - 0.9).abs() < 1e-9 && (r.max - 0.99).abs() < 1e-9,
            "{r:?}"
        );
        assert_eq!(Ratio::paired([(1.0, 0.0)].into_iter()), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
