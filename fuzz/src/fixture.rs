//! The file tree the `plan` and `resolve` targets run against, and the names the seed
//! generator and the dictionaries draw from.
//!
//! The tree holds what an untrusted image can put in a rootfs to fool path resolution:
//! absolute and relative symlinks (some pointing above the root, some at host paths outside
//! it), loops, a chain longer than the kernel's limit, a name with a non-UTF-8 byte, and
//! files that are not Wasm. Beside the rootfs, outside it, are the directories bind mounts
//! take as sources, and a Wasm file that must never be chosen as an entrypoint.
//!
//! This file is shared by the fuzz targets (through the `kiln_fuzz` library) and the seed
//! generator (with `#[path]`), so that seeds and dictionaries name what the tree has.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A core module's preamble.
pub const WASM: &[u8] = b"\0asm\x01\0\0\0";
/// A component's preamble.
pub const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

/// Mount sources in fuzz inputs start with this; the targets replace it with the directory
/// beside the rootfs (the real path is random).
pub const OUTSIDE_PREFIX: &str = "/kiln-fuzz-outside";

/// How many links the long chain has: more than Linux's (and `resolve_in_root`'s) 40.
pub const CHAIN: usize = 42;

/// Guest paths worth trying, as an image or a spec would write them.
pub const GUEST_PATHS: &[&str] = &[
    "/hello.wasm",
    "hello.wasm",
    "/comp.wasm",
    "/usr/bin/tool.wasm",
    "tool.wasm",
    "/app/local.wasm",
    "local.wasm",
    "./local.wasm",
    "app/local.wasm",
    "/bin/tool.wasm",
    "/abs-link",
    "/rel-link",
    "/up-link",
    "/escape-abs",
    "/escape-rel",
    "/dir-link/local.wasm",
    "/dotdot-dir/hello.wasm",
    "/loop-a",
    "/self-loop",
    "/chain0",
    "/chain2",
    "/dangling",
    "/nonutf",
    "/nonutf-dir/m.wasm",
    "/hash#x.wasm",
    "/hash#x.wasm#run",
    "/sp ace.wasm",
    "/text.txt",
    "/short.wasm",
    "/badver.wasm",
    "/empty.wasm",
    "/app",
    "/app/sub",
    "/app/sub/../../hello.wasm",
    "/../../../hello.wasm",
    "/tmp",
    "/etc",
    "/missing/dir",
    "/hello.wasm/x",
    "/kiln-fuzz-outside/secret.wasm",
    "/",
    "",
    ".",
    "..",
];

/// Components of the tree, for paths put together piece by piece.
pub const NAMES: &[&str] = &[
    "hello.wasm",
    "comp.wasm",
    "usr",
    "bin",
    "tool.wasm",
    "app",
    "local.wasm",
    "sub",
    "abs-link",
    "rel-link",
    "up-link",
    "escape-abs",
    "escape-rel",
    "dir-link",
    "dotdot-dir",
    "loop-a",
    "loop-b",
    "self-loop",
    "chain0",
    "chain41",
    "dangling",
    "nonutf",
    "nonutf-dir",
    "m.wasm",
    "hash#x.wasm",
    "text.txt",
    "short.wasm",
    "badver.wasm",
    "empty.wasm",
    "tmp",
    "etc",
    "kiln-fuzz-outside",
    "secret.wasm",
];

/// Bind mount sources below [`OUTSIDE_PREFIX`]: two directories, a file, a symlink to a
/// directory, and nothing.
pub const SOURCES: &[&str] = &["bind1", "bind2", "bindfile", "bindlink", "missing"];

/// The tree, made once per process.
#[derive(Debug)]
pub struct Tree {
    /// The container's rootfs.
    pub root: PathBuf,
    /// The directory beside it, holding the bind sources and the Wasm file no entrypoint may
    /// reach.
    pub outside: PathBuf,
}

impl Tree {
    /// Makes the tree in a fresh directory below `base` (which must exist).
    pub fn create(base: &Path) -> std::io::Result<Tree> {
        let top = base.join(format!("kiln-fuzz-{}", std::process::id()));
        if top.exists() {
            std::fs::remove_dir_all(&top)?;
        }
        let root = top.join("rootfs");
        let outside = top.join("outside");
        let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data);
        let d = |p: &str| std::fs::create_dir_all(root.join(p));
        let l = |target: &str, p: &str| symlink(target, root.join(p));

        d("usr/bin")?;
        d("app/sub")?;
        d("tmp")?;
        d("etc")?;
        w("hello.wasm", WASM)?;
        w("comp.wasm", COMPONENT)?;
        w("usr/bin/tool.wasm", WASM)?;
        w("app/local.wasm", WASM)?;
        w("hash#x.wasm", WASM)?;
        w("sp ace.wasm", WASM)?;
        w("text.txt", b"#!/bin/sh\necho not wasm\n")?;
        w("short.wasm", b"\0as")?;
        w("badver.wasm", b"\0asm\x02\0\0\0")?;
        w("empty.wasm", b"")?;
        l("/usr/bin/tool.wasm", "abs-link")?;
        l("app/local.wasm", "rel-link")?;
        l("../../../../../hello.wasm", "up-link")?;
        l("bin", "usr/sbin")?;
        l("usr/bin", "bin")?;
        l("/app", "dir-link")?;
        l("..", "dotdot-dir")?;
        l("loop-b", "loop-a")?;
        l("loop-a", "loop-b")?;
        l("self-loop", "self-loop")?;
        l("/nonexistent/x.wasm", "dangling")?;
        for i in 0..CHAIN {
            let target = if i + 1 == CHAIN {
                "hello.wasm".to_string()
            } else {
                format!("chain{}", i + 1)
            };
            l(&target, &format!("chain{i}"))?;
        }
        let odd = OsStr::from_bytes(b"d\xff");
        std::fs::create_dir(root.join(odd))?;
        std::fs::write(root.join(odd).join("m.wasm"), WASM)?;
        symlink(Path::new("/").join(odd).join("m.wasm"), root.join("nonutf"))?;
        symlink(odd, root.join("nonutf-dir"))?;

        std::fs::create_dir_all(outside.join("bind1/sub"))?;
        std::fs::create_dir_all(outside.join("bind2"))?;
        std::fs::write(outside.join("bind1/data.wasm"), WASM)?;
        std::fs::write(outside.join("bindfile"), b"a file")?;
        std::fs::write(outside.join("secret.wasm"), WASM)?;
        symlink(outside.join("bind1"), outside.join("bindlink"))?;
        // Links in the rootfs that name the host directory beside it, absolutely and by `..`:
        // resolved inside the root they must not reach it.
        symlink(outside.join("secret.wasm"), root.join("escape-abs"))?;
        symlink("../outside/secret.wasm", root.join("escape-rel"))?;
        Ok(Tree { root, outside })
    }

    /// `s` with [`OUTSIDE_PREFIX`] replaced by the directory beside the rootfs.
    pub fn outside_path(&self, s: &str) -> Option<PathBuf> {
        let rest = s.strip_prefix(OUTSIDE_PREFIX)?;
        Some(PathBuf::from(format!("{}{rest}", self.outside.display())))
    }
}
