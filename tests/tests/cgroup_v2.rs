//! What Kiln does on a cgroup v2 node: limits written to the v2 files and enforced, v2
//! statistics, the worker cloned straight into its cgroup, and the cgroup removed afterwards.
//!
//! The project's machines mount the v1 controllers, so these tests are `#[ignore]`d there (and
//! reported as ignored, never passed); `scripts/vm-v2.sh` runs them with `--ignored` in a VM
//! whose /sys/fs/cgroup is cgroup2 alone with every controller. Each test first checks that it
//! really is on such a node and fails loudly otherwise, so `--ignored` on a v1 host fails.
//!
//! containerd runs at debug level here: one test reads the zygote's and the worker's debug
//! lines. The VM emulates its CPUs (10–50 times slower): scripts/vm-v2.sh scales every deadline
//! with `KILN_E2E_SLOW`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_e2e::{
    Container, Kiln, RUNTIME, assert_cleaned_up, image, kiln_with_env, processes_of, wait_until,
};
use kiln_image::Image;

/// How long a container may take to start, or a finished one to be seen STOPPED (a first
/// start compiles its module).
const SLOW: Duration = Duration::from_secs(60);

/// The cgroup v2 mount point.
const ROOT: &str = "/sys/fs/cgroup";

/// Fails the test unless /sys/fs/cgroup is a cgroup2 mount, no v1 hierarchy is mounted, and
/// the root offers the controllers Kiln sets limits with.
#[track_caller]
fn assert_v2_node() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let fstype_at = |dir: &str| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(1) == Some(&dir)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    };
    let cgroup_mounts: Vec<&str> = mounts.lines().filter(|l| l.contains("cgroup")).collect();
    assert_eq!(
        fstype_at(ROOT).as_deref(),
        Some("cgroup2"),
        "this test needs a cgroup v2 node: {ROOT} is not a cgroup2 mount \
         (run it with scripts/vm-v2.sh); cgroup mounts:\n{}",
        cgroup_mounts.join("\n")
    );
    let v1: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("cgroup"))
        .collect();
    assert!(
        v1.is_empty(),
        "this test needs a cgroup v2 node, and v1 hierarchies are mounted (a hybrid host):\n{}",
        v1.join("\n")
    );
    let controllers = read(Path::new(ROOT), "cgroup.controllers");
    for c in ["cpu", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "the root cgroup offers no {c} controller (cgroup.controllers: {controllers:?})"
        );
    }
}

/// The private containerd of this test binary, at debug level, once the node is checked.
fn v2_kiln() -> &'static Kiln {
    assert_v2_node();
    kiln_with_env(&[("CONTAINERD_LOG_LEVEL", "debug")])
}

/// The cgroup directory of a container `ctr` created (`/default/ID`).
fn cgroup_of(c: &Container) -> PathBuf {
    Path::new(ROOT).join("default").join(&c.id)
}

/// A control file's content, trimmed; panics naming the file when it cannot be read.
#[track_caller]
fn read(dir: &Path, file: &str) -> String {
    let path = dir.join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// A flat-keyed control file (`cpu.stat`, `memory.events`) as a map.
#[track_caller]
fn keyed(dir: &Path, file: &str) -> HashMap<String, u64> {
    read(dir, file)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Starts `run` detached and returns the worker's pid once the task is RUNNING.
#[track_caller]
fn start(c: &Container, out: kiln_e2e::Output) -> u32 {
    assert!(out.success(), "ctr run -d {} failed:\n{out}", c.id);
    c.wait_status("RUNNING", SLOW)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

/// Kills the task and waits until it is STOPPED.
fn stop(c: &Container) {
    let _ = c.kill(Some("SIGKILL"));
    let _ = c.wait_status("STOPPED", SLOW);
}

/// `ctr task delete`, returning the exit status from its warning (`... exit code N`).
#[track_caller]
fn delete_task(c: &Container) -> i32 {
    let out = c.delete_task();
    assert!(out.success(), "ctr task delete {} failed:\n{out}", c.id);
    out.stderr
        .split("exit code ")
        .nth(1)
        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn pid_parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn unified_cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn memory_max_is_the_limit_and_memgrow_stops_below_it() {
    let k = v2_kiln();
    let limit: u64 = 64 << 20;
    let c = k.container("v2-memgrow");
    let out = c
        .run(&image("memgrow"))
        .memory_limit(limit)
        .timeout(SLOW)
        .detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("STOPPED", SLOW)
        .unwrap_or_else(|| panic!("memgrow did not finish; task: {:?}", c.task()));

    // The cgroup outlives the task until Delete: its files tell what the kernel saw.
    let dir = cgroup_of(&c);
    assert_eq!(read(&dir, "memory.max"), limit.to_string(), "memory.max");
    let peak: u64 = read(&dir, "memory.peak").parse().expect("memory.peak");
    let events = keyed(&dir, "memory.events");
    let output = std::fs::read_to_string(k.container_log(&c.id)).unwrap_or_default();
    let status = delete_task(&c);

    assert_eq!(
        status, 12,
        "memgrow under a {limit} byte limit must see memory.grow fail (exit 12), not be \
         killed; output:\n{output}"
    );
    let at: u64 = output
        .lines()
        .find_map(|l| {
            l.strip_prefix("memory.grow failed at ")?
                .strip_suffix(" MiB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `memory.grow failed at N MiB` line:\n{output}"));
    assert!(
        (1..64).contains(&at),
        "memory.grow failed at {at} MiB; expected below the 64 MiB limit:\n{output}"
    );
    assert_eq!(
        events.get("oom_kill"),
        Some(&0),
        "the kernel OOM-killed in the container's cgroup: memory.events {events:?}"
    );
    assert!(
        peak <= limit,
        "memory.peak {peak} is above memory.max {limit}"
    );
    // A worker outside its container's cgroup would leave next to nothing charged here.
    assert!(
        peak >= 1 << 20,
        "memory.peak is {peak} bytes: the worker's memory is not charged to its container's \
         cgroup"
    );
    let out = c.delete_container();
    assert!(out.success(), "{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(10));
}

/// A guest that never returns and never calls the host.
fn busy_loop_image(k: &'static Kiln) -> String {
    let reference = "docker.io/kiln-test/busyloop:latest";
    let wasm = wat::parse_str(r#"(module (func (export "_start") (loop $spin (br $spin))))"#)
        .expect("the busy loop's WAT");
    let img = Image::single_file(reference, "/busyloop.wasm", wasm).expect("describe the image");
    let out = k.import_image(&img);
    assert!(out.success(), "import {reference}:\n{out}");
    reference.to_string()
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn cpu_max_from_quota_and_period_throttles_a_busy_guest() {
    let k = v2_kiln();
    let reference = busy_loop_image(k);
    let c = k.container("v2-cpu");
    start(
        &c,
        c.run(&reference)
            .opt("--cpu-quota")
            .opt("20000")
            .opt("--cpu-period")
            .opt("100000")
            .timeout(SLOW)
            .detach(),
    );
    let dir = cgroup_of(&c);
    let cpu_max = read(&dir, "cpu.max");
    // ctr's default spec carries 1024 shares; runc's conversion to a weight is
    // 1 + ((shares - 2) * 9999) / 262142.
    let weight = read(&dir, "cpu.weight");
    let throttled = wait_until(SLOW, || {
        let stat = keyed(&dir, "cpu.stat");
        (stat.get("nr_throttled").is_some_and(|n| *n > 0)).then_some(stat)
    });
    let last = keyed(&dir, "cpu.stat");
    stop(&c);
    assert_eq!(cpu_max, "20000 100000", "cpu.max");
    assert_eq!(
        weight,
        (1 + ((1024 - 2) * 9999) / 262_142).to_string(),
        "cpu.weight"
    );
    let stat = throttled.unwrap_or_else(|| {
        panic!("a busy guest under a 20% quota was never throttled: cpu.stat {last:?}")
    });
    assert!(
        stat.get("throttled_usec").is_some_and(|t| *t > 0),
        "cpu.stat counts throttled periods but no throttled time: {stat:?}"
    );
    assert!(
        stat.get("usage_usec").is_some_and(|u| *u > 0),
        "cpu.stat shows no CPU use by the busy guest: {stat:?}"
    );
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn pids_max_from_the_spec_and_in_the_metrics() {
    // ctr has no flag for a pids limit: the container gets a whole spec (`ctr run --config`),
    // with the module in a host directory as its root.
    let k = v2_kiln();
    let c = k.container("v2-pids");
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::copy(k.wasm("sleep"), root.path().join("sleep.wasm")).expect("copy sleep.wasm");
    let template = k.ctr(&["oci", "spec"]);
    assert!(template.success(), "ctr oci spec:\n{template}");
    let mut spec: serde_json::Value =
        serde_json::from_str(&template.stdout).expect("ctr oci spec prints JSON");
    spec["process"]["args"] = serde_json::json!(["/sleep.wasm"]);
    spec["root"] = serde_json::json!({"path": root.path(), "readonly": false});
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/default/{}", c.id));
    spec["linux"]["resources"]["pids"] = serde_json::json!({"limit": 7});
    let spec_file = root.path().join("config.json");
    std::fs::write(&spec_file, spec.to_string()).expect("write the spec");
    let log = format!("file://{}", k.container_log(&c.id).display());
    let out = k.ctr_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--log-uri",
            &log,
            "--config",
            &spec_file.to_string_lossy(),
            &c.id,
        ],
        SLOW,
    );
    start(&c, out);
    let dir = cgroup_of(&c);
    let pids_max = read(&dir, "pids.max");
    let current: u64 = read(&dir, "pids.current").parse().expect("pids.current");
    let (metrics, rows) = c.metrics();
    stop(&c);
    assert_eq!(pids_max, "7", "pids.max");
    assert!(current >= 1, "pids.current is {current} for a running task");
    let limit = rows
        .iter()
        .find(|(k, _)| k == "pids.limit")
        .map(|(_, v)| v.as_str());
    assert_eq!(limit, Some("7"), "pids.limit in the metrics:\n{metrics}");
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn task_metrics_are_v2_metrics_with_usage_and_limit() {
    let k = v2_kiln();
    let limit: u64 = 64 << 20;
    let c = k.container("v2-metrics");
    start(
        &c,
        c.run(&image("sleep"))
            .memory_limit(limit)
            .timeout(SLOW)
            .detach(),
    );
    let (out, rows) = c.metrics();
    stop(&c);
    assert!(out.success(), "ctr task metrics failed:\n{out}");
    let get = |key: &str| {
        rows.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    // ctr prints the v1 names (memory.usage_in_bytes, ...) for v1 metrics and these for v2.
    for v1 in [
        "memory.usage_in_bytes",
        "memory.limit_in_bytes",
        "cpuacct.usage",
    ] {
        assert!(get(v1).is_none(), "a v1 metric {v1} on a v2 node:\n{out}");
    }
    assert!(
        get("memory.usage").is_some_and(|u| u > 0),
        "no non-zero memory.usage:\n{out}"
    );
    assert_eq!(
        get("memory.usage_limit"),
        Some(limit),
        "memory.usage_limit is not the container's limit:\n{out}"
    );
    assert!(
        get("pids.current").is_some_and(|p| p >= 1),
        "no pids.current >= 1:\n{out}"
    );
    assert!(
        get("cpu.usage_usec").is_some_and(|u| u > 0),
        "no cpu.usage_usec: a worker that loaded and started a module has used CPU:\n{out}"
    );
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn the_worker_is_cloned_into_its_cgroup() {
    let k = v2_kiln();
    let c = k.container("v2-clone3");
    let pid = start(&c, c.run(&image("sleep")).timeout(SLOW).detach());
    let dir = cgroup_of(&c);
    let procs = read(&dir, "cgroup.procs");
    let worker_cgroup = unified_cgroup_of(pid);
    let zygote = pid_parent(pid).expect("the worker's parent");
    let zygote_cgroup = unified_cgroup_of(zygote);
    stop(&c);

    let want = format!("/default/{}", c.id);
    assert_eq!(worker_cgroup, want, "the worker {pid}'s cgroup");
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "{}/cgroup.procs does not list the worker {pid}: {procs:?}",
        dir.display()
    );
    assert_ne!(
        zygote_cgroup, want,
        "the zygote {zygote} is in the container's cgroup: only the worker belongs there"
    );

    // The zygote says at debug level when it could not clone into the cgroup and the worker
    // joined it by a cgroup.procs write instead. The worker's own debug lines prove that the
    // debug lines of the zygote's processes reach the log at all.
    let log = std::fs::read_to_string(k.log_path()).expect("read the containerd log");
    let joined = format!("worker {}: joined cgroup in", c.id);
    assert!(
        log.contains(&joined),
        "no `{joined}` debug line: containerd is not logging Kiln's debug lines, so the \
         absence of a fallback below would prove nothing"
    );
    let fallbacks: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("clone3 into a cgroup failed")
                || l.contains("cannot open the worker's cgroup")
        })
        .collect();
    assert!(
        fallbacks.is_empty(),
        "the zygote fell back to moving workers with a cgroup.procs write:\n{}",
        fallbacks.join("\n")
    );
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn run_rm_leaves_no_cgroup_behind() {
    let k = v2_kiln();

    // One that runs to completion.
    let c = k.container("v2-rm-hello");
    let out = c.run(&image("hello")).timeout(SLOW).output();
    assert!(out.success(), "{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(10));
    assert!(
        !cgroup_of(&c).exists(),
        "{} remains",
        cgroup_of(&c).display()
    );

    // One with limits in every controller Kiln writes, killed while it runs.
    let c = k.container("v2-rm-killed");
    let run = c
        .run(&image("sleep"))
        .memory_limit(64 << 20)
        .opt("--cpu-quota")
        .opt("50000")
        .opt("--cpu-period")
        .opt("100000")
        .spawn();
    let t = c
        .wait_status("RUNNING", SLOW)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()));
    let dir = cgroup_of(&c);
    assert!(
        dir.is_dir(),
        "no cgroup {} for a running container",
        dir.display()
    );
    assert!(
        processes_of(&c.id).iter().any(|(p, _)| *p == t.pid),
        "the worker {} is not found by the process probe",
        t.pid
    );
    let out = c.kill(Some("SIGKILL"));
    assert!(out.success(), "{out}");
    let out = run.wait(SLOW);
    assert_eq!(out.code(), 137, "{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(10));
    assert!(!dir.exists(), "{} remains", dir.display());
}

/// Whether a process placed in `cgroup` (a directory) can open `dev` for reading: the v2
/// device program applies to every process of the cgroup, so a probe that joins it sees what
/// the guest's worker sees, without the rootfs's `nodev` mounts in the way.
fn opens_in(cgroup: &Path, dev: &str) -> bool {
    let procs = cgroup.join("cgroup.procs");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" && exec 3< "$2""#)
        .args(["sh", &procs.to_string_lossy(), dev])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the probe");
    status.success()
}

#[test]
#[ignore = "needs a cgroup v2 node; scripts/vm-v2.sh runs it"]
fn the_device_program_allows_only_the_specs_devices() {
    let k = v2_kiln();
    let c = k.container("v2-devices");
    let out = c.run(&image("sleep")).detach();
    start(&c, out);
    let dir = cgroup_of(&c);
    // ctr's spec allows runc's defaults (null, zero, full, random, urandom, tty, ptmx); the
    // kernel log is not among them. Outside the cgroup this process opens both.
    let outside = [
        opens_in(Path::new(ROOT), "/dev/null"),
        opens_in(Path::new(ROOT), "/dev/kmsg"),
    ];
    let inside = [opens_in(&dir, "/dev/null"), opens_in(&dir, "/dev/kmsg")];
    stop(&c);
    assert_eq!(
        outside,
        [true, true],
        "the probe itself cannot open the devices"
    );
    assert_eq!(
        inside,
        [true, false],
        "/dev/null allowed, /dev/kmsg denied in the container's cgroup"
    );
}
