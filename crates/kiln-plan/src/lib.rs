//! The plan: what a Kiln worker runs, decided from an OCI bundle before any process exists.
//!
//! Deciding everything up front, in the shim, means every way a container can be wrong (no
//! entrypoint, not Wasm, an impossible mount, a field Kiln does not support) is found at
//! Create time and reported to containerd with the container's name, instead of surfacing as a
//! worker that dies with a half-written message. The worker then only executes a [`Plan`]; it
//! never reads `config.json` itself.
//!
//! Every field of the runtime spec has a decision ([`fields`]): applied, refused with an error
//! that names the field, or documented as meaningless for a Wasm guest. The plan carries what
//! is applied; nothing is dropped on the floor.
//!
//! The plan is a plain serialisable value so that it can cross the process boundary to the
//! worker as-is.

mod entrypoint;
pub mod fields;
mod mounts;
mod resolve;
mod sandbox;

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

pub use entrypoint::{ModuleKind, split_entrypoint};
pub use kiln_cgroups::Resources;
pub use resolve::resolve_in_root;
pub use sandbox::{
    CapabilitySets, DeviceNode, IdMap, Namespace, NamespaceAction, Rlimit, Sandbox, Seccomp,
};

/// The export called when the entrypoint names none: WASI's command entry.
pub const DEFAULT_ENTRY_FUNC: &str = "_start";

/// The first four bytes of every Wasm binary (modules and components alike).
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// What a container is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// It runs a Wasm guest.
    Guest,
    /// It is a Kubernetes pod's sandbox (the CRI's "pause" container): it runs no guest, holds
    /// the pod's cgroup and the namespaces its containers join, and waits for its signal.
    PodSandbox,
}

/// The annotation the CRI sets on each container it creates: `sandbox` or `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Whether `spec` is a pod sandbox's.
pub fn is_pod_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CRI_CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

/// Everything a worker needs to run one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The container id, used in every error message.
    pub id: String,
    /// What the container is for.
    pub role: Role,
    /// Where the module comes from.
    pub module: ModuleSource,
    /// Whether the file is a core module or a component.
    pub module_kind: ModuleKind,
    /// The export to call (`path#func` in `process.args[0]`; default `_start`).
    pub entry_func: String,
    /// The guest's argv: `process.args` with argv\[0\] stripped of any `#func` suffix.
    pub args: Vec<String>,
    /// The guest's environment as `(key, value)` pairs, in spec order.
    pub env: Vec<(String, String)>,
    /// The guest's working directory (a guest path).
    pub cwd: String,
    /// Where the working directory is: which preopen holds it and the path inside that
    /// preopen (empty for the preopen itself). The worker creates it when missing, as runc
    /// does.
    pub cwd_in: (usize, PathBuf),
    /// Directories the guest sees, the rootfs first.
    pub preopens: Vec<Preopen>,
    /// The container's cgroup settings from `linux.resources` (device rules included).
    pub resources: Resources,
    /// `linux.cgroupsPath` as given (empty when the spec gives none).
    pub cgroups_path: String,
    /// The namespaces to join or create, in the order the worker enters them.
    pub namespaces: Vec<Namespace>,
    /// The user the worker runs as.
    pub user: User,
    /// Everything else that confines the worker: capabilities, rlimits, seccomp, devices,
    /// id mappings, sysctls.
    pub sandbox: Sandbox,
}

/// Where a container's Wasm binary is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleSource {
    /// A file inside the container's rootfs (host path).
    File(PathBuf),
    /// A layer of the container's image, by digest: the shim hands its bytes over only when
    /// the compile cache does not have it (see [`ImageLayer`]).
    Layer {
        /// `sha256:<hex>`: the module's sha256, and its compile-cache key.
        digest: String,
        /// The layer's media type.
        media_type: String,
        /// Its size in bytes.
        size: u64,
    },
    /// None (a pod sandbox).
    None,
}

/// A Wasm layer of the container's image, as the shim found it in containerd's content store
/// (the image forms whose module is not a file of the rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The layer's media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its first eight bytes (magic and version), which tell a module from a component.
    pub head: Vec<u8>,
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
    /// Programs may not be executed from it (`noexec`; meaningful to a worker compromised
    /// beyond Wasm, not to a guest).
    pub no_exec: bool,
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
    /// The entrypoint is Wasm of a version Kiln does not know.
    #[error(
        "entrypoint {path:?} is a WebAssembly binary of unknown version {version:02x?} \
         (neither a core module nor a component)"
    )]
    UnknownWasmVersion {
        /// Guest path of the file.
        path: String,
        /// The four version bytes after the magic.
        version: [u8; 4],
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
    /// A spec field Kiln cannot honour; refused rather than ignored.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The field, as a JSON path in config.json (e.g. `linux.resources.blockIO`).
        field: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

impl PlanError {
    pub(crate) fn unsupported(field: &str, reason: impl Into<String>) -> PlanError {
        PlanError::Unsupported {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// What the node offers that some decisions depend on: which Linux security modules are
/// active. Detected once by the shim; tests set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Host {
    /// AppArmor is enabled (`/sys/module/apparmor/parameters/enabled` is `Y`).
    pub apparmor: bool,
    /// SELinux is enabled (selinuxfs is mounted).
    pub selinux: bool,
    /// The node's cgroup version (1 or 2).
    pub cgroup_version: u8,
}

impl Host {
    /// Reads the machine.
    pub fn detect() -> Host {
        let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .map(|s| s.trim() == "Y")
            .unwrap_or(false);
        let selinux = Path::new("/sys/fs/selinux/enforce").exists();
        let cgroup_version = kiln_cgroups::Layout::detect()
            .map(|l| l.version())
            .unwrap_or(1);
        Host {
            apparmor,
            selinux,
            cgroup_version,
        }
    }
}

/// Builds the plan for container `id` from its spec and the host path of its mounted rootfs.
pub fn plan(id: &str, spec: &Spec, rootfs: &Path, host: &Host) -> Result<Plan, PlanError> {
    plan_inner(id, spec, rootfs, host, None)
}

/// Builds the plan of a container whose module is `layer`, a layer of its image rather than a
/// file of its rootfs (the rootfs is still the guest's `/`).
pub fn plan_with_layer(
    id: &str,
    spec: &Spec,
    rootfs: &Path,
    host: &Host,
    layer: &ImageLayer,
) -> Result<Plan, PlanError> {
    plan_inner(id, spec, rootfs, host, Some(layer))
}

fn plan_inner(
    id: &str,
    spec: &Spec,
    rootfs: &Path,
    host: &Host,
    layer: Option<&ImageLayer>,
) -> Result<Plan, PlanError> {
    fields::check(spec, host)?;
    let process = spec.process().as_ref().ok_or(PlanError::NoProcess)?;
    if process.terminal().unwrap_or(false) {
        return Err(PlanError::Terminal);
    }
    if is_pod_sandbox(spec) {
        return pod_sandbox(id, spec, host);
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

    let (module, module_kind) = match layer {
        Some(l) => {
            let what = format!("layer {}", l.digest);
            let kind = entrypoint::kind_of(&l.head, &what)?;
            let source = ModuleSource::Layer {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
            };
            (source, kind)
        }
        None => {
            let (path, guest_path) = entrypoint::find(name, &env, &cwd, rootfs)?;
            utf8(&path, &guest_path, rootfs)?;
            let kind = entrypoint::kind(&path, &guest_path)?;
            (ModuleSource::File(path), kind)
        }
    };

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
        no_exec: false,
    }];
    let mut dev_is_bound = false;
    for m in spec.mounts().iter().flatten() {
        if let Some(p) = mounts::to_preopen(m)? {
            dev_is_bound |= p.guest == "/dev";
            preopens.push(p);
        }
    }
    let cwd_in = mounts::locate_cwd(&preopens, &cwd)?;
    utf8(&cwd_in.1, &cwd, &preopens[cwd_in.0].host)?;

    let resources = sandbox::resources(spec, host)?;
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (namespaces, skipped) = sandbox::namespaces(spec, module_kind, Role::Guest)?;
    let sandbox = sandbox::sandbox(spec, host, &resources, &namespaces, skipped, dev_is_bound)?;

    let u = process.user();
    let user = User {
        uid: u.uid(),
        gid: u.gid(),
        additional_gids: u.additional_gids().clone().unwrap_or_default(),
        umask: u.umask(),
    };

    Ok(Plan {
        id: id.to_string(),
        role: Role::Guest,
        module,
        module_kind,
        entry_func: entry_func.to_string(),
        args: guest_args,
        env,
        cwd,
        cwd_in,
        preopens,
        resources,
        cgroups_path,
        namespaces,
        user,
        sandbox,
    })
}

/// The plan of a pod sandbox: no module, no files; the namespaces, identity, cgroup and
/// sandbox settings of its spec. Its image (a pause binary) is not looked at.
fn pod_sandbox(id: &str, spec: &Spec, host: &Host) -> Result<Plan, PlanError> {
    let process = spec.process().as_ref().ok_or(PlanError::NoProcess)?;
    let resources = sandbox::resources(spec, host)?;
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (namespaces, skipped) = sandbox::namespaces(spec, ModuleKind::Core, Role::PodSandbox)?;
    // No guest files: no /dev of its own either.
    let mut sandbox = sandbox::sandbox(spec, host, &resources, &namespaces, skipped, true)?;
    sandbox.dev_nodes = None;
    let u = process.user();
    Ok(Plan {
        id: id.to_string(),
        role: Role::PodSandbox,
        module: ModuleSource::None,
        module_kind: ModuleKind::Core,
        entry_func: String::new(),
        args: process.args().clone().unwrap_or_default(),
        env: Vec::new(),
        cwd: "/".to_string(),
        cwd_in: (0, PathBuf::new()),
        preopens: Vec::new(),
        resources,
        cgroups_path,
        namespaces,
        user: User {
            uid: u.uid(),
            gid: u.gid(),
            additional_gids: u.additional_gids().clone().unwrap_or_default(),
            umask: u.umask(),
        },
        sandbox,
    })
}

/// Refuses a host path that is not UTF-8. The plan crosses to the worker as JSON, which has
/// no form for such a path; an image's symlink to a name that is not UTF-8 would otherwise
/// pass planning and fail later, at the zygote, with an error that names no path.
fn utf8(host: &Path, guest: &str, root: &Path) -> Result<(), PlanError> {
    if host.to_str().is_some() {
        return Ok(());
    }
    Err(PlanError::Resolve {
        path: guest.to_string(),
        root: root.to_path_buf(),
        reason: format!(
            "it resolves to {}, which is not valid UTF-8",
            host.to_string_lossy()
        ),
    })
}

#[cfg(test)]
mod tests;
