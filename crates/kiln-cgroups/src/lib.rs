//! A container's cgroup: create it, apply the OCI resource limits, put the
//! worker process in it, read its statistics, kill what runs in it and
//! remove it. Both cgroup v1 (separate or co-mounted hierarchies, as on
//! hybrid systemd hosts) and cgroup v2 (the unified hierarchy) are handled.
//!
//! # Why not `cgroups-rs`
//!
//! Kiln runs each container as one worker process that has to be placed in
//! the container's cgroup, and container start latency is the headline
//! metric. `cgroups-rs` creates the cgroup in *every* v1 hierarchy,
//! including `cpuset` (whose `cpuset.cpus`/`cpuset.mems` then have to be
//! copied from the parent before a process may join), `freezer`, `blkio`
//! and so on. That costs milliseconds on the start path for
//! controllers we never set a limit in. This crate only touches what the
//! limits and statistics need:
//!
//! * v1: the hierarchies that carry `memory`, `cpu`, `cpuacct`, `pids` and
//!   `devices` (a co-mounted pair such as `cpu,cpuacct` is one directory,
//!   created once). `cpuset`, `freezer`, `blkio`, `name=systemd` and any
//!   other hierarchy are left alone, so the process stays in its parent's
//!   cgroup there.
//! * v2: one directory; `+cpu +memory +pids` are enabled in the ancestors'
//!   `cgroup.subtree_control` only where they are missing.
//!
//! # No systemd / D-Bus
//!
//! A systemd-style `linux.cgroupsPath` (`slice:prefix:name`) is expanded to
//! the directory systemd would use (see [`Cgroup::create`]) and that
//! directory is written directly through cgroupfs. No transient scope unit
//! is asked for over D-Bus: that round trip is slow and would make systemd
//! the owner of the process placement. The consequence is that systemd does
//! not know about the scope (`systemctl status` will not list it), exactly
//! like runc's and containerd's cgroupfs driver under a systemd slice.
//!
//! # Testing seam
//!
//! Everything that looks at the machine goes through a [`Layout`], which is
//! built from `/proc/self/mountinfo` and `/proc/self/cgroup` text by
//! [`Layout::from_mountinfo`] and [`Layout::with_own_cgroups`]. Tests feed
//! mountinfo text whose mount points are in a temporary directory and the
//! whole crate then operates on plain files there.
//!
//! # Example
//!
//! ```no_run
//! use kiln_cgroups::{Cgroup, Layout, Resources};
//!
//! # fn main() -> kiln_cgroups::Result<()> {
//! let layout = Layout::detect()?;
//! let resources = Resources { memory_limit: Some(64 << 20), ..Resources::default() };
//! let cgroup = Cgroup::create(&layout, "/default/abc", "/kiln/abc", &resources)?;
//! cgroup.add_pid(1234)?;
//! let stats = cgroup.stats()?;
//! println!("{} bytes in use", stats.memory_usage);
//! cgroup.kill_all()?;
//! cgroup.remove()?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod cgroup;
mod devices;
mod fsutil;
mod layout;
mod oom;
mod path;
mod stats;

use std::io;
use std::path::PathBuf;

pub use cgroup::{Cgroup, Resources, shares_to_weight};
pub use devices::{DeviceKind, DeviceRule, allows_everything};
pub use layout::{Hierarchy, Layout};
pub use oom::OomEvents;
pub use stats::Stats;

/// What can go wrong. Every I/O variant names the file or directory and the
/// operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation other than a write failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create directory", "read".
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing a value to a control file failed.
    #[error("write {value:?} to {}: {source}", path.display())]
    Write {
        /// The control file.
        path: PathBuf,
        /// The value that was written.
        value: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending SIGKILL to a process in the cgroup failed (other than because
    /// the process is already gone).
    #[error("kill pid {pid}: {source}")]
    Kill {
        /// The process.
        pid: i32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `linux.cgroupsPath` (or the default path) is not acceptable.
    #[error("invalid cgroups path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The resources cannot be expressed (e.g. a v2 swap limit without a
    /// memory limit).
    #[error("invalid resources: {0}")]
    InvalidResources(String),
    /// A pid that is not a real process id (zero or negative).
    #[error("invalid pid {0}")]
    InvalidPid(i32),
    /// Text from the kernel (mountinfo, /proc/self/cgroup, a control file)
    /// could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was being parsed (a path, or e.g. "mountinfo line 3").
        what: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The device rules could not be put in place (v2: loading or attaching the BPF
    /// program).
    #[error("{op} for {}: {source}{}", path.display(), if detail.is_empty() { String::new() } else { format!(" (verifier: {detail})") })]
    Device {
        /// The cgroup directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The verifier's log, if any.
        detail: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// None of the cgroup's directories exist.
    #[error("cgroup {} does not exist", path.display())]
    NotFound {
        /// The (first) directory that was looked for.
        path: PathBuf,
    },
    /// No usable cgroup file system is mounted.
    #[error("no cgroup file system with memory, cpu, cpuacct or pids (v1) or cgroup2 is mounted")]
    NoCgroupFs,
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
