//! The node-wide compile cache: a module is compiled once per node, then mapped.
//!
//! Compiling even a small module with Cranelift costs tens of milliseconds, more than the whole
//! rest of a container start; loading a compiled artifact is a file mapping and a few
//! relocations. So every module is compiled at most once per engine configuration and the
//! artifact is kept on disk:
//!
//! * The key is the sha256 of the module bytes (for a module shipped as an OCI layer, the
//!   layer's digest, which is that same hash), in a directory named after the engine's
//!   compatibility hash, so a Kiln upgrade or a different CPU never sees a foreign artifact.
//!   Core modules and components have separate entries.
//! * Entries are written to a temporary file and renamed into place, so a reader sees a whole
//!   entry or none; two workers compiling the same module at once both write identical bytes.
//! * Each artifact has a sidecar checksum (xxh3-128 of the artifact and its length). Wasmtime
//!   checks an artifact's header and engine, not the machine code inside it; the checksum is
//!   what turns a flipped bit or a truncated file into a logged recompile instead of undefined
//!   behaviour. xxh3 hashes at memory speed; sha256 without SHA-NI (as on our nodes) would cost
//!   milliseconds for a large module on every start.
//! * The cache directory must be a directory that only root can write: artifacts are machine
//!   code that is mapped executable. A directory that others could write to is refused (and
//!   modules are then compiled without caching) rather than trusted.

use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use log::{debug, warn};

mod index;
pub use index::{FileId, Index};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Suffix of compiled artifacts.
const ARTIFACT_EXT: &str = "cwasm";
/// Suffix of the checksum sidecar.
const SUM_EXT: &str = "sum";

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The module file could not be read.
    #[error("cannot read module {path}: {source}")]
    Read {
        /// The module's path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Wasmtime rejected the module (corrupt, truncated, unsupported feature...).
    #[error("invalid WebAssembly binary: {0:#}")]
    Compile(wasmtime::Error),
    /// The process that compiles the module failed for another reason than the module.
    #[error("compiler process: {0}")]
    Compiler(String),
    /// A freshly compiled artifact could not be loaded.
    #[error("cannot load compiled module: {0:#}")]
    Load(wasmtime::Error),
    /// The bytes handed over for a module are not the ones its digest names.
    #[error("the module's bytes do not match its digest {0}")]
    Digest(String),
}

/// How a module was obtained, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A valid artifact was mapped.
    Hit,
    /// No artifact: compiled and stored.
    Miss,
    /// Caching is off (no usable directory): compiled in memory.
    Uncached,
    /// No artifact: compiled by the fast baseline compiler for this start only, while the
    /// optimizing compile fills the cache in the background (decided by the caller).
    Baseline,
}

/// What a Wasm binary is, for its artifact: core modules and components are compiled and
/// loaded differently, so they never share an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A core module.
    Module,
    /// A component.
    Component,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Module => "",
            Kind::Component => ".component",
        }
    }
}

/// A cache key: the sha256 of the Wasm binary, in hex. For a module that comes as an OCI
/// layer it is the layer's digest, so nothing is hashed at start; the same binary as a file in
/// a rootfs has the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// The key of `wasm`, by hashing it.
    pub fn of(wasm: &[u8]) -> Key {
        Key(hex::encode(Sha256::digest(wasm)))
    }

    /// The key named by an OCI digest (`sha256:<64 hex digits>`).
    pub fn from_digest(digest: &str) -> Option<Key> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Key(hex.to_string()))
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `wasm` is the binary this key names.
    pub fn matches(&self, wasm: &[u8]) -> bool {
        Key::of(wasm) == *self
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cache directory bound to one engine configuration.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: Option<PathBuf>,
}

impl Cache {
    /// Opens (creating it if needed, mode 0700) the cache under `root` for `engine`.
    ///
    /// Never fails: a directory that cannot be created, or that someone other than root (the
    /// current user) could write to, is logged and caching is turned off.
    pub fn open(root: &Path, engine: &Engine) -> Cache {
        let dir = root.join(engine_dir_name(engine));
        // The parents (`/var/lib/kiln` on a fresh node) are ordinary directories; only the
        // cache root itself and the engine directory get the root-only checks.
        let parents = root.parent().map_or(Ok(()), fs::create_dir_all);
        match parents
            .and_then(|()| prepare_dir(root))
            .and_then(|()| prepare_dir(&dir))
        {
            Ok(()) => Cache { dir: Some(dir) },
            Err(e) => {
                warn!(
                    "compile cache {} unusable, compiling without it: {e}",
                    dir.display()
                );
                Cache { dir: None }
            }
        }
    }

    /// A cache that never stores anything.
    pub fn disabled() -> Cache {
        Cache { dir: None }
    }

    /// The directory artifacts for this engine live in, if caching is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn paths(&self, key: &Key, kind: Kind) -> Option<(PathBuf, PathBuf)> {
        let dir = self.dir.as_ref()?;
        let name = format!("{key}{}", kind.suffix());
        Some((
            dir.join(format!("{name}.{ARTIFACT_EXT}")),
            dir.join(format!("{name}.{SUM_EXT}")),
        ))
    }

    /// The artifact for `key` if the cache holds one whose checksum matches (a bad entry is
    /// logged and treated as absent, to be replaced).
    pub fn artifact(&self, key: &Key, kind: Kind) -> Option<PathBuf> {
        let (artifact, sum) = self.paths(key, kind)?;
        match verify(&artifact, &sum) {
            Ok(true) => Some(artifact),
            Ok(false) => None,
            Err(reason) => {
                warn!("compile cache entry {key} is corrupt ({reason})");
                None
            }
        }
    }

    /// The cached module for `key`, mapped.
    pub fn load_module(&self, engine: &Engine, key: &Key) -> Option<Module> {
        let artifact = self.artifact(key, Kind::Module)?;
        // SAFETY: written by `precompile_module` of an engine with this one's compatibility
        // hash (the directory's name) into a directory only root can write, and its checksum
        // matches what was recorded when it was written.
        match unsafe { Module::deserialize_file(engine, &artifact) } {
            Ok(m) => {
                debug!("compile cache hit {key}");
                Some(m)
            }
            Err(e) => {
                warn!("compile cache entry {key} rejected by wasmtime: {e:#}");
                None
            }
        }
    }

    /// The cached component for `key`, mapped.
    pub fn load_component(&self, engine: &Engine, key: &Key) -> Option<Component> {
        let artifact = self.artifact(key, Kind::Component)?;
        // SAFETY: as for `load_module`, with `precompile_component`.
        match unsafe { Component::deserialize_file(engine, &artifact) } {
            Ok(c) => {
                debug!("compile cache hit {key} (component)");
                Some(c)
            }
            Err(e) => {
                warn!("compile cache entry {key} (component) rejected by wasmtime: {e:#}");
                None
            }
        }
    }

    /// Stores `artifact`, the output of this cache's engine configuration's
    /// `precompile_module` (or `precompile_component`) for the binary `key` names. Does
    /// nothing when caching is off.
    pub fn store(&self, key: &Key, kind: Kind, artifact: &[u8]) -> std::io::Result<()> {
        let Some((path, sum)) = self.paths(key, kind) else {
            return Ok(());
        };
        store(&path, &sum, artifact)
    }

    /// Takes the lock that says "this binary is being compiled into the cache", if no one
    /// holds it: a burst of starts of a new module then compiles it once, not once per
    /// container. Released when the returned file is closed (or its process ends).
    pub fn try_lock_fill(&self, key: &Key) -> Option<File> {
        let dir = self.dir.as_ref()?;
        let lock = dir.join(format!("{key}.fill"));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(lock)
            .ok()?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (rc == 0).then_some(f)
    }
}

/// The directory name for an engine: a hash of everything that makes artifacts compatible.
pub fn engine_dir_name(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("engine-{:016x}", h.finish())
}

fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "owned by uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        // Ours, but too open: tighten it rather than refuse.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn checksum(data: &[u8]) -> String {
    format_checksum(xxhash_rust::xxh3::xxh3_128(data), data.len())
}

fn format_checksum(hash: u128, len: usize) -> String {
    format!("xxh3-128:{hash:032x}:{len}\n")
}

/// `Ok(true)`: artifact present and intact; `Ok(false)`: absent; `Err`: present but bad.
fn verify(artifact: &Path, sum: &Path) -> Result<bool, String> {
    let mut f = match File::open(artifact) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("open: {e}")),
    };
    let expected = match fs::read_to_string(sum) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("checksum missing".to_string());
        }
        Err(e) => return Err(format!("read checksum: {e}")),
    };
    // Streamed through a small buffer: an artifact is megabytes, and a buffer that size would
    // cost a page fault per page on every start.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0usize;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        };
        h.update(&buf[..n]);
        len += n;
    }
    if format_checksum(h.digest128(), len) != expected {
        return Err("checksum mismatch".to_string());
    }
    Ok(true)
}

/// Writes artifact then checksum, each atomically (temp file, fsync-free rename: a crash can
/// only lose an entry, never expose half of one, since `verify` needs both to agree).
fn store(artifact: &Path, sum: &Path, compiled: &[u8]) -> std::io::Result<()> {
    // The checksum first: a reader that comes between the two renames then finds no artifact
    // (a plain miss) rather than an artifact without its checksum (which it must treat as
    // corrupt and replace).
    write_atomic(sum, checksum(compiled).as_bytes())?;
    write_atomic(artifact, compiled)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry")
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    drop(f);
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests;
