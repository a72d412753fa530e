//! The plan: what a Kiln worker runs, decided from an OCI bundle before any process exists.
//!
//! Deciding everything up front, in the shim, means every way a container can be wrong (no
//! entrypoint, not Wasm, an impossible mount, a field Kiln does not support) is found at
//! Create time and reported to containerd with the container's name, instead of surfacing as a
//! worker that dies with a half-written message. The worker then only executes a [`Plan`]; it
//! never reads `config.json` itself.
//!
//! The plan is a plain serialisable value so that it can cross the process boundary to the
//! worker as-is.

mod resolve;

use std::path::{Path, PathBuf};

use log::debug;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

pub use resolve::resolve_in_root;

/// The export called when the entrypoint names none: WASI's command entry.
pub const DEFAULT_ENTRY_FUNC: &str = "_start";

/// The first four bytes of every Wasm binary (modules and components alike).
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Everything a worker needs to run one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The container id, used in every error message.
    pub id: String,
    /// Host path of the module file, inside the container's rootfs.
    pub module_path: PathBuf,
    /// The export to call (`path#func` in `process.args[0]`; default `_start`).
    pub entry_func: String,
    /// The guest's argv: `process.args` with argv\[0\] stripped of any `#func` suffix.
    pub args: Vec<String>,
    /// The guest's environment as `(key, value)` pairs, in spec order.
    pub env: Vec<(String, String)>,
    /// The guest's working directory (a guest path).
    pub cwd: String,
    /// Directories the guest sees, the rootfs first.
    pub preopens: Vec<Preopen>,
    /// Resource limits from `linux.resources`.
    pub limits: Limits,
    /// `linux.cgroupsPath` as given (empty when the spec gives none).
    pub cgroups_path: String,
    /// Namespaces to join: only those the spec gives a `path` for.
    pub namespaces: Vec<NamespaceJoin>,
    /// The user the worker runs as.
    pub user: User,
    /// `process.noNewPrivileges` (the worker sets it regardless; recorded for logs).
    pub no_new_privileges: bool,
}

/// A host directory the guest sees at `guest` path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preopen {
    /// Host directory.
    pub host: PathBuf,
    /// Path inside the guest.
    pub guest: String,
    /// Writes through this preopen fail inside the guest.
    pub read_only: bool,
}

/// Resource limits, all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (cgroup, and the cap on linear memory).
    pub memory: Option<i64>,
    /// Memory plus swap limit in bytes.
    pub memory_swap: Option<i64>,
    /// CPU shares (cgroup v1 semantics; converted to weight on v2).
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per period.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds.
    pub cpu_period: Option<u64>,
    /// Maximum number of pids.
    pub pids: Option<i64>,
}

/// A namespace to join by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceJoin {
    /// The kind, as in the OCI spec (`network`, `ipc`, `uts`, `mount`, `pid`, `user`, `cgroup`).
    pub kind: String,
    /// The namespace file, e.g. `/proc/123/ns/net`.
    pub path: PathBuf,
}

/// The identity the worker takes before running guest code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// File mode creation mask, when the spec sets one.
    pub umask: Option<u32>,
}

/// Why a bundle cannot be planned. Every variant names what is wrong; the shim prefixes the
/// container id.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `process` is missing from the spec.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// `process.args` is empty.
    #[error("process.args is empty: the first argument must name a .wasm file (path#func)")]
    NoArgs,
    /// `path#` with an empty function name.
    #[error("entrypoint {0:?} has an empty function name after '#'")]
    EmptyFunc(String),
    /// The entrypoint file could not be found.
    #[error("entrypoint {name:?} not found in the container rootfs (looked in: {looked})")]
    EntrypointNotFound {
        /// The name as written in the spec.
        name: String,
        /// Where it was looked for, as guest paths.
        looked: String,
    },
    /// The entrypoint is not a Wasm binary.
    #[error("entrypoint {path:?} is not a WebAssembly module (it does not start with \\0asm)")]
    NotWasm {
        /// Guest path of the file.
        path: String,
    },
    /// The entrypoint could not be read.
    #[error("cannot read entrypoint {path:?}: {source}")]
    ReadEntrypoint {
        /// Guest path of the file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `process.terminal` is true.
    #[error("terminal: true is not supported by Kiln yet (run without -t / tty)")]
    Terminal,
    /// A mount that Kiln cannot give the guest.
    #[error("mount at {destination:?}: {reason}")]
    Mount {
        /// The mount's destination in the guest.
        destination: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path escaped its root or could not be resolved.
    #[error("cannot resolve {path:?} inside {root:?}: {reason}")]
    Resolve {
        /// The path asked for.
        path: String,
        /// The root it was resolved in.
        root: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Mount types that make sense only for a Linux process; a Wasm guest sees none of them.
const SKIPPED_MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm",
];

/// Builds the plan for container `id` from its spec and the host path of its mounted rootfs.
pub fn plan(id: &str, spec: &Spec, rootfs: &Path) -> Result<Plan, PlanError> {
    let process = spec.process().as_ref().ok_or(PlanError::NoProcess)?;
    if process.terminal().unwrap_or(false) {
        return Err(PlanError::Terminal);
    }
    let args = process.args().clone().unwrap_or_default();
    let first = args.first().ok_or(PlanError::NoArgs)?;
    let (name, entry_func) = split_entrypoint(first)?;

    let env: Vec<(String, String)> = process
        .env()
        .iter()
        .flatten()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let cwd = process.cwd().to_string_lossy().into_owned();
    let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };

    let (module_path, guest_path) = find_entrypoint(name, &env, &cwd, rootfs)?;
    check_magic(&module_path, &guest_path)?;

    let mut guest_args = args.clone();
    guest_args[0] = name.to_string();

    let read_only_root = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let mut preopens = vec![Preopen {
        host: rootfs.to_path_buf(),
        guest: "/".to_string(),
        read_only: read_only_root,
    }];
    for m in spec.mounts().iter().flatten() {
        if let Some(p) = mount_to_preopen(m)? {
            preopens.push(p);
        }
    }

    let linux = spec.linux().as_ref();
    let limits = linux
        .and_then(|l| l.resources().as_ref())
        .map(|r| Limits {
            memory: r.memory().as_ref().and_then(|m| m.limit()),
            memory_swap: r.memory().as_ref().and_then(|m| m.swap()),
            cpu_shares: r.cpu().as_ref().and_then(|c| c.shares()),
            cpu_quota: r.cpu().as_ref().and_then(|c| c.quota()),
            cpu_period: r.cpu().as_ref().and_then(|c| c.period()),
            pids: r.pids().as_ref().map(|p| p.limit()),
        })
        .unwrap_or_default();
    let cgroups_path = linux
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let namespaces = linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ns| {
            ns.path().as_ref().map(|path| NamespaceJoin {
                kind: namespace_kind(ns.typ()).to_string(),
                path: path.clone(),
            })
        })
        .collect();

    let u = process.user();
    let user = User {
        uid: u.uid(),
        gid: u.gid(),
        additional_gids: u.additional_gids().clone().unwrap_or_default(),
        umask: u.umask(),
    };

    Ok(Plan {
        id: id.to_string(),
        module_path,
        entry_func: entry_func.to_string(),
        args: guest_args,
        env,
        cwd,
        preopens,
        limits,
        cgroups_path,
        namespaces,
        user,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
    })
}

/// Splits `path#func` into the path and the export (default `_start`).
pub fn split_entrypoint(arg0: &str) -> Result<(&str, &str), PlanError> {
    match arg0.rsplit_once('#') {
        Some((_, "")) => Err(PlanError::EmptyFunc(arg0.to_string())),
        Some((path, func)) => Ok((path, func)),
        None => Ok((arg0, DEFAULT_ENTRY_FUNC)),
    }
}

/// Finds the entrypoint: an absolute path in the rootfs; a name with a slash relative to the
/// cwd; a bare name through the spec's `PATH`, then the cwd. Returns the host path and the
/// guest path it was found at.
fn find_entrypoint(
    name: &str,
    env: &[(String, String)],
    cwd: &str,
    rootfs: &Path,
) -> Result<(PathBuf, String), PlanError> {
    let candidates: Vec<String> = if name.starts_with('/') {
        vec![name.to_string()]
    } else if name.contains('/') {
        vec![join_guest(cwd, name)]
    } else {
        let path_var = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| join_guest(d, name))
            .chain(std::iter::once(join_guest(cwd, name)))
            .collect()
    };
    for guest in &candidates {
        match resolve_in_root(rootfs, guest) {
            Ok(host) if host.is_file() => return Ok((host, guest.clone())),
            Ok(_) => debug!("entrypoint candidate {guest} is not a file"),
            Err(e) => debug!("entrypoint candidate {guest}: {e}"),
        }
    }
    Err(PlanError::EntrypointNotFound {
        name: name.to_string(),
        looked: candidates.join(", "),
    })
}

fn join_guest(dir: &str, name: &str) -> String {
    let dir = if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("/{dir}")
    };
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

fn check_magic(host: &Path, guest: &str) -> Result<(), PlanError> {
    use std::io::Read;
    let read_err = |source| PlanError::ReadEntrypoint {
        path: guest.to_string(),
        source,
    };
    let mut f = std::fs::File::open(host).map_err(read_err)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = f.read(&mut magic[got..]).map_err(read_err)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < 4 || &magic != WASM_MAGIC {
        return Err(PlanError::NotWasm {
            path: guest.to_string(),
        });
    }
    Ok(())
}

/// Turns one OCI mount into a preopen, skips the Linux-only kinds, and rejects what cannot be
/// given to a guest.
fn mount_to_preopen(m: &oci_spec::runtime::Mount) -> Result<Option<Preopen>, PlanError> {
    let destination = m.destination().to_string_lossy().into_owned();
    let typ = m.typ().as_deref().unwrap_or("");
    let options: Vec<&str> = m.options().iter().flatten().map(String::as_str).collect();
    let is_bind = typ == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
    if !is_bind {
        if SKIPPED_MOUNT_TYPES.contains(&typ) {
            debug!("mount {destination} ({typ}) has no meaning for a Wasm guest; skipped");
            return Ok(None);
        }
        return Err(PlanError::Mount {
            destination,
            reason: format!(
                "mount type {typ:?} is not supported by Kiln (only bind mounts become guest \
                 directories)"
            ),
        });
    }
    let source = m.source().as_ref().ok_or_else(|| PlanError::Mount {
        destination: destination.clone(),
        reason: "bind mount without a source".to_string(),
    })?;
    let meta = std::fs::metadata(source).map_err(|e| PlanError::Mount {
        destination: destination.clone(),
        reason: format!("bind source {}: {e}", source.display()),
    })?;
    if !meta.is_dir() {
        // WASI preopens are directories; a single-file bind (CRI's /etc/hosts, say) cannot be
        // shown on its own. It is skipped rather than failing every Kubernetes pod.
        log::info!(
            "bind mount {} -> {destination} is a file; WASI preopens only directories, skipped",
            source.display()
        );
        return Ok(None);
    }
    if !destination.starts_with('/') {
        return Err(PlanError::Mount {
            destination,
            reason: "destination must be an absolute path".to_string(),
        });
    }
    Ok(Some(Preopen {
        host: source.clone(),
        guest: destination,
        read_only: options.contains(&"ro"),
    }))
}

fn namespace_kind(t: LinuxNamespaceType) -> &'static str {
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

#[cfg(test)]
mod tests;
