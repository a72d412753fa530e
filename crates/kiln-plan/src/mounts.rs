//! The spec's mounts as the guest sees them: bind mounts become preopened directories, the
//! kinds that only make sense to a Linux process are skipped, anything else is refused.

use std::path::{Component, Path, PathBuf};

use log::debug;

use crate::{PlanError, Preopen, resolve_in_root};

/// Mount types that make sense only for a Linux process; a Wasm guest sees none of them. The
/// `tmpfs` at `/dev` is replaced by Kiln's own device directory (see `Sandbox::dev_nodes`).
const SKIPPED_MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm",
];

/// Options of a bind mount that Kiln understands: `ro`/`rw`, `noexec`/`exec`, and those
/// whose effect Kiln gives every preopen anyway (`nosuid`, `nodev`: a guest can neither run
/// set-id programs nor open device nodes outside its device directory) or that are about
/// propagation between mount namespaces, which the guest cannot observe (it cannot mount).
const KNOWN_BIND_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "ro",
    "rw",
    "noexec",
    "exec",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
];

/// Turns one OCI mount into a preopen, skips the Linux-only kinds, and rejects what cannot be
/// given to a guest.
pub(crate) fn to_preopen(m: &oci_spec::runtime::Mount) -> Result<Option<Preopen>, PlanError> {
    let destination = m.destination().to_string_lossy().into_owned();
    let typ = m.typ().as_deref().unwrap_or("");
    let options: Vec<&str> = m.options().iter().flatten().map(String::as_str).collect();
    let is_bind = typ == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
    let mount_err = |reason: String| PlanError::Mount {
        destination: destination.clone(),
        reason,
    };
    if !is_bind {
        if SKIPPED_MOUNT_TYPES.contains(&typ) {
            debug!("mount {destination} ({typ}) has no meaning for a Wasm guest; skipped");
            return Ok(None);
        }
        return Err(mount_err(format!(
            "mount type {typ:?} is not supported by Kiln (only bind mounts become guest \
             directories)"
        )));
    }
    if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
        return Err(mount_err(
            "id-mapped mounts are not supported by Kiln".to_string(),
        ));
    }
    if let Some(unknown) = options
        .iter()
        .find(|o| !KNOWN_BIND_OPTIONS.contains(o) && !o.starts_with("mode="))
    {
        return Err(mount_err(format!(
            "mount option {unknown:?} is not supported by Kiln"
        )));
    }
    let source = m
        .source()
        .as_ref()
        .ok_or_else(|| mount_err("bind mount without a source".to_string()))?;
    // The runtime spec reads a relative source from the bundle; the shim would read it from
    // its own working directory, which is another container's bundle once a shim serves
    // several. Refused rather than resolved against the wrong directory.
    if !source.is_absolute() {
        return Err(mount_err(format!(
            "bind source {:?} is relative; Kiln needs an absolute path",
            source.display().to_string()
        )));
    }
    let meta = std::fs::metadata(source)
        .map_err(|e| mount_err(format!("bind source {}: {e}", source.display())))?;
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
        return Err(mount_err(
            "destination must be an absolute path".to_string(),
        ));
    }
    // The last of each pair wins, as with mount(8).
    let last = |a: &str, b: &str| {
        options
            .iter()
            .rev()
            .find(|o| **o == a || **o == b)
            .is_some_and(|o| *o == a)
    };
    Ok(Some(Preopen {
        host: source.clone(),
        guest: destination,
        read_only: last("ro", "rw"),
        no_exec: last("noexec", "exec"),
    }))
}

/// Which preopen holds the working directory `cwd`, and the path inside it: the preopen whose
/// guest path is the longest prefix of `cwd`, as wasi-libc picks one for a path. Symlinks are
/// resolved inside that preopen. The directory need not exist yet (the worker creates it).
pub(crate) fn locate_cwd(preopens: &[Preopen], cwd: &str) -> Result<(usize, PathBuf), PlanError> {
    let cwd_path = Path::new(cwd);
    let (index, rest) = preopens
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            cwd_path
                .strip_prefix(&p.guest)
                .ok()
                .map(|rest| (i, p.guest.len(), rest.to_path_buf()))
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(i, _, rest)| (i, rest))
        .unwrap_or((0, cwd_path.to_path_buf()));
    let root = &preopens[index].host;
    let resolved = resolve_in_root(root, &rest.to_string_lossy())?;
    let inside = resolved
        .strip_prefix(root)
        .map_err(|_| PlanError::Resolve {
            path: cwd.to_string(),
            root: root.clone(),
            reason: "resolved outside its directory".to_string(),
        })?
        .to_path_buf();
    if inside
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(PlanError::Resolve {
            path: cwd.to_string(),
            root: root.clone(),
            reason: "resolved outside its directory".to_string(),
        });
    }
    Ok((index, inside))
}
