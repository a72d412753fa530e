//! Statistics read from a cgroup's control files, normalised across v1 and
//! v2 so the shim can answer containerd's `Stats` call without caring which
//! one the node runs. Files that do not exist (a controller that is not
//! mounted or not enabled, an older kernel) read as 0.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::fsutil::{keyed, read_limit, read_optional, read_u64};

/// Nanoseconds per `USER_HZ` tick. `cpuacct.stat` counts in `USER_HZ`
/// (`sysconf(_SC_CLK_TCK)`), which the kernel fixes at 100 on every
/// architecture a container runtime runs on.
const NS_PER_TICK: u64 = 1_000_000_000 / 100;

/// v1 reports "no memory limit" as `PAGE_COUNTER_MAX * PAGE_SIZE`
/// (9223372036854771712 with 4 KiB pages); anything this large is treated as
/// unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

/// A snapshot of a cgroup's usage and limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Memory in use, bytes (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`).
    pub memory_usage: u64,
    /// Peak memory use, bytes (v1 `memory.max_usage_in_bytes`, v2
    /// `memory.peak` where the kernel has it, else 0).
    pub memory_max_usage: u64,
    /// Memory limit, bytes; 0 means no limit.
    pub memory_limit: u64,
    /// Page cache, bytes (v1 `total_cache`, v2 `file` in `memory.stat`).
    pub memory_cache: u64,
    /// Anonymous memory, bytes (v1 `total_rss`, v2 `anon` in `memory.stat`).
    pub memory_rss: u64,
    /// How many processes the OOM killer killed (v1 `oom_kill` in
    /// `memory.oom_control`, v2 `oom_kill` in `memory.events`).
    pub memory_oom_kill: u64,
    /// CPU time used, ns (v1 `cpuacct.usage`, v2 `usage_usec`).
    pub cpu_usage_total_ns: u64,
    /// User CPU time, ns (v1 `cpuacct.stat` ticks, v2 `user_usec`).
    pub cpu_user_ns: u64,
    /// System CPU time, ns (v1 `cpuacct.stat` ticks, v2 `system_usec`).
    pub cpu_system_ns: u64,
    /// CFS enforcement periods elapsed (`nr_periods` in `cpu.stat`).
    pub cpu_nr_periods: u64,
    /// Periods in which the cgroup was throttled (`nr_throttled`).
    pub cpu_nr_throttled: u64,
    /// Time throttled, ns (v1 `throttled_time`, v2 `throttled_usec`).
    pub cpu_throttled_ns: u64,
    /// Processes and threads in the cgroup (`pids.current`).
    pub pids_current: u64,
    /// `pids.max`; 0 means no limit.
    pub pids_limit: u64,
}

/// Directories of a v1 cgroup, per controller, for [`read_v1`].
#[derive(Default)]
pub(crate) struct V1Dirs<'a> {
    pub(crate) memory: Option<&'a Path>,
    pub(crate) cpu: Option<&'a Path>,
    pub(crate) cpuacct: Option<&'a Path>,
    pub(crate) pids: Option<&'a Path>,
}

fn keyed_file(dir: &Path, file: &str, keys: &[&str]) -> Result<Vec<Option<u64>>> {
    let path = dir.join(file);
    match read_optional(&path)? {
        Some(text) => keys.iter().map(|k| keyed(&path, &text, k)).collect(),
        None => Ok(vec![None; keys.len()]),
    }
}

pub(crate) fn read_v1(dirs: &V1Dirs<'_>) -> Result<Stats> {
    let mut s = Stats::default();
    if let Some(d) = dirs.memory {
        s.memory_usage = read_u64(&d.join("memory.usage_in_bytes"))?;
        s.memory_max_usage = read_u64(&d.join("memory.max_usage_in_bytes"))?;
        s.memory_limit = read_limit(&d.join("memory.limit_in_bytes"))?;
        if s.memory_limit >= V1_UNLIMITED {
            s.memory_limit = 0;
        }
        let stat = keyed_file(
            d,
            "memory.stat",
            &["total_cache", "cache", "total_rss", "rss"],
        )?;
        s.memory_cache = stat[0].or(stat[1]).unwrap_or(0);
        s.memory_rss = stat[2].or(stat[3]).unwrap_or(0);
        s.memory_oom_kill = keyed_file(d, "memory.oom_control", &["oom_kill"])?[0].unwrap_or(0);
    }
    if let Some(d) = dirs.cpuacct {
        s.cpu_usage_total_ns = read_u64(&d.join("cpuacct.usage"))?;
        let stat = keyed_file(d, "cpuacct.stat", &["user", "system"])?;
        s.cpu_user_ns = stat[0].unwrap_or(0).saturating_mul(NS_PER_TICK);
        s.cpu_system_ns = stat[1].unwrap_or(0).saturating_mul(NS_PER_TICK);
    }
    if let Some(d) = dirs.cpu {
        let stat = keyed_file(
            d,
            "cpu.stat",
            &["nr_periods", "nr_throttled", "throttled_time"],
        )?;
        s.cpu_nr_periods = stat[0].unwrap_or(0);
        s.cpu_nr_throttled = stat[1].unwrap_or(0);
        s.cpu_throttled_ns = stat[2].unwrap_or(0);
    }
    if let Some(d) = dirs.pids {
        s.pids_current = read_u64(&d.join("pids.current"))?;
        s.pids_limit = read_limit(&d.join("pids.max"))?;
    }
    Ok(s)
}

pub(crate) fn read_v2(d: &Path) -> Result<Stats> {
    let mut s = Stats {
        memory_usage: read_u64(&d.join("memory.current"))?,
        memory_max_usage: read_u64(&d.join("memory.peak"))?,
        memory_limit: read_limit(&d.join("memory.max"))?,
        pids_current: read_u64(&d.join("pids.current"))?,
        pids_limit: read_limit(&d.join("pids.max"))?,
        ..Stats::default()
    };
    let stat = keyed_file(d, "memory.stat", &["file", "anon"])?;
    s.memory_cache = stat[0].unwrap_or(0);
    s.memory_rss = stat[1].unwrap_or(0);
    s.memory_oom_kill = keyed_file(d, "memory.events", &["oom_kill"])?[0].unwrap_or(0);
    let us = |v: Option<u64>| v.unwrap_or(0).saturating_mul(1000);
    let cpu = keyed_file(
        d,
        "cpu.stat",
        &[
            "usage_usec",
            "user_usec",
            "system_usec",
            "nr_periods",
            "nr_throttled",
            "throttled_usec",
        ],
    )?;
    s.cpu_usage_total_ns = us(cpu[0]);
    s.cpu_user_ns = us(cpu[1]);
    s.cpu_system_ns = us(cpu[2]);
    s.cpu_nr_periods = cpu[3].unwrap_or(0);
    s.cpu_nr_throttled = cpu[4].unwrap_or(0);
    s.cpu_throttled_ns = us(cpu[5]);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn v1_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (mem, cpu, acct, pids) = (
            tmp.path().join("memory"),
            tmp.path().join("cpu"),
            tmp.path().join("cpuacct"),
            tmp.path().join("pids"),
        );
        for d in [&mem, &cpu, &acct, &pids] {
            fs::create_dir(d).unwrap();
        }
        write(
            &mem,
            &[
                ("memory.usage_in_bytes", "1048576\n"),
                ("memory.max_usage_in_bytes", "2097152\n"),
                ("memory.limit_in_bytes", "67108864\n"),
                (
                    "memory.stat",
                    "cache 10\nrss 20\nrss_huge 0\ntotal_cache 11\ntotal_rss 21\n",
                ),
                (
                    "memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
                ),
            ],
        );
        write(
            &acct,
            &[
                ("cpuacct.usage", "123456789\n"),
                ("cpuacct.stat", "user 27425\nsystem 4211\n"),
            ],
        );
        write(
            &cpu,
            &[(
                "cpu.stat",
                "nr_periods 10\nnr_throttled 4\nthrottled_time 5000\nnr_bursts 0\nburst_time 0\n",
            )],
        );
        write(&pids, &[("pids.current", "7\n"), ("pids.max", "max\n")]);
        let stats = read_v1(&V1Dirs {
            memory: Some(&mem),
            cpu: Some(&cpu),
            cpuacct: Some(&acct),
            pids: Some(&pids),
        })
        .unwrap();
        assert_eq!(
            stats,
            Stats {
                memory_usage: 1 << 20,
                memory_max_usage: 2 << 20,
                memory_limit: 64 << 20,
                memory_cache: 11,
                memory_rss: 21,
                memory_oom_kill: 3,
                cpu_usage_total_ns: 123_456_789,
                cpu_user_ns: 274_250_000_000,
                cpu_system_ns: 42_110_000_000,
                cpu_nr_periods: 10,
                cpu_nr_throttled: 4,
                cpu_throttled_ns: 5000,
                pids_current: 7,
                pids_limit: 0,
            }
        );
    }

    #[test]
    fn v1_unlimited_and_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            &[
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory.stat", "cache 5\nrss 6\n"),
                ("pids.max", "100\n"),
            ],
        );
        let stats = read_v1(&V1Dirs {
            memory: Some(d),
            pids: Some(d),
            ..V1Dirs::default()
        })
        .unwrap();
        assert_eq!(stats.memory_limit, 0);
        assert_eq!((stats.memory_cache, stats.memory_rss), (5, 6));
        assert_eq!(stats.pids_limit, 100);
        assert_eq!(stats.memory_usage, 0);
    }

    #[test]
    fn v2_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            &[
                ("memory.current", "4096\n"),
                ("memory.peak", "8192\n"),
                ("memory.max", "67108864\n"),
                ("memory.stat", "anon 100\nfile 200\nkernel 300\n"),
                (
                    "memory.events",
                    "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n",
                ),
                (
                    "cpu.stat",
                    "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 8\nnr_throttled 2\nthrottled_usec 70\nnr_bursts 0\nburst_usec 0\n",
                ),
                ("pids.current", "3\n"),
                ("pids.max", "64\n"),
            ],
        );
        assert_eq!(
            read_v2(d).unwrap(),
            Stats {
                memory_usage: 4096,
                memory_max_usage: 8192,
                memory_limit: 64 << 20,
                memory_cache: 200,
                memory_rss: 100,
                memory_oom_kill: 1,
                cpu_usage_total_ns: 1_500_000,
                cpu_user_ns: 1_000_000,
                cpu_system_ns: 500_000,
                cpu_nr_periods: 8,
                cpu_nr_throttled: 2,
                cpu_throttled_ns: 70_000,
                pids_current: 3,
                pids_limit: 64,
            }
        );
    }

    #[test]
    fn v2_no_peak_no_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(
            d,
            &[
                ("memory.current", "4096\n"),
                ("memory.max", "max\n"),
                ("pids.max", "max\n"),
                ("cpu.stat", "usage_usec 1\nuser_usec 1\nsystem_usec 0\n"),
            ],
        );
        let s = read_v2(d).unwrap();
        assert_eq!(s.memory_max_usage, 0);
        assert_eq!(s.memory_limit, 0);
        assert_eq!(s.pids_limit, 0);
        assert_eq!(s.cpu_nr_periods, 0);
        assert_eq!(s.cpu_usage_total_ns, 1000);
    }

    #[test]
    fn garbage_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &[("memory.current", "lots\n")]);
        let err = read_v2(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("memory.current"), "{err}");
    }
}
