//! Resolving a guest path to a host path without leaving the container's rootfs.
//!
//! Images carry symlinks (`/app.wasm -> /opt/app/app.wasm`); followed on the host, an absolute
//! target would point outside the rootfs. Resolution here walks the path one component at a
//! time and re-roots every symlink target at the rootfs, as runc's securejoin does. It is a few
//! lines, so it is written here rather than pulling in a crate for it; cap-std (already in the
//! tree through wasmtime-wasi) refuses absolute symlinks instead of re-rooting them.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::PlanError;

/// How many symlinks one resolution may follow, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

/// Resolves `guest` (absolute or relative to `/`) inside `root`, following symlinks as if
/// `root` were `/`. Missing components are kept as written, so the result may not exist.
pub fn resolve_in_root(root: &Path, guest: &str) -> Result<PathBuf, PlanError> {
    let err = |reason: String| PlanError::Resolve {
        path: guest.to_string(),
        root: root.to_path_buf(),
        reason,
    };
    let mut pending: VecDeque<OsString> = components(Path::new(guest));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut followed = 0;
    while let Some(part) = pending.pop_front() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(err("too many levels of symbolic links".to_string()));
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| err(format!("readlink {}: {e}", candidate.display())))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in components(&target).into_iter().rev() {
                    pending.push_front(c);
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}
