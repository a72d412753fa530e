//! The sandbox boundary, end to end: what a guest's worker can reach is what the same image
//! under runc could reach, or less. Devices (image nodes, bind-mounted nodes, the guest's
//! /dev, the cgroup's rules), capabilities, no_new_privs, seccomp, rlimits, namespaces, user
//! mappings, the unprivileged compiler, and where the working directory is.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use kiln_e2e::{Container, Kiln, image, kiln, proc_status};
use kiln_image::{Entry, Image, Layer};

const DEVICES: &str = "docker.io/kiln-test/devices:latest";
const DEVICES_AS_USER: &str = "docker.io/kiln-test/devices-as-user:latest";

/// The major and minor numbers of the block device holding `/`.
fn root_disk() -> (u32, u32) {
    let dev = std::fs::metadata("/").expect("stat /").dev();
    (libc::major(dev), libc::minor(dev))
}

/// The fileio workload with device nodes of several kinds beside it: the kernel log (char
/// 1:11), /dev/null's numbers (char 1:3, which the cgroup allows: only `nodev` stops it), and
/// the host's root disk (block). Imported once, as root and as uid 1000.
fn device_images(k: &'static Kiln) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let (major, minor) = root_disk();
        for (reference, user) in [(DEVICES, ""), (DEVICES_AS_USER, "1000:1000")] {
            let mut img = Image::single_file(
                reference,
                "/fileio.wasm",
                std::fs::read(k.wasm("fileio")).expect("fileio.wasm"),
            )
            .expect("image");
            if let Some(config) = img.exec_config_mut()
                && !user.is_empty()
            {
                config.user = Some(user.to_string());
            }
            let char_node = |path: &str, major, minor| Entry::CharDevice {
                path: path.to_string(),
                mode: 0o666,
                major,
                minor,
            };
            img.layers.push(
                Layer::tar(&[
                    char_node("/nodes/kmsg", 1, 11),
                    char_node("/nodes/null", 1, 3),
                    Entry::BlockDevice {
                        path: "/nodes/disk".to_string(),
                        mode: 0o666,
                        major,
                        minor,
                    },
                ])
                .expect("layer"),
            );
            let out = k.import_image(&img);
            assert!(out.success(), "import {reference}:\n{out}");
        }
    });
}

fn fileio(c: &Container, image: &str, args: &[&str], opts: &[&str]) -> kiln_e2e::Output {
    let mut run = c.run(image);
    for o in opts {
        run = run.opt(o);
    }
    run.args(std::iter::once("/fileio.wasm").chain(args.iter().copied()))
        .output()
}

#[track_caller]
fn assert_open_refused(out: &kiln_e2e::Output, path: &str) {
    assert_eq!(
        out.code(),
        1,
        "opening {path} must fail in the guest:\n{out}"
    );
    assert!(
        out.stderr.contains("open failed"),
        "the guest reports the failed open of {path}:\n{out}"
    );
}

#[test]
fn device_nodes_in_the_image_cannot_be_opened() {
    let k = kiln();
    device_images(k);
    for reference in [DEVICES, DEVICES_AS_USER] {
        for path in ["/nodes/kmsg", "/nodes/null", "/nodes/disk"] {
            for mode in ["r", "w"] {
                let c = k.container("img-node");
                let out = fileio(&c, reference, &["open", path, mode], &[]);
                assert_open_refused(&out, &format!("{path} ({mode}, {reference})"));
            }
        }
    }
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mknod in a temporary directory of the test's.
    let ret = unsafe { libc::mknod(c.as_ptr(), kind | 0o666, libc::makedev(major, minor)) };
    assert_eq!(
        ret,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

#[test]
fn device_nodes_in_a_bind_mount_cannot_be_opened() {
    let k = kiln();
    let dir = tempfile::tempdir().expect("tempdir");
    mknod(&dir.path().join("kmsg"), libc::S_IFCHR, 1, 11);
    mknod(&dir.path().join("null"), libc::S_IFCHR, 1, 3);
    let (major, minor) = root_disk();
    mknod(&dir.path().join("disk"), libc::S_IFBLK, major, minor);
    for name in ["kmsg", "null", "disk"] {
        let c = k.container("bind-node");
        let out = c
            .run(&image("fileio"))
            .bind(dir.path(), "/mnt", false)
            .args(["/fileio.wasm", "open", &format!("/mnt/{name}"), "w"])
            .output();
        assert_open_refused(&out, &format!("/mnt/{name}"));
    }
}

#[test]
fn the_guests_dev_holds_runcs_default_devices_and_the_specs() {
    let k = kiln();
    let c = k.container("dev-ls");
    let out = fileio(&c, &image("fileio"), &["ls", "/dev"], &[]);
    assert!(out.success(), "{out}");
    assert_eq!(
        out.stdout, "full\nnull\nrandom\ntty\nurandom\nzero\n",
        "{out}"
    );
    let c = k.container("dev-null");
    let out = fileio(&c, &image("fileio"), &["open", "/dev/null", "rw"], &[]);
    assert!(out.success(), "/dev/null must open:\n{out}");
    // A device the spec adds (`--device`) is there and opens (for writing: reading the kernel
    // log also needs CAP_SYSLOG, which the container does not have, as under runc).
    let c = k.container("dev-kmsg");
    let out = fileio(
        &c,
        &image("fileio"),
        &["open", "/dev/kmsg", "w"],
        &["--device", "/dev/kmsg"],
    );
    assert!(out.success(), "--device /dev/kmsg must open:\n{out}");
    // Without it, the kernel log is not there.
    let c = k.container("dev-no-kmsg");
    let out = fileio(&c, &image("fileio"), &["open", "/dev/kmsg", "w"], &[]);
    assert_open_refused(&out, "/dev/kmsg");
}

fn start(c: &Container, image: &str, opts: &[&str]) -> u32 {
    let mut run = c.run(image);
    for o in opts {
        run = run.opt(o);
    }
    let out = run.detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("RUNNING", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

fn stop(c: &Container) {
    let _ = c.kill(Some("SIGKILL"));
    let _ = c.wait_status("STOPPED", Duration::from_secs(5));
}

#[test]
fn the_cgroup_denies_every_device_but_the_specs() {
    let k = kiln();
    if kiln_e2e::cgroup_v2() {
        // The v2 device program is checked on the v2 node (tests/tests/cgroup_v2.rs,
        // the_device_program_allows_only_the_specs_devices).
        return;
    }
    let c = k.container("devices-list");
    let pid = start(&c, &image("sleep"), &[]);
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let path = text
        .lines()
        .find_map(|l| l.split_once(":devices:").map(|(_, p)| p.to_string()))
        .expect("the worker is in a devices cgroup");
    let list = std::fs::read_to_string(format!("/sys/fs/cgroup/devices{path}/devices.list"));
    stop(&c);
    let list = list.expect("devices.list");
    assert!(!list.contains("a *:* rwm"), "every device allowed:\n{list}");
    assert!(
        list.lines().any(|l| l == "c 1:3 rwm"),
        "/dev/null allowed:\n{list}"
    );
    assert!(
        !list.lines().any(|l| l.starts_with("c 1:11")),
        "kmsg allowed:\n{list}"
    );
}

/// The capability masks of `/proc/PID/status` for the names in the spec's set `set`.
fn spec_mask(k: &Kiln, id: &str, set: &str) -> String {
    let config = k
        .dir
        .join("state/io.containerd.runtime.v2.task/default")
        .join(id)
        .join("config.json");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).expect("config.json")).expect("json");
    let names = spec["process"]["capabilities"][set]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mask = names
        .iter()
        .filter_map(|n| n.as_str())
        .map(|n| 1u64 << cap_number(n))
        .fold(0, |a, b| a | b);
    format!("{mask:016x}")
}

fn cap_number(name: &str) -> u32 {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let short = name.trim_start_matches("CAP_");
    NAMES
        .iter()
        .position(|n| *n == short)
        .unwrap_or_else(|| panic!("unknown capability {name}")) as u32
}

#[test]
fn the_worker_ends_with_the_specs_capabilities_no_new_privs_and_seccomp() {
    let k = kiln();
    for (name, opts) in [
        ("caps-default", vec![]),
        (
            "caps-added",
            vec!["--cap-add", "CAP_SYS_ADMIN", "--cap-drop", "CAP_CHOWN"],
        ),
    ] {
        let c = k.container(name);
        let pid = start(&c, &image("sleep"), &opts);
        let got = |field| proc_status(pid, field);
        let (eff, prm, bnd, inh, amb) = (
            got("CapEff"),
            got("CapPrm"),
            got("CapBnd"),
            got("CapInh"),
            got("CapAmb"),
        );
        let (nnp, seccomp) = (got("NoNewPrivs"), got("Seccomp"));
        let expected = (
            spec_mask(k, &c.id, "effective"),
            spec_mask(k, &c.id, "permitted"),
            spec_mask(k, &c.id, "bounding"),
            spec_mask(k, &c.id, "inheritable"),
            spec_mask(k, &c.id, "ambient"),
        );
        stop(&c);
        assert_eq!(
            (eff, prm, bnd, inh, amb),
            expected,
            "{name}: capability sets"
        );
        assert_eq!(nnp, "1", "{name}: NoNewPrivs");
        assert_eq!(seccomp, "2", "{name}: a seccomp filter");
    }
    // A user other than root keeps what runc's process would after its exec: the bounding and
    // inheritable sets, and only its ambient capabilities (none here) as effective and
    // permitted.
    let (reference, _) = k.import_unique_as("sleep", "caps-user", "1000:1000");
    let c = k.container("caps-user");
    let pid = start(&c, &reference, &[]);
    let got = |field| proc_status(pid, field);
    let sets = (got("CapEff"), got("CapPrm"), got("CapBnd"), got("CapAmb"));
    let bounding = spec_mask(k, &c.id, "bounding");
    stop(&c);
    let zero = "0000000000000000".to_string();
    assert_eq!(sets, (zero.clone(), zero.clone(), bounding, zero));
}

#[test]
fn rlimits_from_the_spec_show_in_proc_limits() {
    let k = kiln();
    let c = k.container("rlimits");
    let pid = start(&c, &image("sleep"), &[]);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    stop(&c);
    // ctr's spec sets RLIMIT_NOFILE to 1024/1024 (containerd's default).
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["1024", "1024"], "{line}");
}

fn write_profile(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("profile.json");
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": ["mkdirat", "mkdir"], "action": "SCMP_ACT_ERRNO"}]
    });
    std::fs::write(&path, serde_json::to_vec(&profile).expect("json")).expect("write");
    path
}

#[test]
fn a_spec_seccomp_profile_is_honoured() {
    let k = kiln();
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = write_profile(dir.path());
    let profile = profile.to_string_lossy().into_owned();
    let c = k.container("seccomp-profile");
    let out = fileio(
        &c,
        &image("fileio"),
        &["mkdir", "/made-by-guest"],
        &["--seccomp", "--seccomp-profile", &profile],
    );
    assert_eq!(out.code(), 1, "mkdir must be denied by the profile:\n{out}");
    assert!(out.stderr.contains("mkdir failed"), "{out}");
    // Without the profile the same call works (the default allowlist has mkdirat).
    let c = k.container("seccomp-default");
    let out = fileio(&c, &image("fileio"), &["mkdir", "/made-by-guest"], &[]);
    assert!(out.success(), "{out}");
}

#[test]
fn traps_memory_growth_timers_and_compiles_work_under_the_allowlist() {
    let k = kiln();
    let c = k.container("filter-on");
    let pid = start(&c, &image("sleep"), &[]);
    let seccomp = proc_status(pid, "Seccomp");
    stop(&c);
    assert_eq!(
        seccomp, "2",
        "the allowlist is loaded when the spec has no profile"
    );
    let c = k.container("filter-trap");
    let out = c.run(&image("trap")).output();
    assert_eq!(out.code(), 134, "{out}");
    assert!(out.stderr.contains("wasm trap"), "{out}");
    let c = k.container("filter-grow");
    let out = c.run(&image("memgrow")).memory_limit(64 << 20).output();
    assert_eq!(
        out.code(),
        12,
        "memory.grow fails at the cap, in the guest:\n{out}"
    );
    let c = k.container("filter-grow-100");
    let out = c
        .run(&image("memgrow"))
        .args(["/memgrow.wasm", "100"])
        .output();
    assert!(
        out.success() && out.stdout.contains("reached 100 MiB"),
        "{out}"
    );
    let c = k.container("filter-sleep");
    let out = c.run(&image("sleep")).args(["/sleep.wasm", "1"]).output();
    assert!(out.success(), "{out}");
    // A cache miss: both compile children run under the filter.
    let (reference, key) = k.import_unique("exitcode", "filter");
    let c = k.container("filter-compile");
    let out = c.run(&reference).args(["/exitcode.wasm", "5"]).output();
    assert_eq!(out.code(), 5, "{out}");
    assert!(
        kiln_e2e::wait_until(Duration::from_secs(120), || k.cached_artifact(&key)).is_some(),
        "the cache fill stored the module"
    );
}

fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn namespaces_the_spec_asks_for_are_created_by_kilns_rules() {
    let k = kiln();
    let me = std::process::id();
    let c = k.container("ns-create");
    let pid = start(&c, &image("sleep"), &[]);
    let got: Vec<(&str, String)> = ["ipc", "uts", "net", "mnt", "pid"]
        .iter()
        .map(|kind| (*kind, ns(pid, kind)))
        .collect();
    stop(&c);
    for (kind, worker) in got {
        assert!(
            !worker.is_empty(),
            "no {kind} namespace link for the worker"
        );
        match kind {
            "ipc" | "uts" => assert_ne!(worker, ns(me, kind), "{kind}: created"),
            // A core module has no socket, no mount call and no process API: these are the
            // host's, by the rule README's table states.
            _ => assert_eq!(
                worker,
                ns(me, kind),
                "{kind}: not created for a core module"
            ),
        }
    }
}

#[test]
fn uid_mappings_put_the_guest_in_a_user_namespace() {
    let k = kiln();
    let c = k.container("userns");
    let pid = start(
        &c,
        &image("sleep"),
        &["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"],
    );
    let uid = proc_status(pid, "Uid");
    let gid = proc_status(pid, "Gid");
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_default();
    let user_ns = ns(pid, "user");
    stop(&c);
    assert!(uid.split_whitespace().all(|u| u == "100000"), "Uid: {uid}");
    assert!(gid.split_whitespace().all(|g| g == "100000"), "Gid: {gid}");
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"],
        "uid_map"
    );
    assert_ne!(user_ns, ns(std::process::id(), "user"));
}

/// Processes named `kiln-compile` (the compile children of a cache miss) whose command line
/// contains one of `marks` (the container's id for the worker's compile child, which has the
/// shim's argv; the module's cache key for the cache fill's, which has the fill's), seen while
/// `until` returns false: their pid, command line, /proc status and open descriptors.
fn watch_compilers(
    marks: &[&str],
    mut until: impl FnMut() -> bool,
) -> Vec<(u32, String, String, Vec<String>)> {
    let mut seen: Vec<(u32, String, String, Vec<String>)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !until() && std::time::Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if seen.iter().any(|(p, _, _, _)| *p == pid) {
                continue;
            }
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if comm.trim() != "kiln-compile" || !marks.iter().any(|m| cmdline.contains(m)) {
                continue;
            }
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let fds: Vec<String> = std::fs::read_dir(e.path().join("fd"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|f| std::fs::read_link(f.path()).ok())
                        .map(|l| l.to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if !status.is_empty() {
                seen.push((pid, cmdline, status, fds));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

#[test]
fn a_cache_miss_is_compiled_unprivileged_holding_nothing_of_the_workers() {
    let k = kiln();
    // A large module, unique to this run, run as uid 1000: both compiles (the baseline one for
    // this start, the optimizing one for the cache) take long enough to be watched.
    let (reference, key) = k.import_unique_as("big", "unprivileged", "1000:1000");
    let c = k.container("compile-unprivileged");
    let mut run = c.run(&reference).spawn();
    let compilers = watch_compilers(&[&c.id, &key], || {
        run.has_exited() && k.cached_artifact(&key).is_some()
    });
    let out = run.wait(Duration::from_secs(60));
    assert!(out.code() != 125, "the container started:\n{out}");
    let of = |mark: &str| compilers.iter().filter(|c| c.1.contains(mark)).count();
    assert!(
        of(&c.id) >= 1,
        "the worker's compile child was not seen: {compilers:?}"
    );
    assert!(
        of(&key) >= 1,
        "the cache fill's compile child was not seen: {compilers:?}"
    );
    for (pid, _, status, fds) in &compilers {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert!(
            field("Uid").split_whitespace().all(|u| u == "1000"),
            "compiler {pid} runs as {}",
            field("Uid")
        );
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
            assert_eq!(field(set), "0000000000000000", "compiler {pid}: {set}");
        }
        assert_eq!(field("NoNewPrivs"), "1", "compiler {pid}");
        assert_eq!(field("Seccomp"), "2", "compiler {pid}");
        // Only the pipe back to whoever asked for the compile.
        assert!(
            fds.len() <= 1 && fds.iter().all(|f| f.starts_with("pipe:")),
            "compiler {pid} holds {fds:?}"
        );
    }
}

#[test]
fn the_working_directory_resolves_into_its_mount_and_is_created_when_missing() {
    let k = kiln();
    let data = tempfile::tempdir().expect("tempdir");
    let c = k.container("cwd-mount");
    let out = c
        .run(&image("fileio"))
        .bind(data.path(), "/data", false)
        .opt("--cwd")
        .opt("/data/new/sub")
        .args(["/fileio.wasm", "write", "here.txt", "in the mount"])
        .output();
    assert!(out.success(), "{out}");
    assert_eq!(
        std::fs::read_to_string(data.path().join("new/sub/here.txt")).expect("written"),
        "in the mount"
    );
}

#[test]
fn an_apparmor_profile_on_a_node_without_apparmor_is_refused() {
    let k = kiln();
    let c = k.container("apparmor");
    let out = c
        .run(&image("hello"))
        .opt("--apparmor-profile")
        .opt("kiln-test")
        .output();
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.stderr.contains("apparmorProfile"), "{out}");
    assert!(out.stderr.contains(&c.id), "{out}");
}
