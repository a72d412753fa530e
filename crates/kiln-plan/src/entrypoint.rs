//! Finding the module a container runs, and telling a core module from a component by its
//! first eight bytes, so that a container of the wrong kind fails at Create with its name.

use std::io::Read;
use std::path::{Path, PathBuf};

use log::debug;
use serde::{Deserialize, Serialize};

use crate::{DEFAULT_ENTRY_FUNC, PlanError, WASM_MAGIC, resolve_in_root};

/// What kind of Wasm binary the entrypoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleKind {
    /// A core module (version 1), run with WASI preview 1.
    Core,
    /// A component (the component model's layer 1), run with WASI preview 2.
    Component,
}

impl ModuleKind {
    /// From the four bytes after the magic, as the binary formats define them: a core module
    /// has version 1, a component has version 0x0d and layer 1.
    pub fn from_version(version: [u8; 4]) -> Option<ModuleKind> {
        match version {
            [1, 0, 0, 0] => Some(ModuleKind::Core),
            [0x0d, 0, 1, 0] => Some(ModuleKind::Component),
            _ => None,
        }
    }
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
pub(crate) fn find(
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

/// Reads the first eight bytes of the file: the magic and the version.
pub(crate) fn kind(host: &Path, guest: &str) -> Result<ModuleKind, PlanError> {
    let read_err = |source| PlanError::ReadEntrypoint {
        path: guest.to_string(),
        source,
    };
    let mut f = std::fs::File::open(host).map_err(read_err)?;
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        let n = f.read(&mut head[got..]).map_err(read_err)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    kind_of(&head[..got], guest)
}

/// The kind of the binary whose first bytes are `head` (`what` names it in errors).
pub(crate) fn kind_of(head: &[u8], what: &str) -> Result<ModuleKind, PlanError> {
    if head.len() < 4 || &head[..4] != WASM_MAGIC {
        return Err(PlanError::NotWasm {
            path: what.to_string(),
        });
    }
    let mut version = [0u8; 4];
    for (i, b) in head[4..].iter().take(4).enumerate() {
        version[i] = *b;
    }
    ModuleKind::from_version(version).ok_or(PlanError::UnknownWasmVersion {
        path: what.to_string(),
        version,
    })
}
