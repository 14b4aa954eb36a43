//! Per-process cost from /proc: CPU seconds (utime + stime) and resident memory; machine-wide CPU
//! steal and the CPU model. (CPU pinning is in [`crate::sys`].) In the library so the
//! `sandbox-bench` binary and the `abuse` bench read /proc the same way.

use crate::sys::clock_ticks_per_second;
use anyhow::{Context, Result};

/// CPU seconds (user + system) the process has used so far, all threads included.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses: count fields after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("non-numeric /proc stat time")? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second())
}

/// Resident set size in KiB (VmRSS from /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")
}

/// Machine-wide CPU time from the `cpu` line of /proc/stat, in ticks: all states, and "steal"
/// (time a virtual machine's CPUs were runnable but the hypervisor ran someone else).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub total: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn now() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_cpu_line(&stat).context("no aggregate cpu line in /proc/stat")
    }

    /// Percentage of CPU time stolen between `self` and the later `end`.
    pub fn steal_percent_until(self, end: CpuTimes) -> f64 {
        let total = end.total.saturating_sub(self.total);
        let steal = end.steal.saturating_sub(self.steal);
        if total == 0 {
            0.0
        } else {
            100.0 * steal as f64 / total as f64
        }
    }
}

fn parse_cpu_line(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user and nice, so only the first eight add up to the total.
    Some(CpuTimes {
        total: v.iter().take(8).sum(),
        steal: *v.get(7)?,
    })
}

/// The CPU model line, for the report and BENCHMARKS.md.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(rss_kib(pid).unwrap() > 0);
    }

    #[test]
    fn steal_from_proc_stat() {
        let a = parse_cpu_line("cpu  100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n").unwrap();
        let b = parse_cpu_line("cpu  200 0 100 1500 0 0 0 200 10 0\n").unwrap();
        assert_eq!((a.total, a.steal), (1000, 50));
        assert!((a.steal_percent_until(b) - 15.0).abs() < 1e-9);
        assert!(parse_cpu_line("intr 1 2\n").is_none());
        assert!(CpuTimes::now().is_ok());
    }
}
