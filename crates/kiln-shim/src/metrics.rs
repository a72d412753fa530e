//! Cgroup statistics in the message types containerd decodes for `ctr task metrics` and the
//! CRI's container stats: `io.containerd.cgroups.v1.Metrics` or `...v2.Metrics`, chosen by the
//! node's cgroup version, as runc's shim does.

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use kiln_cgroups::Stats;

/// Encodes `s` for a cgroup of `version` (1 or 2).
pub fn to_any(version: u8, s: &Stats) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let (type_url, value) = if version == 2 {
        (
            "io.containerd.cgroups.v2.Metrics",
            v2_metrics(s).write_to_bytes()?,
        )
    } else {
        (
            "io.containerd.cgroups.v1.Metrics",
            v1_metrics(s).write_to_bytes()?,
        )
    };
    let mut any = Any::new();
    any.type_url = type_url.to_string();
    any.value = value;
    Ok(any)
}

fn v1_metrics(s: &Stats) -> v1::Metrics {
    let mut m = v1::Metrics::new();
    m.pids = Some(v1::PidsStat {
        current: s.pids_current,
        limit: s.pids_limit,
        ..Default::default()
    })
    .into();
    m.cpu = Some(v1::CPUStat {
        usage: Some(v1::CPUUsage {
            total: s.cpu_usage_total_ns,
            kernel: s.cpu_system_ns,
            user: s.cpu_user_ns,
            ..Default::default()
        })
        .into(),
        throttling: Some(v1::Throttle {
            periods: s.cpu_nr_periods,
            throttled_periods: s.cpu_nr_throttled,
            throttled_time: s.cpu_throttled_ns,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
    .into();
    m.memory = Some(v1::MemoryStat {
        cache: s.memory_cache,
        rss: s.memory_rss,
        total_cache: s.memory_cache,
        total_rss: s.memory_rss,
        hierarchical_memory_limit: s.memory_limit,
        usage: Some(v1::MemoryEntry {
            limit: s.memory_limit,
            usage: s.memory_usage,
            max: s.memory_max_usage,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
    .into();
    m.memory_oom_control = Some(v1::MemoryOomControl {
        oom_kill: s.memory_oom_kill,
        ..Default::default()
    })
    .into();
    m
}

fn v2_metrics(s: &Stats) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    m.pids = Some(v2::PidsStat {
        current: s.pids_current,
        limit: s.pids_limit,
        ..Default::default()
    })
    .into();
    m.cpu = Some(v2::CPUStat {
        usage_usec: s.cpu_usage_total_ns / 1000,
        user_usec: s.cpu_user_ns / 1000,
        system_usec: s.cpu_system_ns / 1000,
        nr_periods: s.cpu_nr_periods,
        nr_throttled: s.cpu_nr_throttled,
        throttled_usec: s.cpu_throttled_ns / 1000,
        ..Default::default()
    })
    .into();
    m.memory = Some(v2::MemoryStat {
        anon: s.memory_rss,
        file: s.memory_cache,
        usage: s.memory_usage,
        usage_limit: s.memory_limit,
        max_usage: s.memory_max_usage,
        ..Default::default()
    })
    .into();
    m.memory_events = Some(v2::MemoryEvents {
        oom_kill: s.memory_oom_kill,
        ..Default::default()
    })
    .into();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_carry_the_numbers_ctr_prints() {
        let s = Stats {
            memory_usage: 10 << 20,
            memory_limit: 64 << 20,
            pids_current: 1,
            cpu_usage_total_ns: 5_000_000,
            ..Default::default()
        };
        let a = to_any(1, &s).expect("v1");
        assert_eq!(a.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = v1::Metrics::parse_from_bytes(&a.value).expect("decode");
        assert_eq!(m.memory.usage.usage, 10 << 20);
        assert_eq!(m.memory.usage.limit, 64 << 20);
        assert_eq!(m.pids.current, 1);
        assert_eq!(m.cpu.usage.total, 5_000_000);
        let a = to_any(2, &s).expect("v2");
        assert_eq!(a.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = v2::Metrics::parse_from_bytes(&a.value).expect("decode");
        assert_eq!(m.memory.usage, 10 << 20);
        assert_eq!(m.memory.usage_limit, 64 << 20);
        assert_eq!(m.cpu.usage_usec, 5000);
    }
}
