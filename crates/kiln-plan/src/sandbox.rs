//! What confines the worker, decided from the spec: its cgroup settings (device rules
//! included), the namespaces it joins or creates, its capabilities, rlimits, seccomp profile,
//! device directory, id mappings and sysctls.
//!
//! A guest must be at least as contained as the same image under runc, so the decisions
//! follow runc's wherever they apply. Where a guest provably cannot observe something, Kiln
//! may skip it to start faster; each such skip is written next to the rule that makes it, and
//! pinned by a test.

use std::path::PathBuf;

use kiln_cgroups::{DeviceKind, DeviceRule, Resources, allows_everything};
use log::debug;
use oci_spec::runtime::{LinuxDeviceType, LinuxNamespaceType, LinuxSeccomp, PosixRlimitType, Spec};
use serde::{Deserialize, Serialize};

use crate::{Host, ModuleKind, PlanError};

/// Everything about the worker's confinement that is not its cgroup or its namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// The capability sets the worker ends its setup with.
    pub capabilities: CapabilitySets,
    /// `process.rlimits`, applied before the worker drops privileges.
    pub rlimits: Vec<Rlimit>,
    /// The seccomp filter to load last.
    pub seccomp: Seccomp,
    /// The device nodes of the guest's `/dev` (a tmpfs of Kiln's, read-only once made), or
    /// `None` when the spec binds a directory of its own at `/dev`.
    pub dev_nodes: Option<Vec<DeviceNode>>,
    /// The rootfs and bind mounts are given to the guest `nodev`: device nodes in the image or
    /// in a mount cannot be opened, whatever the cgroup allows. False only when the device
    /// rules allow every device (a privileged container), as runc then mounts them.
    pub nodev: bool,
    /// `linux.uidMappings` for a user namespace the worker creates.
    pub uid_mappings: Vec<IdMap>,
    /// `linux.gidMappings` for a user namespace the worker creates.
    pub gid_mappings: Vec<IdMap>,
    /// `hostname`, set in the container's UTS namespace.
    pub hostname: Option<String>,
    /// `domainname`, set in the container's UTS namespace.
    pub domainname: Option<String>,
    /// `linux.sysctl`, each one namespaced and written inside the worker's namespaces.
    pub sysctls: Vec<(String, String)>,
    /// `process.oomScoreAdj`.
    pub oom_score_adj: Option<i32>,
    /// `process.apparmorProfile` (only set when AppArmor is enabled on the node).
    pub apparmor_profile: Option<String>,
    /// `process.ioPriority` as `(class, level)` in `ioprio_set(2)` terms.
    pub io_priority: Option<(u32, u32)>,
    /// The kinds of namespace the spec asked for that Kiln does not create (see
    /// [`namespaces`]). The worker stands in for them with a seccomp guard (no signals but to
    /// itself without a pid namespace, no new sockets without a network namespace), so that even
    /// a worker taken over beyond Wasm cannot use what it shares with the node.
    pub skipped: Vec<String>,
}

/// Capability names (`CAP_CHOWN`, …) per set, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilitySets {
    /// The bounding set.
    pub bounding: Vec<String>,
    /// The effective set.
    pub effective: Vec<String>,
    /// The permitted set.
    pub permitted: Vec<String>,
    /// The inheritable set.
    pub inheritable: Vec<String>,
    /// The ambient set.
    pub ambient: Vec<String>,
}

/// One resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The spec's name, e.g. `RLIMIT_NOFILE`.
    pub name: String,
    /// The resource number for `setrlimit(2)`.
    pub resource: u32,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Which seccomp filter the worker loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    /// The spec's `linux.seccomp` profile.
    Profile(Box<LinuxSeccomp>),
    /// The spec has none: Kiln's allowlist of what Wasmtime and WASI need.
    Default,
}

/// A device node in the guest's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Path below `/dev`, e.g. `null` or `net/tun`.
    pub path: String,
    /// `c`, `b` or `p` (a FIFO).
    pub kind: char,
    /// Major number.
    pub major: i64,
    /// Minor number.
    pub minor: i64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One range of a user namespace's id map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First id inside the namespace.
    pub container_id: u32,
    /// First id outside.
    pub host_id: u32,
    /// How many.
    pub size: u32,
}

/// A namespace the worker enters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// The kind as the OCI spec names it (`network`, `ipc`, `uts`, `mount`, `pid`, `user`,
    /// `cgroup`).
    pub kind: String,
    /// Join or create.
    pub action: NamespaceAction,
}

/// What the worker does with a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceAction {
    /// Join the namespace at this path (`/proc/PID/ns/net`, a bind-mounted netns, …).
    Join(PathBuf),
    /// Create a new one.
    Create,
}

/// The devices runc creates in every container's `/dev` (and allows in its cgroup).
const DEFAULT_DEVICES: [(&str, i64, i64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The cgroup settings from `linux.resources`, device rules completed as runc completes them.
pub(crate) fn resources(spec: &Spec, host: &Host) -> Result<Resources, PlanError> {
    let linux = spec.linux().as_ref();
    let r = linux.and_then(|l| l.resources().as_ref());
    let mut rules: Vec<DeviceRule> = vec![DeviceRule::deny_all()];
    for d in r.and_then(|r| r.devices().as_ref()).into_iter().flatten() {
        rules.push(DeviceRule {
            allow: d.allow(),
            kind: match d.typ() {
                None | Some(LinuxDeviceType::A) => DeviceKind::All,
                Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => DeviceKind::Char,
                Some(LinuxDeviceType::B) => DeviceKind::Block,
                Some(LinuxDeviceType::P) => {
                    return Err(PlanError::unsupported(
                        "linux.resources.devices",
                        "a rule of type p (FIFO) is not a device rule",
                    ));
                }
            },
            major: d.major().filter(|m| *m >= 0),
            minor: d.minor().filter(|m| *m >= 0),
            access: d.access().clone().unwrap_or_default(),
        });
    }
    for node in dev_nodes(spec)? {
        if node.kind != 'p' {
            let kind = if node.kind == 'b' {
                DeviceKind::Block
            } else {
                DeviceKind::Char
            };
            rules.push(DeviceRule::allow(kind, node.major, node.minor, "rwm"));
        }
    }
    let unified: Vec<(String, String)> = r
        .and_then(|r| r.unified().as_ref())
        .map(|u| {
            let mut v: Vec<_> = u.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    if !unified.is_empty() && host.cgroup_version != 2 {
        return Err(PlanError::unsupported(
            "linux.resources.unified",
            "unified cgroup settings need a cgroup v2 node; this node uses cgroup v1",
        ));
    }
    if let Some((key, _)) = unified
        .iter()
        .find(|(k, _)| k.contains('/') || k.starts_with('.') || k.starts_with("cgroup."))
    {
        return Err(PlanError::unsupported(
            "linux.resources.unified",
            format!("{key:?} is not a controller file of the container's cgroup"),
        ));
    }
    let memory = r.and_then(|r| r.memory().as_ref());
    let cpu = r.and_then(|r| r.cpu().as_ref());
    Ok(Resources {
        memory_limit: memory.and_then(|m| m.limit()),
        memory_swap: memory.and_then(|m| m.swap()),
        memory_reservation: memory.and_then(|m| m.reservation()),
        cpu_shares: cpu.and_then(|c| c.shares()),
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        pids_limit: r.and_then(|r| r.pids().as_ref()).map(|p| p.limit()),
        devices: Some(rules),
        unified,
    })
}

/// The nodes of the guest's `/dev`: runc's defaults, then `linux.devices` (a spec device with
/// a default's path replaces it).
fn dev_nodes(spec: &Spec) -> Result<Vec<DeviceNode>, PlanError> {
    let mut nodes: Vec<DeviceNode> = DEFAULT_DEVICES
        .iter()
        .map(|(path, major, minor)| DeviceNode {
            path: path.to_string(),
            kind: 'c',
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
        .collect();
    let devices = spec.linux().as_ref().and_then(|l| l.devices().as_ref());
    for d in devices.into_iter().flatten() {
        let path = d.path().to_string_lossy().into_owned();
        let field = "linux.devices";
        let Some(rel) = path.strip_prefix("/dev/").filter(|r| {
            !r.is_empty() && !r.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        }) else {
            return Err(PlanError::unsupported(
                field,
                format!("{path}: Kiln creates device nodes only below /dev"),
            ));
        };
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => 'c',
            LinuxDeviceType::B => 'b',
            LinuxDeviceType::P => 'p',
            LinuxDeviceType::A => {
                return Err(PlanError::unsupported(
                    field,
                    format!("{path}: a device node must be of type c, b, u or p"),
                ));
            }
        };
        nodes.retain(|n| n.path != rel);
        nodes.push(DeviceNode {
            path: rel.to_string(),
            kind,
            major: d.major(),
            minor: d.minor(),
            mode: d.file_mode().unwrap_or(0o666) & 0o7777,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    Ok(nodes)
}

/// Whether `path` names the pid or network namespace the planning process (the shim, in the
/// node's namespaces) is in.
fn is_own_namespace(kind: &str, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let own = match kind {
        "pid" => "/proc/self/ns/pid",
        "network" => "/proc/self/ns/net",
        _ => return false,
    };
    match (std::fs::metadata(path), std::fs::metadata(own)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn kind_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mount",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "network",
        LinuxNamespaceType::Time => "time",
    }
}

/// Whether a sysctl must be written in a network namespace of the container's own.
fn is_net_sysctl(key: &str) -> bool {
    key.starts_with("net.")
}

/// The namespaces to enter, in order: joins first (the user namespace before the others, so
/// that the worker holds privileges in it), then the ones to create (the user namespace first,
/// so that the others are owned by it). What is skipped, and why:
///
/// * `mount`: the worker's whole view of files is its preopened directories, each a detached
///   copy of a mount, and it is chrooted into its rootfs; a namespace would only copy the
///   node's mount table (hundreds of entries on a Kubernetes node) at every start. Created
///   when the spec grants CAP_SYS_ADMIN, with which a process could mount.
/// * `pid`: a guest has no call that can see or signal a process, and a worker that is pid 1
///   of its namespace would ignore signals it has no handler for.
/// * `network`, for a core module: WASI preview 1 offers sockets only through descriptors the
///   host preopens, and Kiln preopens none, so such a guest cannot reach any network; creating
///   and later destroying a network namespace is the costliest namespace operation. Created
///   whenever the spec sets a `net.*` sysctl, and always for a component.
pub(crate) fn namespaces(
    spec: &Spec,
    kind: ModuleKind,
    role: crate::Role,
) -> Result<(Vec<Namespace>, Vec<String>), PlanError> {
    let linux = spec.linux().as_ref();
    let sys_admin = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .is_some_and(|c| {
            [c.effective(), c.permitted(), c.ambient()]
                .iter()
                .any(|set| names(set).iter().any(|n| n == "CAP_SYS_ADMIN"))
        });
    let listed = linux
        .and_then(|l| l.namespaces().as_ref())
        .cloned()
        .unwrap_or_default();
    let net_sysctl = linux
        .and_then(|l| l.sysctl().as_ref())
        .is_some_and(|s| s.keys().any(|k| is_net_sysctl(k)));
    let has_mappings = linux.is_some_and(|l| {
        l.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || l.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    });
    let mut joins = Vec::new();
    let mut creates = Vec::new();
    let mut skipped = Vec::new();
    let mut user_ns = false;
    for ns in &listed {
        let name = kind_name(ns.typ());
        if ns.typ() == LinuxNamespaceType::Time {
            return Err(PlanError::unsupported(
                "linux.namespaces",
                "time namespaces are not supported by Kiln",
            ));
        }
        user_ns |= ns.typ() == LinuxNamespaceType::User;
        let entry = |action| Namespace {
            kind: name.to_string(),
            action,
        };
        match ns.path() {
            // Joining the network namespace this process is in (a host-network pod's) is
            // what a component's sockets are for: nothing to do, and nothing to guard.
            Some(path)
                if ns.typ() == LinuxNamespaceType::Network
                    && kind == ModuleKind::Component
                    && is_own_namespace(name, path) =>
            {
                debug!("network namespace {} is the node's own", path.display());
            }
            // Joining the pid or network namespace this process is in (a pod sandbox's, when
            // Kiln did not create one for it) changes nothing; it counts as not created, so
            // the worker gets the guard that stands in for it.
            Some(path) if is_own_namespace(name, path) => {
                debug!("{name} namespace {} is the node's own", path.display());
                skipped.push(name.to_string());
            }
            Some(path) => {
                let e = entry(NamespaceAction::Join(path.clone()));
                if ns.typ() == LinuxNamespaceType::User {
                    joins.insert(0, e);
                } else {
                    joins.push(e);
                }
            }
            None => match ns.typ() {
                LinuxNamespaceType::Mount if sys_admin => {
                    creates.push(entry(NamespaceAction::Create))
                }
                LinuxNamespaceType::Mount | LinuxNamespaceType::Pid => {
                    debug!("{name} namespace not created: a Wasm guest cannot observe it");
                    skipped.push(name.to_string());
                }
                // A pod sandbox's namespaces are its containers': all are made as asked.
                LinuxNamespaceType::Network
                    if kind == ModuleKind::Core && !net_sysctl && role == crate::Role::Guest =>
                {
                    debug!("network namespace not created: a core module has no sockets");
                    skipped.push(name.to_string());
                }
                LinuxNamespaceType::User => {
                    if !has_mappings {
                        return Err(PlanError::unsupported(
                            "linux.namespaces",
                            "a user namespace to create needs linux.uidMappings and \
                             linux.gidMappings",
                        ));
                    }
                    creates.insert(0, entry(NamespaceAction::Create));
                }
                _ => creates.push(entry(NamespaceAction::Create)),
            },
        }
    }
    if has_mappings && !user_ns {
        return Err(PlanError::unsupported(
            "linux.uidMappings",
            "id mappings are set but the spec has no user namespace",
        ));
    }
    joins.extend(creates);
    Ok((joins, skipped))
}

pub(crate) fn names(set: &Option<oci_spec::runtime::Capabilities>) -> Vec<String> {
    let mut v: Vec<String> = set
        .iter()
        .flatten()
        .filter_map(|c| serde_json::to_value(c).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn rlimit_resource(t: PosixRlimitType) -> (&'static str, u32) {
    use PosixRlimitType::*;
    let (name, res) = match t {
        RlimitCpu => ("RLIMIT_CPU", libc::RLIMIT_CPU),
        RlimitFsize => ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
        RlimitData => ("RLIMIT_DATA", libc::RLIMIT_DATA),
        RlimitStack => ("RLIMIT_STACK", libc::RLIMIT_STACK),
        RlimitCore => ("RLIMIT_CORE", libc::RLIMIT_CORE),
        RlimitRss => ("RLIMIT_RSS", libc::RLIMIT_RSS),
        RlimitNproc => ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
        RlimitNofile => ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
        RlimitMemlock => ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
        RlimitAs => ("RLIMIT_AS", libc::RLIMIT_AS),
        RlimitLocks => ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS),
        RlimitSigpending => ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING),
        RlimitMsgqueue => ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE),
        RlimitNice => ("RLIMIT_NICE", libc::RLIMIT_NICE),
        RlimitRtprio => ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO),
        RlimitRttime => ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME),
    };
    (name, res)
}

/// Kernel sysctls that live in the IPC namespace (runc's list).
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Checks each sysctl is namespaced and that the worker is in a namespace of the container's
/// own for it, as runc does: a sysctl written from the host's namespaces would change the node.
fn sysctls(spec: &Spec, namespaces: &[Namespace]) -> Result<Vec<(String, String)>, PlanError> {
    let has = |kind: &str| namespaces.iter().any(|n| n.kind == kind);
    let mut out: Vec<(String, String)> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    out.sort();
    for (key, _) in &out {
        let needs = if IPC_SYSCTLS.contains(&key.as_str()) || key.starts_with("fs.mqueue.") {
            "ipc"
        } else if is_net_sysctl(key) {
            "network"
        } else if key == "kernel.hostname" || key == "kernel.domainname" {
            "uts"
        } else {
            return Err(PlanError::unsupported(
                "linux.sysctl",
                format!("{key} is not a namespaced sysctl; it would change the whole node"),
            ));
        };
        if !has(needs) {
            return Err(PlanError::unsupported(
                "linux.sysctl",
                format!("{key} needs a {needs} namespace of the container's own"),
            ));
        }
        // Each dot-separated part is a directory or file below /proc/sys: an empty one
        // ("net.", "net..x") would name a directory, or its parent.
        if key.split('.').any(str::is_empty) || key.contains('/') {
            return Err(PlanError::unsupported(
                "linux.sysctl",
                format!("{key:?} is not a sysctl name"),
            ));
        }
    }
    Ok(out)
}

pub(crate) fn sandbox(
    spec: &Spec,
    host: &Host,
    resources: &Resources,
    namespaces: &[Namespace],
    skipped: Vec<String>,
    dev_is_bound: bool,
) -> Result<Sandbox, PlanError> {
    let process = spec.process().as_ref().ok_or(PlanError::NoProcess)?;
    let linux = spec.linux().as_ref();
    let caps = process.capabilities().as_ref();
    let capabilities = CapabilitySets {
        bounding: names(&caps.and_then(|c| c.bounding().clone())),
        effective: names(&caps.and_then(|c| c.effective().clone())),
        permitted: names(&caps.and_then(|c| c.permitted().clone())),
        inheritable: names(&caps.and_then(|c| c.inheritable().clone())),
        ambient: names(&caps.and_then(|c| c.ambient().clone())),
    };
    let mut rlimits = Vec::new();
    for r in process.rlimits().iter().flatten() {
        let (name, resource) = rlimit_resource(r.typ());
        if r.soft() > r.hard() {
            return Err(PlanError::unsupported(
                "process.rlimits",
                format!(
                    "{name}: soft limit {} above hard limit {}",
                    r.soft(),
                    r.hard()
                ),
            ));
        }
        rlimits.retain(|x: &Rlimit| x.resource != resource);
        rlimits.push(Rlimit {
            name: name.to_string(),
            resource,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => Seccomp::Profile(Box::new(profile.clone())),
        None => Seccomp::Default,
    };
    let spec_devices = linux
        .and_then(|l| l.devices().as_ref())
        .is_some_and(|d| !d.is_empty());
    let dev_nodes = if dev_is_bound {
        if spec_devices {
            return Err(PlanError::unsupported(
                "linux.devices",
                "the spec binds a directory of its own at /dev, where Kiln would create the \
                 device nodes",
            ));
        }
        None
    } else {
        Some(dev_nodes(spec)?)
    };
    let rules = resources.devices.as_deref().unwrap_or(&[]);
    let map = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| -> Vec<IdMap> {
        m.iter()
            .flatten()
            .map(|m| IdMap {
                container_id: m.container_id(),
                host_id: m.host_id(),
                size: m.size(),
            })
            .collect()
    };
    let uid_mappings = map(&linux.and_then(|l| l.uid_mappings().clone()));
    let gid_mappings = map(&linux.and_then(|l| l.gid_mappings().clone()));
    let uts = namespaces.iter().any(|n| n.kind == "uts");
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    let domainname = spec.domainname().clone().filter(|h| !h.is_empty());
    if (hostname.is_some() || domainname.is_some()) && !uts {
        return Err(PlanError::unsupported(
            "hostname",
            "setting a hostname needs a UTS namespace of the container's own",
        ));
    }
    let io_priority = match process.io_priority() {
        Some(p) => {
            use oci_spec::runtime::IOPriorityClass::*;
            let class = match p.class() {
                IoprioClassRt => 1,
                IoprioClassBe => 2,
                IoprioClassIdle => 3,
            };
            let level = u32::try_from(p.priority())
                .ok()
                .filter(|l| *l <= 7)
                .ok_or_else(|| {
                    PlanError::unsupported(
                        "process.ioPriority",
                        format!("priority {} is not in 0..=7", p.priority()),
                    )
                })?;
            Some((class, level))
        }
        None => None,
    };
    Ok(Sandbox {
        capabilities,
        rlimits,
        seccomp,
        dev_nodes,
        nodev: !allows_everything(rules),
        uid_mappings,
        gid_mappings,
        hostname,
        domainname,
        sysctls: sysctls(spec, namespaces)?,
        oom_score_adj: process.oom_score_adj(),
        apparmor_profile: process
            .apparmor_profile()
            .clone()
            .filter(|p| !p.is_empty() && host.apparmor),
        io_priority,
        skipped,
    })
}
