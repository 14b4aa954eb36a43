//! CPU pinning and per-process cost from /proc: CPU seconds (utime + stime) and resident memory.
//! The system calls go through `rustix` (no unsafe code here).

use anyhow::{bail, Context, Result};
use rustix::thread::{sched_setaffinity, CpuSet};

/// Pins the calling thread (and every thread or process it creates afterwards, which inherit the
/// mask) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    if cpus.is_empty() {
        bail!("empty CPU list");
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        if cpu >= CpuSet::MAX_CPU {
            bail!("CPU {cpu} out of range");
        }
        set.set(cpu);
    }
    // `None` is the calling thread.
    sched_setaffinity(None, &set).with_context(|| format!("sched_setaffinity({cpus:?})"))
}

/// Clock ticks per second for /proc/<pid>/stat times.
fn clk_tck() -> f64 {
    // sysconf's -1 (an error, never seen on Linux) arrives as u64::MAX through rustix's cast.
    let t = rustix::param::clock_ticks_per_second();
    if t > 0 && i64::try_from(t).is_ok() {
        t as f64
    } else {
        100.0
    }
}

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
    Ok((ticks(11)? + ticks(12)?) / clk_tck())
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
    fn pins_the_calling_thread() {
        // Runs on its own test thread, so the narrowed mask does not leak into other tests.
        pin_current_thread(&[0]).unwrap();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(str::trim);
        assert_eq!(allowed, Some("0"));
        assert!(pin_current_thread(&[]).is_err());
        assert!(pin_current_thread(&[CpuSet::MAX_CPU]).is_err());
        assert!(clk_tck() >= 1.0);
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
