//! Tests against fake cgroupfs trees in a temporary directory (plain files
//! stand in for control files; files a call writes must exist first, as on
//! cgroupfs), plus one test on the real machine when running as root.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use tempfile::TempDir;

use super::*;

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

fn touch(dir: &Path, files: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    for f in files {
        fs::write(dir.join(f), "").unwrap();
    }
}

/// A fake hybrid v1 machine: `cpu` and `cpuacct` co-mounted or separate,
/// plus cpuset, memory, pids, name=systemd and an empty cgroup2.
fn v1(comount: bool) -> (TempDir, Layout) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().display().to_string();
    let mut mounts: Vec<(&str, &str)> = if comount {
        vec![("cpu,cpuacct", "cpu,cpuacct")]
    } else {
        vec![("cpu", "cpu"), ("cpuacct", "cpuacct")]
    };
    mounts.extend([
        ("cpuset", "cpuset"),
        ("memory", "memory"),
        ("pids", "pids"),
        ("systemd", "xattr,name=systemd"),
    ]);
    let mut text = format!("31 23 0:28 / {root} rw - tmpfs tmpfs rw\n");
    for (i, (dir, opts)) in mounts.iter().enumerate() {
        fs::create_dir(tmp.path().join(dir)).unwrap();
        text += &format!(
            "{} 31 0:{} / {root}/{dir} rw - cgroup cgroup rw,{opts}\n",
            40 + i,
            40 + i
        );
    }
    fs::create_dir(tmp.path().join("unified")).unwrap();
    text += &format!("60 31 0:60 / {root}/unified rw - cgroup2 cgroup2 rw\n");
    let layout = Layout::from_mountinfo(&text).unwrap();
    assert_eq!(layout.version(), 1);
    (tmp, layout)
}

/// A fake v2 machine whose root offers `controllers`.
fn v2(controllers: &str) -> (TempDir, Layout) {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("cgroup.controllers"), controllers).unwrap();
    fs::write(tmp.path().join("cgroup.subtree_control"), "").unwrap();
    let text = format!(
        "31 23 0:27 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        tmp.path().display()
    );
    let layout = Layout::from_mountinfo(&text).unwrap();
    assert_eq!(layout.version(), 2);
    (tmp, layout)
}

const V1_MEMORY: &[&str] = &[
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "cgroup.procs",
];
const V1_CPU: &[&str] = &[
    "cpu.shares",
    "cpu.cfs_period_us",
    "cpu.cfs_quota_us",
    "cgroup.procs",
];
const V1_PIDS: &[&str] = &["pids.max", "cgroup.procs"];
const V2_FILES: &[&str] = &[
    "memory.max",
    "memory.swap.max",
    "cpu.weight",
    "cpu.max",
    "pids.max",
    "cgroup.procs",
];

fn all_limits() -> Resources {
    Resources {
        memory_limit: Some(64 << 20),
        memory_swap: Some(96 << 20),
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        pids_limit: Some(32),
        ..Resources::default()
    }
}

fn sleeper() -> Child {
    Command::new("sleep").arg("30").spawn().unwrap()
}

#[test]
fn shares_to_weight_matches_runc() {
    assert_eq!(shares_to_weight(2), 1);
    assert_eq!(shares_to_weight(262_144), 10_000);
    assert_eq!(shares_to_weight(1024), 39);
    assert_eq!(shares_to_weight(512), 20);
    assert_eq!(shares_to_weight(100), 4);
    // Clamped like the v1 kernel does, instead of underflowing.
    assert_eq!(shares_to_weight(0), 1);
    assert_eq!(shares_to_weight(1), 1);
    assert_eq!(shares_to_weight(1 << 40), 10_000);
}

#[test]
fn v1_creates_only_managed_hierarchies() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "/default/abc", "", &Resources::default()).unwrap();
    assert_eq!(cg.version(), 1);
    let r = tmp.path();
    let expected: Vec<PathBuf> = ["memory", "cpu", "cpuacct", "pids"]
        .iter()
        .map(|h| r.join(h).join("default/abc"))
        .collect();
    assert_eq!(cg.dirs(), expected);
    for d in &expected {
        assert!(d.is_dir(), "{} missing", d.display());
    }
    for untouched in ["cpuset", "systemd", "unified"] {
        assert!(
            !r.join(untouched).join("default").exists(),
            "{untouched} touched"
        );
    }
}

#[test]
fn v1_comounted_cpu_cpuacct_created_once() {
    let (tmp, layout) = v1(true);
    let cg = Cgroup::create(&layout, "/k/x", "", &Resources::default()).unwrap();
    let r = tmp.path();
    assert_eq!(
        cg.dirs(),
        [
            r.join("memory/k/x"),
            r.join("cpu,cpuacct/k/x"),
            r.join("pids/k/x")
        ]
    );
    // Stats find cpuacct in the co-mounted directory.
    fs::write(r.join("cpu,cpuacct/k/x/cpuacct.usage"), "42\n").unwrap();
    fs::write(r.join("cpu,cpuacct/k/x/cpu.stat"), "nr_periods 3\n").unwrap();
    let stats = cg.stats().unwrap();
    assert_eq!((stats.cpu_usage_total_ns, stats.cpu_nr_periods), (42, 3));
}

#[test]
fn v1_missing_controller_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let mem = tmp.path().join("memory");
    touch(&mem.join("c"), V1_MEMORY);
    let text = format!(
        "35 31 0:32 / {} rw - cgroup cgroup rw,memory\n",
        mem.display()
    );
    let layout = Layout::from_mountinfo(&text).unwrap();
    let resources = Resources {
        memory_limit: Some(1 << 20),
        pids_limit: Some(5),
        cpu_shares: Some(100),
        ..Resources::default()
    };
    let cg = Cgroup::create(&layout, "/c", "", &resources).unwrap();
    assert_eq!(cg.dirs(), [mem.join("c")]);
    assert_eq!(read(mem.join("c/memory.limit_in_bytes")), "1048576");
}

#[test]
fn v1_limits() {
    let (tmp, layout) = v1(false);
    let r = tmp.path();
    touch(&r.join("memory/c1"), V1_MEMORY);
    touch(&r.join("cpu/c1"), V1_CPU);
    touch(&r.join("cpuacct/c1"), &["cgroup.procs"]);
    touch(&r.join("pids/c1"), V1_PIDS);
    fs::write(
        r.join("memory/c1/memory.limit_in_bytes"),
        "9223372036854771712",
    )
    .unwrap();
    Cgroup::create(&layout, "/c1", "", &all_limits()).unwrap();
    assert_eq!(read(r.join("memory/c1/memory.limit_in_bytes")), "67108864");
    assert_eq!(
        read(r.join("memory/c1/memory.memsw.limit_in_bytes")),
        "100663296"
    );
    assert_eq!(read(r.join("cpu/c1/cpu.shares")), "512");
    assert_eq!(read(r.join("cpu/c1/cpu.cfs_period_us")), "100000");
    assert_eq!(read(r.join("cpu/c1/cpu.cfs_quota_us")), "50000");
    assert_eq!(read(r.join("pids/c1/pids.max")), "32");
}

#[test]
fn v1_unlimited_values() {
    let (tmp, layout) = v1(false);
    let r = tmp.path();
    touch(&r.join("memory/c"), V1_MEMORY);
    touch(&r.join("cpu/c"), V1_CPU);
    touch(&r.join("pids/c"), V1_PIDS);
    let resources = Resources {
        memory_limit: Some(-5),
        memory_swap: Some(-1),
        cpu_quota: Some(-1),
        pids_limit: Some(-1),
        ..Resources::default()
    };
    Cgroup::create(&layout, "/c", "", &resources).unwrap();
    assert_eq!(read(r.join("memory/c/memory.limit_in_bytes")), "-1");
    assert_eq!(read(r.join("memory/c/memory.memsw.limit_in_bytes")), "-1");
    assert_eq!(read(r.join("cpu/c/cpu.cfs_quota_us")), "-1");
    assert_eq!(read(r.join("pids/c/pids.max")), "max");
    // Untouched: not asked for.
    assert_eq!(read(r.join("cpu/c/cpu.shares")), "");
    assert_eq!(read(r.join("cpu/c/cpu.cfs_period_us")), "");

    let zero = Resources {
        pids_limit: Some(0),
        ..Resources::default()
    };
    Cgroup::create(&layout, "/c", "", &zero).unwrap();
    assert_eq!(read(r.join("pids/c/pids.max")), "max");
}

#[test]
fn v1_swap_skipped_without_memsw_file() {
    let (tmp, layout) = v1(false);
    let r = tmp.path();
    touch(&r.join("memory/c"), &["memory.limit_in_bytes"]);
    Cgroup::create(&layout, "/c", "", &all_limits().clone_with_cpu_pids_off()).unwrap();
    assert_eq!(read(r.join("memory/c/memory.limit_in_bytes")), "67108864");
    assert!(!r.join("memory/c/memory.memsw.limit_in_bytes").exists());
}

impl Resources {
    fn clone_with_cpu_pids_off(&self) -> Resources {
        Resources {
            cpu_shares: None,
            cpu_quota: None,
            cpu_period: None,
            pids_limit: None,
            ..self.clone()
        }
    }
}

#[test]
fn v1_period_is_written_before_quota_and_errors_name_the_file() {
    let (tmp, layout) = v1(false);
    let r = tmp.path();
    // No cpu.cfs_quota_us: the quota write fails, after the period one.
    touch(&r.join("cpu/c"), &["cpu.cfs_period_us"]);
    let resources = Resources {
        cpu_quota: Some(20_000),
        cpu_period: Some(50_000),
        ..Resources::default()
    };
    let err = Cgroup::create(&layout, "/c", "", &resources).unwrap_err();
    assert!(matches!(err, Error::Write { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("cpu/c/cpu.cfs_quota_us") && msg.contains("20000"),
        "{msg}"
    );
    assert_eq!(read(r.join("cpu/c/cpu.cfs_period_us")), "50000");
}

#[test]
fn relative_path_is_below_own_cgroup() {
    let (tmp, layout) = v1(false);
    let layout = layout
        .with_own_cgroups("4:memory:/process_api/p1\n1:cpu:/\n2:cpuacct:/\n8:pids:/sys\n0::/\n")
        .unwrap();
    let cg = Cgroup::create(&layout, "foo/bar", "", &Resources::default()).unwrap();
    let r = tmp.path();
    assert_eq!(
        cg.dirs(),
        [
            r.join("memory/process_api/p1/foo/bar"),
            r.join("cpu/foo/bar"),
            r.join("cpuacct/foo/bar"),
            r.join("pids/sys/foo/bar"),
        ]
    );
    assert!(r.join("memory/process_api/p1/foo/bar").is_dir());
}

#[test]
fn systemd_path() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(
        &layout,
        "kubepods-besteffort-pod12.slice:cri-containerd:abc",
        "",
        &Resources::default(),
    )
    .unwrap();
    let d = tmp.path().join(
        "memory/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope",
    );
    assert_eq!(cg.dirs()[0], d);
    assert!(d.is_dir());
}

#[test]
fn dotdot_rejected_before_touching_anything() {
    let (tmp, layout) = v1(false);
    let err = Cgroup::create(&layout, "/default/../../etc", "", &Resources::default()).unwrap_err();
    assert!(err.to_string().contains("/default/../../etc"), "{err}");
    assert!(
        fs::read_dir(tmp.path().join("memory"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(Cgroup::open(&layout, "x/../y", "").is_err());
}

#[test]
fn default_path_when_empty() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "", "/kiln/abc", &Resources::default()).unwrap();
    assert_eq!(cg.dirs()[0], tmp.path().join("memory/kiln/abc"));
}

#[test]
fn v2_enables_controllers_and_writes_limits() {
    let (tmp, layout) = v2("cpuset cpu io memory hugetlb pids rdma misc\n");
    let r = tmp.path();
    // An existing intermediate cgroup offering only cpu and memory, with
    // cpu already enabled.
    fs::create_dir(r.join("kubepods")).unwrap();
    fs::write(r.join("kubepods/cgroup.controllers"), "cpu memory\n").unwrap();
    fs::write(r.join("kubepods/cgroup.subtree_control"), "cpu\n").unwrap();
    touch(&r.join("kubepods/c"), V2_FILES);

    let cg = Cgroup::create(&layout, "/kubepods/c", "", &all_limits()).unwrap();
    assert_eq!(cg.version(), 2);
    assert_eq!(cg.dirs(), [r.join("kubepods/c")]);
    assert_eq!(read(r.join("cgroup.subtree_control")), "+cpu +memory +pids");
    assert_eq!(read(r.join("kubepods/cgroup.subtree_control")), "+memory");
    let c = r.join("kubepods/c");
    assert_eq!(read(c.join("memory.max")), "67108864");
    assert_eq!(read(c.join("memory.swap.max")), "33554432");
    assert_eq!(read(c.join("cpu.weight")), "20");
    assert_eq!(read(c.join("cpu.max")), "50000 100000");
    assert_eq!(read(c.join("pids.max")), "32");
}

#[test]
fn v2_already_enabled_is_not_rewritten() {
    let (tmp, layout) = v2("cpu memory pids\n");
    let r = tmp.path();
    fs::write(r.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    Cgroup::create(&layout, "/a/b/c", "", &Resources::default()).unwrap();
    assert!(r.join("a/b/c").is_dir());
    // Unchanged: a write would have replaced it with "+...".
    assert_eq!(read(r.join("cgroup.subtree_control")), "cpu memory pids\n");
}

#[test]
fn v2_unlimited_and_partial_cpu_max() {
    let (tmp, layout) = v2("cpu memory pids");
    let c = tmp.path().join("c");
    touch(&c, V2_FILES);
    let resources = Resources {
        memory_limit: Some(-1),
        memory_swap: Some(-1),
        cpu_quota: Some(-1),
        cpu_period: Some(100_000),
        pids_limit: Some(0),
        ..Resources::default()
    };
    Cgroup::create(&layout, "/c", "", &resources).unwrap();
    assert_eq!(read(c.join("memory.max")), "max");
    assert_eq!(read(c.join("memory.swap.max")), "max");
    assert_eq!(read(c.join("cpu.max")), "max 100000");
    assert_eq!(read(c.join("pids.max")), "max");
    assert_eq!(read(c.join("cpu.weight")), "");

    let quota_only = Resources {
        cpu_quota: Some(25_000),
        ..Resources::default()
    };
    Cgroup::create(&layout, "/c", "", &quota_only).unwrap();
    assert_eq!(read(c.join("cpu.max")), "25000");
}

#[test]
fn v2_swap_needs_memory() {
    let (tmp, layout) = v2("cpu memory pids");
    for (memory, swap) in [(None, 100), (Some(-1), 100), (Some(200), 100)] {
        let resources = Resources {
            memory_limit: memory,
            memory_swap: Some(swap),
            ..Resources::default()
        };
        let err = Cgroup::create(&layout, "/c", "", &resources).unwrap_err();
        assert!(matches!(err, Error::InvalidResources(_)), "{err}");
    }
    assert!(!tmp.path().join("c").exists());
}

#[test]
fn v2_swap_skipped_without_file() {
    let (tmp, layout) = v2("cpu memory pids");
    let c = tmp.path().join("c");
    touch(&c, &["memory.max"]);
    let resources = Resources {
        memory_limit: Some(100),
        memory_swap: Some(300),
        ..Resources::default()
    };
    Cgroup::create(&layout, "/c", "", &resources).unwrap();
    assert_eq!(read(c.join("memory.max")), "100");
    assert!(!c.join("memory.swap.max").exists());
}

#[test]
fn v2_relative_and_systemd() {
    let (tmp, layout) = v2("cpu memory pids");
    let layout = layout
        .with_own_cgroups("0::/system.slice/kiln.service\n")
        .unwrap();
    let cg = Cgroup::create(&layout, "w/1", "", &Resources::default()).unwrap();
    assert_eq!(
        cg.dirs(),
        [tmp.path().join("system.slice/kiln.service/w/1")]
    );
    let cg = Cgroup::create(&layout, ":kiln:abc", "", &Resources::default()).unwrap();
    assert_eq!(cg.dirs(), [tmp.path().join("system.slice/kiln-abc.scope")]);
}

#[test]
fn add_pid_and_pids() {
    let (tmp, layout) = v1(false);
    let r = tmp.path();
    for h in ["memory", "cpu", "cpuacct", "pids"] {
        touch(&r.join(h).join("c"), &["cgroup.procs"]);
    }
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    cg.add_pid(4321).unwrap();
    for h in ["memory", "cpu", "cpuacct", "pids"] {
        assert_eq!(read(r.join(h).join("c/cgroup.procs")), "4321");
    }
    assert!(matches!(cg.add_pid(0), Err(Error::InvalidPid(0))));
    assert!(matches!(cg.add_pid(-1), Err(Error::InvalidPid(-1))));

    fs::write(r.join("memory/c/cgroup.procs"), "7\n4321\n").unwrap();
    fs::write(r.join("pids/c/cgroup.procs"), "9\n").unwrap();
    assert_eq!(cg.pids().unwrap(), [7, 9, 4321]);

    fs::write(r.join("pids/c/cgroup.procs"), "nine\n").unwrap();
    let err = cg.pids().unwrap_err();
    assert!(err.to_string().contains("pids/c/cgroup.procs"), "{err}");
}

#[test]
fn add_pid_error_names_file() {
    let (_tmp, layout) = v2("cpu memory pids");
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    let err = cg.add_pid(55).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("c/cgroup.procs") && msg.contains("55"),
        "{msg}"
    );
}

#[test]
fn open_existing_and_missing() {
    let (_tmp, layout) = v2("cpu memory pids");
    assert!(matches!(
        Cgroup::open(&layout, "/gone", ""),
        Err(Error::NotFound { .. })
    ));
    let created = Cgroup::create(&layout, "/here", "", &Resources::default()).unwrap();
    assert_eq!(Cgroup::open(&layout, "/here", "").unwrap(), created);

    let (_tmp, layout) = v1(true);
    let created = Cgroup::create(&layout, "/here", "", &Resources::default()).unwrap();
    assert_eq!(Cgroup::open(&layout, "/here", "").unwrap(), created);
}

#[test]
fn remove_and_missing_is_fine() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "/default/abc", "", &Resources::default()).unwrap();
    cg.remove().unwrap();
    for d in cg.dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Only the leaf: the shared parent stays.
    assert!(tmp.path().join("memory/default").is_dir());
    cg.remove().unwrap();
    assert!(matches!(cg.stats(), Err(Error::NotFound { .. })));
    assert!(matches!(cg.pids(), Err(Error::NotFound { .. })));
    cg.kill_all().unwrap();
}

#[test]
fn remove_failure_names_dir_and_tries_all() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    // A regular file makes rmdir fail with ENOTEMPTY on a normal fs.
    fs::write(tmp.path().join("cpu/c/junk"), "").unwrap();
    let err = cg.remove().unwrap_err();
    assert!(err.to_string().contains("cpu/c"), "{err}");
    assert!(!tmp.path().join("memory/c").exists());
    assert!(!tmp.path().join("pids/c").exists());
}

#[test]
fn kill_and_remove_waits_for_the_processes_to_go() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "/slow", "", &Resources::default()).unwrap();
    let mut child = sleeper();
    let procs = tmp.path().join("memory/slow/cgroup.procs");
    fs::write(&procs, format!("{}\n", child.id())).unwrap();
    // The (fake) kernel lists the process for a while after it was killed, and the directory
    // cannot be removed until it is gone: removing at once would fail.
    let kernel = {
        let dir = tmp.path().join("memory/slow");
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            fs::remove_file(dir.join("cgroup.procs")).unwrap();
        })
    };
    cg.kill_and_remove(std::time::Duration::from_secs(5))
        .unwrap();
    kernel.join().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    for d in cg.dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // A cgroup that is gone already is fine.
    cg.kill_and_remove(std::time::Duration::from_secs(1))
        .unwrap();
}

#[test]
fn kill_all_signals_listed_pids() {
    let (tmp, layout) = v1(false);
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    let mut a = sleeper();
    let mut b = sleeper();
    fs::write(
        tmp.path().join("memory/c/cgroup.procs"),
        format!("{}\n", a.id()),
    )
    .unwrap();
    fs::write(
        tmp.path().join("pids/c/cgroup.procs"),
        format!("{}\n", b.id()),
    )
    .unwrap();
    cg.kill_all().unwrap();
    assert_eq!(a.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(b.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn kill_all_v2_uses_cgroup_kill() {
    let (tmp, layout) = v2("cpu memory pids");
    let c = tmp.path().join("c");
    touch(&c, &["cgroup.kill", "cgroup.procs"]);
    let mut child = sleeper();
    fs::write(c.join("cgroup.procs"), child.id().to_string()).unwrap();
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    cg.kill_all().unwrap();
    assert_eq!(read(c.join("cgroup.kill")), "1");
    // The (fake) kernel did not kill it; kill_all did not signal either.
    assert_eq!(child.try_wait().unwrap(), None);
    child.kill().unwrap();
    child.wait().unwrap();

    // Without cgroup.kill, the pids are signalled.
    fs::remove_file(c.join("cgroup.kill")).unwrap();
    let mut child = sleeper();
    fs::write(c.join("cgroup.procs"), child.id().to_string()).unwrap();
    cg.kill_all().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn stats_through_cgroup_v2() {
    let (tmp, layout) = v2("cpu memory pids");
    let cg = Cgroup::create(&layout, "/c", "", &Resources::default()).unwrap();
    fs::write(tmp.path().join("c/memory.current"), "123\n").unwrap();
    fs::write(tmp.path().join("c/pids.max"), "max\n").unwrap();
    let stats = cg.stats().unwrap();
    assert_eq!(stats.memory_usage, 123);
    assert_eq!(stats.pids_limit, 0);
}

/// Removes the cgroup (after killing what is in it) even when an assertion
/// fails.
struct Cleanup(Option<Cgroup>, Option<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.1 {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cg) = &self.0 {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
    }
}

#[test]
fn real_machine_round_trip() {
    assert_root("real_machine_round_trip");
    let layout = Layout::detect().expect("this machine's cgroup layout");
    let name = {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        std::process::id().hash(&mut h);
        std::time::SystemTime::now().hash(&mut h);
        format!("/kiln-test-{:016x}", h.finish())
    };
    let resources = Resources {
        memory_limit: Some(64 << 20),
        pids_limit: Some(64),
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        ..Resources::default()
    };
    let cg = Cgroup::create(&layout, &name, "", &resources)
        .unwrap_or_else(|e| panic!("create {name} in {layout:?}: {e}"));
    let mut guard = Cleanup(Some(cg.clone()), None);
    eprintln!(
        "real_machine_round_trip: cgroup v{} at {:?}",
        cg.version(),
        cg.dirs()
    );
    assert_eq!(cg.version(), layout.version());
    for d in cg.dirs() {
        assert!(d.is_dir(), "{} not created", d.display());
    }

    let child = Command::new("sleep").arg("5").spawn().unwrap();
    let pid = child.id() as i32;
    guard.1 = Some(child);
    cg.add_pid(pid).unwrap();
    assert!(cg.pids().unwrap().contains(&pid));

    let stats = cg.stats().unwrap();
    assert_eq!(stats.memory_limit, 64 << 20);
    assert_eq!(stats.pids_limit, 64);
    assert!(stats.pids_current >= 1, "{stats:?}");

    cg.kill_all().unwrap();
    let status = guard.1.take().unwrap().wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));

    cg.remove().unwrap();
    for d in cg.dirs() {
        assert!(!d.exists(), "{} still exists", d.display());
    }
    guard.0 = None;
    assert!(matches!(
        Cgroup::open(&layout, &name, ""),
        Err(Error::NotFound { .. })
    ));
}

/// The v2 code path against the real kernel: on a hybrid host through the
/// controller-less `unified` mount (no limits possible there), on a pure v2
/// host through `/sys/fs/cgroup`. Exercises mkdir, `cgroup.procs`,
/// `cgroup.kill` and rmdir.
#[test]
fn real_unified_hierarchy_round_trip() {
    assert_root("real_unified_hierarchy_round_trip");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .expect("a cgroup2 mount (hybrid hosts have one at /sys/fs/cgroup/unified)");
    let layout = Layout::from_mountinfo(line).unwrap();
    let name = format!("/kiln-test-v2-{}", std::process::id());
    let cg = Cgroup::create(&layout, &name, "", &Resources::default())
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    let mut guard = Cleanup(Some(cg.clone()), None);
    let child = sleeper();
    let pid = child.id() as i32;
    guard.1 = Some(child);
    cg.add_pid(pid).unwrap();
    assert_eq!(cg.pids().unwrap(), [pid]);
    cg.stats().unwrap();
    cg.kill_all().unwrap();
    let status = guard.1.take().unwrap().wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    cg.remove().unwrap();
    assert!(!cg.dirs()[0].exists());
    guard.0 = None;
}

/// The rules containerd's default spec gives (a few of them): /dev/null and /dev/urandom.
fn default_device_rules() -> Vec<crate::DeviceRule> {
    use crate::{DeviceKind, DeviceRule};
    vec![
        DeviceRule::deny_all(),
        DeviceRule::allow(DeviceKind::Char, 1, 3, "rwm"),
        DeviceRule::allow(DeviceKind::Char, 1, 9, "rwm"),
    ]
}

/// Forks a child that joins `cg` and opens each of `paths` read-write; returns for each
/// whether the open succeeded. The child only makes async-signal-safe calls, so this is sound
/// in the multi-threaded test harness.
fn opens_in(cg: &Cgroup, paths: &[&str]) -> Vec<bool> {
    use std::ffi::CString;
    let procs: Vec<CString> = cg
        .dirs()
        .iter()
        .map(|d| {
            CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap()
        })
        .collect();
    let paths: Vec<CString> = paths.iter().map(|p| CString::new(*p).unwrap()).collect();
    // SAFETY: see above; the child never returns.
    match unsafe { libc::fork() } {
        0 => unsafe {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(100);
                }
                libc::close(fd);
            }
            let mut bits = 0;
            for (i, p) in paths.iter().enumerate() {
                let fd = libc::open(p.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK);
                if fd >= 0 {
                    bits |= 1 << i;
                    libc::close(fd);
                }
            }
            libc::_exit(bits)
        },
        -1 => panic!("fork: {}", io::Error::last_os_error()),
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(libc::WIFEXITED(status), "child status {status}");
            let bits = libc::WEXITSTATUS(status);
            assert_ne!(bits, 100, "the child could not join {:?}", cg.dirs());
            (0..paths.len()).map(|i| bits & (1 << i) != 0).collect()
        }
    }
}

fn assert_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{test} needs root (the suite runs as root: it creates cgroups)"
    );
}

/// On this machine's real cgroups (v1 devices controller on a hybrid host, or v2): a process
/// in the container's cgroup opens /dev/null but not /dev/kmsg, which the rules do not allow.
#[test]
fn real_device_rules_deny_what_they_do_not_allow() {
    assert_root("real_device_rules_deny_what_they_do_not_allow");
    let layout = Layout::detect().unwrap();
    let name = format!("/kiln-test-devices-{}", std::process::id());
    let resources = Resources {
        devices: Some(default_device_rules()),
        ..Resources::default()
    };
    let cg = Cgroup::create(&layout, &name, "", &resources).unwrap();
    let guard = Cleanup(Some(cg.clone()), None);
    let opened = opens_in(&cg, &["/dev/null", "/dev/kmsg"]);
    drop(guard);
    assert_eq!(opened, [true, false], "/dev/null allowed, /dev/kmsg denied");
}

/// The v2 device program through the real kernel: on a hybrid host through the controller-less
/// `unified` mount (device programs need no controller), on a v2 host through /sys/fs/cgroup.
#[test]
fn real_v2_device_program_denies_what_it_does_not_allow() {
    assert_root("real_v2_device_program_denies_what_it_does_not_allow");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .expect("a cgroup2 mount (hybrid hosts have one at /sys/fs/cgroup/unified)");
    let layout = Layout::from_mountinfo(line).unwrap();
    let name = format!("/kiln-test-devprog-{}", std::process::id());
    let resources = Resources {
        devices: Some(default_device_rules()),
        ..Resources::default()
    };
    let cg = Cgroup::create(&layout, &name, "", &resources).unwrap();
    let guard = Cleanup(Some(cg.clone()), None);
    let opened = opens_in(
        &cg,
        &["/dev/null", "/dev/urandom", "/dev/kmsg", "/dev/full"],
    );
    drop(guard);
    assert_eq!(opened, [true, true, false, false]);
}

/// The OOM notification through the real kernel: a child in a cgroup with a 16 MiB limit
/// touches 64 MiB and is OOM-killed; the notification says so.
#[test]
fn real_oom_kill_is_notified() {
    assert_root("real_oom_kill_is_notified");
    let layout = Layout::detect().unwrap();
    if layout.version() == 2
        && !fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .unwrap_or_default()
            .contains("memory")
    {
        panic!("a v2 node without the memory controller cannot enforce memory limits");
    }
    let name = format!("/kiln-test-oom-{}", std::process::id());
    let resources = Resources {
        memory_limit: Some(16 << 20),
        memory_swap: Some(16 << 20),
        ..Resources::default()
    };
    let cg = Cgroup::create(&layout, &name, "", &resources).unwrap();
    let guard = Cleanup(Some(cg.clone()), None);
    let mut events = cg.oom_events().unwrap();
    assert_eq!(events.take().unwrap(), 0, "no OOM yet");
    let procs: Vec<std::ffi::CString> = cg
        .dirs()
        .iter()
        .map(|d| {
            std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .unwrap()
        })
        .collect();
    // SAFETY: the child only joins the cgroup and touches anonymous memory (mmap, no malloc).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            let len = 64 << 20;
            let mem = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if mem != libc::MAP_FAILED {
                libc::memset(mem, 1, len);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&events.fd()),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one descriptor we hold.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    let kills = events.take().unwrap();
    drop(guard);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "the child was not OOM-killed: {status:#x}"
    );
    assert_eq!(ready, 1, "the notification did not become readable");
    assert!(kills >= 1, "no OOM kill counted");
}
