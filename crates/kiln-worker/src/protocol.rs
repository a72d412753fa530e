//! Messages between the shim, the zygote and the workers.
//!
//! Shim ↔ zygote: a `SOCK_SEQPACKET` socketpair carrying one JSON value per packet, so message
//! boundaries come from the kernel and the zygote needs no framing code. A spawn request
//! carries the worker's end of a fresh `SOCK_STREAM` socketpair (SCM_RIGHTS); shim ↔ worker
//! talk over that: the worker reports [`WorkerReport`] as one JSON line, the shim sends
//! [`START_BYTE`] when containerd starts the task.

use std::path::PathBuf;

use kiln_plan::Plan;
use serde::{Deserialize, Serialize};

/// Largest packet either side sends; a plan is a few KiB.
pub const MAX_PACKET: usize = 1 << 20;

/// The byte the shim writes to a worker to let it run guest code.
pub const START_BYTE: u8 = b'S';

/// Where the worker's stdio goes: containerd's FIFO paths (or `file://` URIs); empty means
/// `/dev/null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    /// stdin path.
    pub stdin: String,
    /// stdout path.
    pub stdout: String,
    /// stderr path.
    pub stderr: String,
}

/// Shim → zygote: fork a worker for this plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Chosen by the shim; echoed in the reply.
    pub token: u64,
    /// What to run.
    pub plan: Plan,
    /// Where stdio goes.
    pub stdio: Stdio,
    /// `cgroup.procs` files the worker writes its pid to before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// On cgroup v2: the container's cgroup directory, which the zygote forks the worker
    /// straight into (`clone3` with `CLONE_INTO_CGROUP`). When that works, the worker skips
    /// `cgroup_procs`; on a kernel without it (before 5.7), the worker writes them as on v1.
    #[serde(default)]
    pub clone_into: Option<PathBuf>,
    /// `cgroup.procs` files of the shim's own cgroups: where the background compile that
    /// fills the cache after a baseline first start moves to, out of the container's cgroup.
    #[serde(default)]
    pub home_cgroup_procs: Vec<PathBuf>,
    /// The compile cache root.
    pub cache_root: PathBuf,
    /// The container's log pipe (containerd's `log` FIFO in its bundle), if any.
    pub log_path: Option<PathBuf>,
    /// The seccomp filter the worker loads last (compiled by the shim from the spec's profile
    /// or Kiln's allowlist); `None` when turned off.
    #[serde(default)]
    pub seccomp: Option<kiln_sandbox::seccomp::Filter>,
}

/// Zygote → shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZygoteEvent {
    /// A worker was forked for request `token`.
    Spawned {
        /// The request's token.
        token: u64,
        /// The worker's pid, in the shim's pid namespace.
        pid: i32,
    },
    /// The fork itself failed.
    SpawnFailed {
        /// The request's token.
        token: u64,
        /// Why.
        error: String,
    },
    /// A worker exited; `status` is its exit code, or 128 + signal.
    Exited {
        /// The worker's pid.
        pid: i32,
        /// Exit status in shell convention.
        status: i32,
    },
}

/// Worker → shim, once, after setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerReport {
    /// In its cgroup and namespaces, module loaded, waiting for [`START_BYTE`].
    Ready {
        /// How the module was obtained (`hit`, `miss`, `replaced`, `uncached`).
        cache: String,
        /// Microseconds spent loading or compiling the module.
        load_us: u64,
    },
    /// Setup failed; the worker exits.
    Failed {
        /// What went wrong, for the user.
        error: String,
    },
}
