//! Shared pieces of Kiln's fuzz targets: the file tree the path targets run against, and the
//! checks that tell a path stayed where it belongs.

pub mod fixture;

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

pub use fixture::Tree;

/// The tree of this process, made on first use below `$TMPDIR` (`scripts/fuzz.sh` points
/// `TMPDIR` at a directory it removes after each target).
pub fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        Tree::create(&std::env::temp_dir()).unwrap_or_else(|e| panic!("cannot make the tree: {e}"))
    })
}

/// Whether `p` has a `..` component.
pub fn has_parent_dir(p: &Path) -> bool {
    p.components().any(|c| matches!(c, Component::ParentDir))
}

/// Where `p` really is: its longest existing ancestor with every symlink resolved, then the
/// rest as written. A path that stays inside a directory on the host has this inside the
/// directory's canonical path, whatever symlinks it crosses.
pub fn real_location(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Whether `p`, where it really is, lies inside `dir` (itself resolved).
pub fn really_inside(p: &Path, dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    real_location(p).starts_with(dir)
}
