//! Confining a worker: what a Wasm guest's process is allowed to reach, made as strict as runc
//! makes a container's, or stricter.
//!
//! Wasm already confines the guest's code; this crate confines the *worker process* that runs
//! it, so that a bug in Wasmtime (or a guest that escapes it) finds no more than a runc
//! container would give it: the container's cgroup (device rules there, see `kiln-cgroups`),
//! its namespaces, its identity and capabilities, its rlimits, a seccomp filter, and a view of
//! the file system made only of detached mounts (rootfs and bind mounts `nodev`, a `/dev` of
//! its own with just the spec's device nodes), chrooted into its rootfs.
//!
//! The order of the privilege changes matters and is runc's: see [`identity::finish`], which
//! goes through the [`Syscall`] seam so that a unit test can pin the order.

pub mod identity;
pub mod mounts;
pub mod namespaces;
pub mod seccomp;
mod syscall;

pub use syscall::{Linux, Syscall};

/// What went wrong while confining a worker; each variant says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The seccomp profile cannot be compiled.
    #[error("seccomp profile: {0}")]
    Seccomp(String),
    /// A value in the plan cannot be used (an unknown capability, say).
    #[error("{0}")]
    Invalid(String),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// Turns a `-1` return into the calling thread's errno.
pub(crate) fn check(ret: libc::c_long) -> std::io::Result<libc::c_long> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
