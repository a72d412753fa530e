//! `kiln_plan::plan` on specs from fuzz input, against the fixed tree of `kiln_fuzz::fixture`.
//!
//! The input is either a config.json (when it parses as JSON; the seeds are such files) or,
//! otherwise, a structured description decoded with `arbitrary` that picks the spec's process,
//! mounts, namespaces, devices, sysctls, capabilities, rlimits and resources from the names
//! that matter to the tree and to Kiln's rules. Mount sources starting with
//! `/kiln-fuzz-outside` are moved to the directory beside the rootfs. Each spec is planned for
//! a cgroup v1 node without security modules and a cgroup v2 node with AppArmor and SELinux.
//!
//! What a plan must satisfy when it is made:
//! * the module is a file inside the rootfs, wherever its symlinks pointed;
//! * every preopen is the rootfs or a bind source of the spec that is an existing directory,
//!   named by an absolute path (the worker opens it from another working directory);
//! * `cwd_in` names a preopen and a relative path without `..` that stays inside it;
//! * namespace kinds are ones the worker knows, and every sysctl is namespaced, in a
//!   namespace the plan enters;
//! * device nodes stay below `/dev`, rlimits are consistent, unified keys are controller
//!   files;
//! * the plan survives the JSON trip to the worker unchanged.
//!
//! `KILN_FUZZ_DUMP=1` prints each spec (with the tree's real paths), to read a crash.

#![no_main]

use std::path::{Component, Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use kiln_fuzz::fixture::{GUEST_PATHS, NAMES, OUTSIDE_PREFIX, SOURCES};
use kiln_fuzz::{Tree, has_parent_dir, really_inside, tree};
use kiln_plan::{Host, NamespaceAction, Plan};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const HOSTS: [Host; 2] = [
    Host {
        apparmor: false,
        selinux: false,
        cgroup_version: 1,
    },
    Host {
        apparmor: true,
        selinux: true,
        cgroup_version: 2,
    },
];

const KINDS: &[&str] = &["mount", "cgroup", "uts", "ipc", "user", "pid", "network"];
const NS_TYPES: &[&str] = &[
    "pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time",
];
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];
const SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward",
    "net.ipv4.ip_unprivileged_port_start",
    "net.core.somaxconn",
    "kernel.shmmax",
    "kernel.msgmax",
    "kernel.sem",
    "fs.mqueue.msg_max",
    "kernel.hostname",
    "kernel.domainname",
    "kernel.pid_max",
    "vm.overcommit_memory",
    "net./../kernel.pid_max",
    "net..ipv4",
    "net.",
    "fs.mqueue.",
    "fs.mqueue../../kernel/x",
    "net.ipv4/conf",
];
const MOUNT_TYPES: &[&str] = &[
    "bind", "proc", "tmpfs", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm", "overlay", "",
];
const MOUNT_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "ro",
    "rw",
    "noexec",
    "exec",
    "nosuid",
    "nodev",
    "rprivate",
    "mode=755",
    "size=65536k",
    "strictatime",
    "idmap",
    "nosymfollow",
];
const DESTINATIONS: &[&str] = &[
    "/data",
    "/data/",
    "/app",
    "/app/sub",
    "/dev",
    "/proc",
    "/tmp",
    "/",
    "relative",
    "/data/../etc",
    "//data",
];
const RELATIVE_SOURCES: &[&str] = &[".", "..", "", "src", "fuzz"];
const DEVICE_PATHS: &[&str] = &[
    "/dev/fuse",
    "/dev/net/tun",
    "/dev/null",
    "/dev/../etc/passwd",
    "/dev/",
    "/dev//x",
    "/dev/./x",
    "/etc/passwd",
    "dev/x",
    "/dev/a/../../b",
];
const DEVICE_TYPES: &[&str] = &["c", "b", "u", "p", "a"];
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_KILL",
    "CAP_SYS_ADMIN",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SETUID",
];
const RLIMITS: &[&str] = &["RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_AS"];
const UNIFIED_KEYS: &[&str] = &[
    "memory.high",
    "pids.max",
    "cgroup.procs",
    "cgroup.subtree_control",
    "../x",
    "a/b",
    ".hidden",
    "",
];
const IO_CLASSES: &[&str] = &["IOPRIO_CLASS_RT", "IOPRIO_CLASS_BE", "IOPRIO_CLASS_IDLE"];

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

#[derive(Arbitrary, Debug)]
enum GuestPath {
    Known(u8),
    Parts(bool, Vec<Part>),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Part {
    Name(u8),
    Dot,
    DotDot,
    Empty,
    Raw(String),
}

impl GuestPath {
    fn render(&self) -> String {
        match self {
            GuestPath::Known(i) => pick(GUEST_PATHS, *i).to_string(),
            GuestPath::Parts(absolute, parts) => {
                let parts: Vec<&str> = parts
                    .iter()
                    .map(|p| match p {
                        Part::Name(i) => pick(NAMES, *i),
                        Part::Dot => ".",
                        Part::DotDot => "..",
                        Part::Empty => "",
                        Part::Raw(s) => s.as_str(),
                    })
                    .collect();
                let joined = parts.join("/");
                if *absolute {
                    format!("/{joined}")
                } else {
                    joined
                }
            }
            GuestPath::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Func {
    Named(u8),
    Empty,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Env {
    Path(Vec<GuestPath>),
    Kv(String, String),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Source {
    Outside(u8),
    InRoot(GuestPath),
    Relative(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Choice {
    Known(u8),
    Raw(String),
}

impl Choice {
    fn render(&self, list: &[&str]) -> String {
        match self {
            Choice::Known(i) => pick(list, *i).to_string(),
            Choice::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct MountIn {
    destination: Choice,
    typ: Option<u8>,
    source: Option<Source>,
    options: Option<Vec<Choice>>,
    id_mapped: bool,
}

#[derive(Arbitrary, Debug)]
struct NsIn {
    typ: u8,
    path: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct DevIn {
    path: Choice,
    typ: u8,
    major: i64,
    minor: i64,
    mode: Option<u32>,
    uid: Option<u32>,
}

#[derive(Arbitrary, Debug)]
struct RuleIn {
    allow: bool,
    typ: Option<u8>,
    major: Option<i64>,
    minor: Option<i64>,
    access: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct ResourcesIn {
    memory: Option<MemoryIn>,
    cpu: Option<(Option<u64>, Option<i64>, Option<u64>)>,
    pids: Option<i64>,
    rules: Vec<RuleIn>,
    unified: Vec<(Choice, String)>,
    refused: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct MemoryIn {
    limit: Option<i64>,
    swap: Option<i64>,
    reservation: Option<i64>,
    disable_oom_killer: Option<bool>,
}

#[derive(Arbitrary, Debug)]
struct CapsIn {
    bounding: Vec<u8>,
    effective: Vec<u8>,
    permitted: Vec<u8>,
    ambient: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    arg0: GuestPath,
    func: Option<Func>,
    args: Vec<String>,
    env: Vec<Env>,
    cwd: Option<GuestPath>,
    terminal: bool,
    readonly: Option<bool>,
    user: (u32, u32, Vec<u32>, Option<u32>),
    mounts: Vec<MountIn>,
    namespaces: Option<Vec<NsIn>>,
    uid_mappings: Vec<(u32, u32, u32)>,
    gid_mappings: Vec<(u32, u32, u32)>,
    devices: Vec<DevIn>,
    sysctls: Vec<(Choice, String)>,
    caps: Option<CapsIn>,
    rlimits: Vec<(u8, u64, u64)>,
    resources: Option<ResourcesIn>,
    hostname: Option<String>,
    domainname: Option<String>,
    io_priority: Option<(u8, i64)>,
    apparmor: Option<String>,
    oom_score_adj: Option<i32>,
    cgroups_path: Option<String>,
}

fn caps(list: &[u8]) -> Vec<&'static str> {
    list.iter().map(|i| pick(CAPS, *i)).collect()
}

fn maps(m: &[(u32, u32, u32)]) -> Value {
    m.iter()
        .map(|(c, h, s)| json!({"containerID": c, "hostID": h, "size": s}))
        .collect()
}

impl Input {
    fn spec(&self) -> Value {
        let mut arg0 = self.arg0.render();
        match &self.func {
            Some(Func::Named(i)) => {
                arg0 = format!("{arg0}#{}", pick(&["_start", "run", "main", "x#y"], *i))
            }
            Some(Func::Empty) => arg0.push('#'),
            Some(Func::Raw(s)) => arg0 = format!("{arg0}#{s}"),
            None => {}
        }
        let mut args = vec![Value::from(arg0)];
        args.extend(self.args.iter().map(|a| Value::from(a.as_str())));
        let env: Vec<String> = self
            .env
            .iter()
            .map(|e| match e {
                Env::Path(dirs) => format!(
                    "PATH={}",
                    dirs.iter()
                        .map(GuestPath::render)
                        .collect::<Vec<_>>()
                        .join(":")
                ),
                Env::Kv(k, v) => format!("{k}={v}"),
                Env::Raw(s) => s.clone(),
            })
            .collect();
        let mut process = json!({
            "args": args,
            "env": env,
            "cwd": self.cwd.as_ref().map_or("/".to_string(), GuestPath::render),
            "terminal": self.terminal,
            "user": {"uid": self.user.0, "gid": self.user.1,
                     "additionalGids": self.user.2, "umask": self.user.3},
            "rlimits": self.rlimits.iter()
                .map(|(t, hard, soft)| json!({"type": pick(RLIMITS, *t), "hard": hard, "soft": soft}))
                .collect::<Vec<_>>(),
        });
        if let Some(c) = &self.caps {
            process["capabilities"] = json!({
                "bounding": caps(&c.bounding), "effective": caps(&c.effective),
                "permitted": caps(&c.permitted), "ambient": caps(&c.ambient),
            });
        }
        if let Some((class, priority)) = self.io_priority {
            process["ioPriority"] = json!({"class": pick(IO_CLASSES, class), "priority": priority});
        }
        if let Some(p) = &self.apparmor {
            process["apparmorProfile"] = json!(p);
        }
        if let Some(o) = self.oom_score_adj {
            process["oomScoreAdj"] = json!(o);
        }

        let mounts: Vec<Value> = self
            .mounts
            .iter()
            .map(|m| {
                let mut v = json!({"destination": m.destination.render(DESTINATIONS)});
                if let Some(t) = m.typ {
                    v["type"] = json!(pick(MOUNT_TYPES, t));
                }
                if let Some(s) = &m.source {
                    v["source"] = json!(match s {
                        Source::Outside(i) => format!("{OUTSIDE_PREFIX}/{}", pick(SOURCES, *i)),
                        Source::InRoot(p) => format!("@root/{}", p.render()),
                        Source::Relative(i) => pick(RELATIVE_SOURCES, *i).to_string(),
                        Source::Raw(s) => s.clone(),
                    });
                }
                if let Some(o) = &m.options {
                    v["options"] = o.iter().map(|o| o.render(MOUNT_OPTIONS)).collect();
                }
                if m.id_mapped {
                    v["uidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
                    v["gidMappings"] = json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
                }
                v
            })
            .collect();

        let mut linux = json!({
            "uidMappings": maps(&self.uid_mappings),
            "gidMappings": maps(&self.gid_mappings),
            "devices": self.devices.iter().map(|d| json!({
                "path": d.path.render(DEVICE_PATHS), "type": pick(DEVICE_TYPES, d.typ),
                "major": d.major, "minor": d.minor, "fileMode": d.mode, "uid": d.uid,
            })).collect::<Vec<_>>(),
            "sysctl": self.sysctls.iter()
                .map(|(k, v)| (k.render(SYSCTLS), Value::from(v.as_str())))
                .collect::<serde_json::Map<_, _>>(),
        });
        if let Some(ns) = &self.namespaces {
            linux["namespaces"] = ns
                .iter()
                .map(|n| json!({"type": pick(NS_TYPES, n.typ), "path": n.path}))
                .collect();
        }
        if let Some(p) = &self.cgroups_path {
            linux["cgroupsPath"] = json!(p);
        }
        if let Some(r) = &self.resources {
            let mut res = json!({
                "devices": r.rules.iter().map(|d| json!({
                    "allow": d.allow, "type": d.typ.map(|t| pick(DEVICE_TYPES, t)),
                    "major": d.major, "minor": d.minor, "access": d.access,
                })).collect::<Vec<_>>(),
                "unified": r.unified.iter()
                    .map(|(k, v)| (k.render(UNIFIED_KEYS), Value::from(v.as_str())))
                    .collect::<serde_json::Map<_, _>>(),
            });
            if let Some(m) = &r.memory {
                res["memory"] = json!({"limit": m.limit, "swap": m.swap,
                                       "reservation": m.reservation,
                                       "disableOOMKiller": m.disable_oom_killer});
            }
            if let Some((shares, quota, period)) = r.cpu {
                res["cpu"] = json!({"shares": shares, "quota": quota, "period": period});
            }
            if let Some(p) = r.pids {
                res["pids"] = json!({"limit": p});
            }
            match r.refused.map(|i| i % 4) {
                Some(0) => res["blockIO"] = json!({"weight": 10}),
                Some(1) => res["hugepageLimits"] = json!([{"pageSize": "2MB", "limit": 0}]),
                Some(2) => res["rdma"] = json!({"mlx": {"hcaHandles": 1}}),
                Some(_) => res["network"] = json!({"classID": 1}),
                None => {}
            }
            linux["resources"] = res;
        }
        let mut spec = json!({
            "ociVersion": "1.2.0",
            "process": process,
            "root": {"path": "rootfs", "readonly": self.readonly},
            "mounts": mounts,
            "linux": linux,
        });
        if let Some(h) = &self.hostname {
            spec["hostname"] = json!(h);
        }
        if let Some(d) = &self.domainname {
            spec["domainname"] = json!(d);
        }
        spec
    }
}

/// Moves mount sources that name the tree to where the tree is.
fn place_sources(spec: &mut Value, tree: &Tree) {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return;
    };
    for m in mounts {
        let Some(src) = m.get("source").and_then(Value::as_str) else {
            continue;
        };
        let placed = if let Some(p) = tree.outside_path(src) {
            p
        } else if let Some(rest) = src.strip_prefix("@root/") {
            tree.root.join(rest)
        } else {
            continue;
        };
        m["source"] = Value::from(placed.to_string_lossy().into_owned());
    }
}

fn check(plan: &Plan, spec: &oci_spec::runtime::Spec, tree: &Tree, host: &Host) {
    let root = &tree.root;
    // The module: a file of the rootfs (plan() never names a layer).
    let kiln_plan::ModuleSource::File(module_path) = &plan.module else {
        panic!("plan() gave a module that is not a rootfs file: {:?}", plan.module);
    };
    assert!(
        module_path.starts_with(root) && !has_parent_dir(module_path),
        "module path {:?} is not below the rootfs",
        module_path
    );
    assert!(
        really_inside(module_path, root),
        "module {:?} resolves outside the rootfs",
        module_path
    );
    assert!(
        module_path.is_file(),
        "module {:?} is not a file",
        module_path
    );
    let head = std::fs::read(module_path).expect("read the module");
    assert!(
        head.starts_with(b"\0asm"),
        "module {:?} is not Wasm",
        module_path
    );

    // Preopens.
    assert_eq!(
        plan.preopens[0].host, *root,
        "the first preopen is not the rootfs"
    );
    assert_eq!(plan.preopens[0].guest, "/");
    let sources: Vec<PathBuf> = spec
        .mounts()
        .iter()
        .flatten()
        .filter_map(|m| m.source().clone())
        .collect();
    for p in &plan.preopens[1..] {
        assert!(
            sources.contains(&p.host),
            "preopen {:?} is not a bind source of the spec",
            p.host
        );
        assert!(p.host.is_dir(), "preopen {:?} is not a directory", p.host);
        assert!(
            p.host.is_absolute(),
            "preopen {:?} is relative: the worker would open it from its own working directory",
            p.host
        );
        assert!(
            p.guest.starts_with('/'),
            "preopen guest path {:?} is relative",
            p.guest
        );
    }

    // The working directory.
    let (index, rest) = &plan.cwd_in;
    assert!(
        *index < plan.preopens.len(),
        "cwd_in.0 = {index} names no preopen"
    );
    assert!(
        rest.components().all(|c| matches!(c, Component::Normal(_))),
        "cwd_in.1 = {rest:?} is not a plain relative path"
    );
    let base = &plan.preopens[*index].host;
    assert!(
        really_inside(&base.join(rest), base),
        "cwd {rest:?} leaves preopen {base:?}"
    );

    // Namespaces and sysctls.
    for ns in &plan.namespaces {
        assert!(
            KINDS.contains(&ns.kind.as_str()),
            "unknown namespace kind {:?}",
            ns.kind
        );
        if ns.kind == "pid" {
            assert!(
                matches!(ns.action, NamespaceAction::Join(_)),
                "a pid namespace is created"
            );
        }
    }
    let has = |kind: &str| plan.namespaces.iter().any(|n| n.kind == kind);
    for (key, _) in &plan.sandbox.sysctls {
        let needs = if IPC_SYSCTLS.contains(&key.as_str()) || key.starts_with("fs.mqueue.") {
            "ipc"
        } else if key.starts_with("net.") {
            "network"
        } else if key == "kernel.hostname" || key == "kernel.domainname" {
            "uts"
        } else {
            panic!("sysctl {key:?} is not namespaced");
        };
        assert!(has(needs), "sysctl {key:?} without a {needs} namespace");
        assert!(
            !key.contains('/') && !key.split('.').any(|c| c.is_empty()),
            "sysctl {key:?} does not name one file below /proc/sys"
        );
    }
    if plan.sandbox.hostname.is_some() || plan.sandbox.domainname.is_some() {
        assert!(has("uts"), "a hostname without a UTS namespace");
    }
    let creates_user = plan
        .namespaces
        .iter()
        .any(|n| n.kind == "user" && n.action == NamespaceAction::Create);
    if creates_user {
        assert!(
            !plan.sandbox.uid_mappings.is_empty() || !plan.sandbox.gid_mappings.is_empty(),
            "a user namespace is created without id mappings"
        );
    }

    // Devices, rlimits, cgroup files.
    for node in plan.sandbox.dev_nodes.iter().flatten() {
        let p = Path::new(&node.path);
        assert!(
            !node.path.is_empty()
                && p.components().all(|c| matches!(c, Component::Normal(_)))
                && !node.path.contains("//")
                && !node.path.ends_with('/'),
            "device node {:?} is not a plain path below /dev",
            node.path
        );
        assert!(
            matches!(node.kind, 'c' | 'b' | 'p'),
            "device kind {:?}",
            node.kind
        );
        assert!(node.mode <= 0o7777, "device mode {:o}", node.mode);
    }
    let mut seen = Vec::new();
    for r in &plan.sandbox.rlimits {
        assert!(r.soft <= r.hard, "rlimit {} soft above hard", r.name);
        assert!(!seen.contains(&r.resource), "rlimit {} twice", r.name);
        seen.push(r.resource);
    }
    for (key, _) in &plan.resources.unified {
        assert!(host.cgroup_version == 2, "unified settings on a v1 node");
        assert!(
            !key.contains('/') && !key.starts_with('.') && !key.starts_with("cgroup."),
            "unified key {key:?} is not a controller file"
        );
    }
    if plan.sandbox.apparmor_profile.is_some() {
        assert!(
            host.apparmor,
            "an AppArmor profile on a node without AppArmor"
        );
    }

    // The trip to the worker.
    let bytes = serde_json::to_vec(plan)
        .unwrap_or_else(|e| panic!("the plan cannot be sent to the worker: {e}"));
    let back: Plan = serde_json::from_slice(&bytes).expect("the worker cannot read the plan");
    assert_eq!(&back, plan, "the plan changed on its way to the worker");
}

fn run(mut value: Value) {
    let tree = tree();
    place_sources(&mut value, tree);
    // KILN_FUZZ_DUMP=1 prints each spec, to read what a crashing input stands for.
    static DUMP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *DUMP.get_or_init(|| std::env::var_os("KILN_FUZZ_DUMP").is_some()) {
        eprintln!("spec: {value}");
    }
    let Ok(spec) = serde_json::from_value::<oci_spec::runtime::Spec>(value) else {
        return;
    };
    for host in &HOSTS {
        if let Ok(plan) = kiln_plan::plan("fuzz", &spec, &tree.root, host) {
            check(&plan, &spec, tree, host);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        run(value);
        return;
    }
    let u = Unstructured::new(data);
    if let Ok(input) = Input::arbitrary_take_rest(u) {
        run(input.spec());
    }
});
