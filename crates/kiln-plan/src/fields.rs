//! The decision for every field of the OCI runtime spec: applied, refused, or without meaning
//! for a Wasm guest (and why). [`FIELDS`] is the list the README's table is checked against;
//! [`check`] refuses, with the field's name, what Kiln cannot honour, so that no field is
//! ever silently ignored.

use oci_spec::runtime::{LinuxPersonalityDomain, Spec};

use crate::{Host, PlanError};

/// What Kiln does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Honoured as runc honours it (or more strictly; the note says how).
    Applied,
    /// Create fails with an error naming the field when it is set (the note says when).
    Refused,
    /// Has no meaning for a Wasm guest; the note says why.
    NotApplicable,
}

impl Decision {
    /// The word the README uses.
    pub fn word(self) -> &'static str {
        match self {
            Decision::Applied => "applied",
            Decision::Refused => "refused",
            Decision::NotApplicable => "does not apply",
        }
    }
}

/// One field of config.json and its decision.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The field as a JSON path.
    pub path: &'static str,
    /// What Kiln does.
    pub decision: Decision,
    /// How, when, or why.
    pub note: &'static str,
}

const fn f(path: &'static str, decision: Decision, note: &'static str) -> Field {
    Field {
        path,
        decision,
        note,
    }
}

use Decision::{Applied, NotApplicable, Refused};

/// Every field of the runtime spec (1.2) and what Kiln does with it.
pub const FIELDS: &[Field] = &[
    f(
        "ociVersion",
        NotApplicable,
        "read by containerd; any 1.x spec is accepted",
    ),
    f("root.path", Applied, "the guest's `/`"),
    f(
        "root.readonly",
        Applied,
        "the rootfs is mounted read-only for the guest (a kernel read-only mount, not only a WASI permission)",
    ),
    f(
        "mounts (bind)",
        Applied,
        "each directory bind mount is a preopened directory, mounted `nodev,nosuid` (and `ro`/`noexec` as its options say); a single-file bind (the CRI's `/etc/hosts`) is skipped: WASI preopens directories only",
    ),
    f(
        "mounts (proc, sysfs, tmpfs, devpts, mqueue, cgroup, shm)",
        NotApplicable,
        "a Wasm guest has no procfs, sysfs, ptys or message queues; the `tmpfs` at `/dev` becomes Kiln's device directory",
    ),
    f(
        "mounts (other types, id-mapped, unknown options)",
        Refused,
        "only bind mounts of a source given by an absolute path can become guest directories",
    ),
    f(
        "process.terminal",
        Refused,
        "when true: Kiln has no terminal support yet",
    ),
    f(
        "process.consoleSize",
        NotApplicable,
        "only meaningful with a terminal, which is refused",
    ),
    f(
        "process.user.uid, gid, additionalGids",
        Applied,
        "setgroups, setgid, setuid in runc's order",
    ),
    f("process.user.umask", Applied, "set before the guest runs"),
    f("process.user.username", NotApplicable, "Windows only"),
    f(
        "process.args",
        Applied,
        "`args[0]` is the module (`path#export`), the rest the guest's argv",
    ),
    f("process.commandLine", Refused, "Windows only"),
    f("process.env", Applied, "the guest's environment"),
    f(
        "process.cwd",
        Applied,
        "resolved into the mount that holds it; created when missing, as runc does",
    ),
    f(
        "process.capabilities",
        Applied,
        "the worker ends its setup with exactly these bounding, effective, permitted, inheritable and ambient sets",
    ),
    f(
        "process.rlimits",
        Applied,
        "set on the worker before it drops privileges",
    ),
    f(
        "process.noNewPrivileges",
        Applied,
        "always set, whatever the spec says: nothing in a Wasm worker needs to gain privileges",
    ),
    f(
        "process.apparmorProfile",
        Applied,
        "when AppArmor is enabled, the worker changes to the profile before the guest runs; refused when AppArmor is not enabled on the node",
    ),
    f(
        "process.selinuxLabel",
        Refused,
        "when set on a node where SELinux is enabled; without SELinux a label has no effect, as with runc",
    ),
    f(
        "process.oomScoreAdj",
        Applied,
        "written to the worker's oom_score_adj",
    ),
    f("process.ioPriority", Applied, "ioprio_set on the worker"),
    f("process.scheduler", Refused, "when set: not supported yet"),
    f(
        "process.execCPUAffinity",
        Refused,
        "when set: not supported yet",
    ),
    f(
        "hostname, domainname",
        Applied,
        "set in the container's UTS namespace (refused without one)",
    ),
    f(
        "hooks",
        Refused,
        "when any hook is set: Kiln runs no OCI hooks",
    ),
    f(
        "annotations",
        NotApplicable,
        "read for the CRI's pod and container type; otherwise opaque",
    ),
    f(
        "linux.namespaces (with path)",
        Applied,
        "joined (user first); a pid namespace is entered by the zygote around the worker's fork",
    ),
    f(
        "linux.namespaces (without path)",
        Applied,
        "ipc, uts, cgroup, user and, for components, network are created. Not created: mount (the guest's files are detached mounts and the worker is chrooted into its rootfs; a guest cannot mount), pid (a guest can neither see nor signal processes), network for a core module (WASI preview 1 has no sockets Kiln would preopen). time: refused",
    ),
    f(
        "linux.uidMappings, gidMappings",
        Applied,
        "a user namespace is created with these maps; refused without a user namespace in the spec",
    ),
    f(
        "linux.sysctl",
        Applied,
        "namespaced sysctls (net.*, IPC, hostname) are written inside the container's own namespaces; any other is refused",
    ),
    f(
        "linux.resources.devices",
        Applied,
        "default deny, then the spec's rules: v1 devices controller, v2 BPF device program",
    ),
    f(
        "linux.devices",
        Applied,
        "created in the guest's `/dev` (a tmpfs of Kiln's with runc's default nodes) and allowed in the cgroup",
    ),
    f(
        "linux.resources.memory.limit, swap, reservation",
        Applied,
        "v1 and v2; the limit also caps linear memory",
    ),
    f(
        "linux.resources.memory.kernel, kernelTCP, swappiness",
        Refused,
        "when set: deprecated (kernel memory) or v1-only",
    ),
    f(
        "linux.resources.memory.disableOOMKiller",
        Refused,
        "when true",
    ),
    f(
        "linux.resources.memory.useHierarchy, checkBeforeUpdate",
        NotApplicable,
        "hierarchical accounting is always on in supported kernels; Kiln never updates a running container's resources",
    ),
    f(
        "linux.resources.cpu.shares, quota, period",
        Applied,
        "v1 and v2",
    ),
    f(
        "linux.resources.cpu.burst, idle, realtimeRuntime, realtimePeriod, cpus, mems",
        Refused,
        "when set: not supported yet",
    ),
    f("linux.resources.pids", Applied, "v1 and v2"),
    f(
        "linux.resources.blockIO",
        Refused,
        "when set: not supported yet",
    ),
    f(
        "linux.resources.hugepageLimits",
        NotApplicable,
        "Wasmtime never maps hugetlb pages and a guest cannot ask for them, so any limit (the kubelet sets 0 for every size) is met",
    ),
    f(
        "linux.resources.network",
        Refused,
        "when set (net_cls/net_prio)",
    ),
    f("linux.resources.rdma", Refused, "when set"),
    f(
        "linux.resources.unified",
        Applied,
        "written to the container's cgroup on v2; refused on v1",
    ),
    f(
        "linux.cgroupsPath",
        Applied,
        "cgroupfs, relative and systemd (`slice:prefix:name`) forms",
    ),
    f(
        "linux.seccomp",
        Applied,
        "the profile is loaded last, after the capability drop; without one, Kiln's own allowlist (README: Seccomp)",
    ),
    f(
        "linux.rootfsPropagation",
        NotApplicable,
        "the worker makes no mount namespace and the guest cannot mount, so no mount event can propagate",
    ),
    f(
        "linux.maskedPaths, readonlyPaths",
        NotApplicable,
        "these are procfs and sysfs paths, and a Wasm guest has neither",
    ),
    f(
        "linux.mountLabel",
        Refused,
        "when set on a node where SELinux is enabled, as process.selinuxLabel",
    ),
    f("linux.intelRdt", Refused, "when set"),
    f("linux.memoryPolicy", Refused, "when set"),
    f(
        "linux.personality",
        Refused,
        "when other than LINUX without flags",
    ),
    f("linux.timeOffsets", Refused, "when set (time namespaces)"),
    f("linux.netDevices", Refused, "when set"),
    f(
        "solaris, windows, vm, zos",
        Refused,
        "when set: other platforms",
    ),
];

fn refuse(field: &str, reason: impl Into<String>) -> Result<(), PlanError> {
    Err(PlanError::unsupported(field, reason))
}

/// Refuses every field set in `spec` that Kiln cannot honour.
pub fn check(spec: &Spec, host: &Host) -> Result<(), PlanError> {
    if spec.solaris().is_some() || spec.windows().is_some() || spec.vm().is_some() {
        return refuse("solaris/windows/vm", "Kiln runs Linux containers only");
    }
    if spec.zos().is_some() {
        return refuse("zos", "Kiln runs Linux containers only");
    }
    if let Some(h) = spec.hooks() {
        let any = [
            h.prestart(),
            h.create_runtime(),
            h.create_container(),
            h.start_container(),
            h.poststart(),
            h.poststop(),
        ]
        .iter()
        .any(|v| v.as_ref().is_some_and(|v| !v.is_empty()));
        if any {
            return refuse("hooks", "Kiln runs no OCI hooks");
        }
    }
    if let Some(p) = spec.process() {
        if p.command_line().is_some() {
            return refuse("process.commandLine", "Windows only");
        }
        if p.scheduler().is_some() {
            return refuse("process.scheduler", "not supported by Kiln yet");
        }
        if p.exec_cpu_affinity().is_some() {
            return refuse("process.execCPUAffinity", "not supported by Kiln yet");
        }
        if p.apparmor_profile().as_ref().is_some_and(|s| !s.is_empty()) && !host.apparmor {
            return refuse(
                "process.apparmorProfile",
                "AppArmor is not enabled on this node, so the profile cannot be applied",
            );
        }
        if p.selinux_label().as_ref().is_some_and(|s| !s.is_empty()) && host.selinux {
            return refuse(
                "process.selinuxLabel",
                "Kiln cannot apply SELinux labels; SELinux is enabled on this node",
            );
        }
    }
    let Some(linux) = spec.linux() else {
        return Ok(());
    };
    if linux.mount_label().as_ref().is_some_and(|s| !s.is_empty()) && host.selinux {
        return refuse(
            "linux.mountLabel",
            "Kiln cannot apply SELinux labels; SELinux is enabled on this node",
        );
    }
    if linux.intel_rdt().is_some() {
        return refuse("linux.intelRdt", "not supported by Kiln");
    }
    if linux.memory_policy().is_some() {
        return refuse("linux.memoryPolicy", "not supported by Kiln");
    }
    if linux.time_offsets().is_some() {
        return refuse(
            "linux.timeOffsets",
            "time namespaces are not supported by Kiln",
        );
    }
    if linux.net_devices().as_ref().is_some_and(|d| !d.is_empty()) {
        return refuse("linux.netDevices", "not supported by Kiln");
    }
    if let Some(p) = linux.personality()
        && (p.domain() != LinuxPersonalityDomain::PerLinux
            || p.flags().as_ref().is_some_and(|f| !f.is_empty()))
    {
        return refuse(
            "linux.personality",
            "only the LINUX personality without flags is supported",
        );
    }
    let Some(r) = linux.resources() else {
        return Ok(());
    };
    if let Some(m) = r.memory() {
        if m.kernel().is_some() || m.kernel_tcp().is_some() {
            return refuse(
                "linux.resources.memory.kernel",
                "kernel memory limits are deprecated and not supported by Kiln",
            );
        }
        if m.swappiness().is_some() {
            return refuse("linux.resources.memory.swappiness", "not supported by Kiln");
        }
        if m.disable_oom_killer() == Some(true) {
            return refuse(
                "linux.resources.memory.disableOOMKiller",
                "not supported by Kiln",
            );
        }
    }
    if let Some(c) = r.cpu() {
        let set = c.burst().is_some()
            || c.idle().is_some()
            || c.realtime_runtime().is_some()
            || c.realtime_period().is_some()
            || c.cpus().as_ref().is_some_and(|s| !s.is_empty())
            || c.mems().as_ref().is_some_and(|s| !s.is_empty());
        if set {
            return refuse(
                "linux.resources.cpu",
                "burst, idle, realtime and cpuset settings are not supported by Kiln yet",
            );
        }
    }
    if let Some(b) = r.block_io() {
        let set = b.weight().is_some()
            || b.leaf_weight().is_some()
            || [
                b.weight_device().as_ref().map(Vec::len),
                b.throttle_read_bps_device().as_ref().map(Vec::len),
                b.throttle_write_bps_device().as_ref().map(Vec::len),
                b.throttle_read_iops_device().as_ref().map(Vec::len),
                b.throttle_write_iops_device().as_ref().map(Vec::len),
            ]
            .iter()
            .any(|n| n.unwrap_or(0) > 0);
        if set {
            return refuse("linux.resources.blockIO", "not supported by Kiln yet");
        }
    }
    if r.network().as_ref().is_some_and(|n| {
        n.class_id().is_some() || n.priorities().as_ref().is_some_and(|p| !p.is_empty())
    }) {
        return refuse("linux.resources.network", "not supported by Kiln");
    }
    if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
        return refuse("linux.resources.rdma", "not supported by Kiln");
    }
    Ok(())
}
