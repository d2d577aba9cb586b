//! CPU time and resident memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`,
//! and how long its threads waited for a CPU, from `/proc/<pid>/task/*/schedstat`.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    /// User + system CPU time so far, in seconds.
    pub cpu_secs: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// Number of threads.
    pub threads: u64,
    /// Seconds its live threads have spent runnable but waiting for a CPU (run-queue
    /// delay, summed over threads): on a shared machine, CPU time the process wanted
    /// and did not get.
    #[serde(default)]
    pub runq_wait_secs: f64,
}

/// Reads process `pid` (`None`: this process).
pub fn sample(pid: Option<u32>) -> Result<ProcSample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_owned(),
    };
    let stat =
        std::fs::read_to_string(format!("{dir}/stat")).with_context(|| format!("reading {dir}/stat"))?;
    let status =
        std::fs::read_to_string(format!("{dir}/status")).with_context(|| format!("reading {dir}/status"))?;
    let ticks = parse_stat_ticks(&stat).with_context(|| format!("parsing {dir}/stat"))?;
    Ok(ProcSample {
        cpu_secs: ticks as f64 / clock_ticks() as f64,
        rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
        hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        threads: status_kib(&status, "Threads:").unwrap_or(0),
        runq_wait_secs: runq_wait_ns(&dir) as f64 / 1e9,
    })
}

/// Run-queue delay of every live thread of the process in `dir`, ns (0 without schedstats).
fn runq_wait_ns(dir: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| parse_schedstat_wait(&s))
        .sum()
}

/// The second field of a `schedstat` line: time spent waiting on a run queue, ns.
pub fn parse_schedstat_wait(line: &str) -> Option<u64> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The process's command name (`/proc/<pid>/comm`), if readable.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_owned())
}

fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v > 0)
            .unwrap_or(100)
    })
}

/// utime + stime (fields 14 and 15) in clock ticks. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The number after `key` in `/proc/<pid>/status` (`kB` values are KiB).
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 8 0 1000 \
                    10000000 2000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        let status = "Name:\tgateway\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "Threads:"), Some(3));
    }

    #[test]
    fn reads_self() {
        let s = sample(None).unwrap();
        assert!(s.rss_kib > 0 && s.threads > 0);
        assert!(s.runq_wait_secs >= 0.0);
        assert_eq!(parse_schedstat_wait("330595492 1073176363 1200\n"), Some(1_073_176_363));
        assert_eq!(parse_schedstat_wait("garbage"), None);
    }
}
