//! The node-wide compile cache: a module is compiled once per node, then mapped.
//!
//! Compiling even a small module with Cranelift costs tens of milliseconds, more than the whole
//! rest of a container start; loading a compiled artifact is a file mapping and a few
//! relocations. So every module is compiled at most once per engine configuration and the
//! artifact is kept on disk:
//!
//! * The key is the sha256 of the module bytes, in a directory named after the engine's
//!   compatibility hash, so a Kiln upgrade or a different CPU never sees a foreign artifact.
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
use std::time::Instant;

use log::{debug, info, warn};
use sha2::{Digest, Sha256};
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
    #[error("invalid WebAssembly module: {0:#}")]
    Compile(wasmtime::Error),
    /// The process that compiles the module failed for another reason than the module.
    #[error("compiler process: {0}")]
    Compiler(String),
    /// A freshly written artifact could not be loaded back.
    #[error("cannot load compiled module: {0:#}")]
    Load(wasmtime::Error),
}

/// How a module was obtained, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A valid artifact was mapped.
    Hit,
    /// No artifact: compiled and stored.
    Miss,
    /// An artifact was present but failed its checks: compiled and replaced.
    Replaced,
    /// Caching is off (no usable directory): compiled in memory.
    Uncached,
    /// No artifact: compiled by the fast baseline compiler for this start only, while the
    /// optimizing compile fills the cache in the background (decided by the caller).
    Baseline,
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

    /// The cache key of a module: the sha256 of its bytes, in hex.
    pub fn key(wasm: &[u8]) -> String {
        hex::encode(Sha256::digest(wasm))
    }

    /// The module's artifact if the cache holds a valid one; `None` (after logging why, for a
    /// bad entry) otherwise, or when caching is off.
    pub fn lookup(&self, engine: &Engine, wasm: &[u8]) -> Option<Module> {
        let dir = self.dir.as_ref()?;
        let key = Cache::key(wasm);
        let artifact = dir.join(format!("{key}.{ARTIFACT_EXT}"));
        let sum = dir.join(format!("{key}.{SUM_EXT}"));
        match verify(&artifact, &sum) {
            // SAFETY: as in `load_bytes_with`: written by this engine configuration's
            // `precompile_module` into a root-only directory, and its checksum matches.
            Ok(true) => match unsafe { Module::deserialize_file(engine, &artifact) } {
                Ok(m) => {
                    debug!("compile cache hit {key}");
                    Some(m)
                }
                Err(e) => {
                    warn!("compile cache entry {key} rejected by wasmtime: {e:#}");
                    None
                }
            },
            Ok(false) => None,
            Err(reason) => {
                warn!("compile cache entry {key} is corrupt ({reason})");
                None
            }
        }
    }

    /// Stores `artifact`, the output of `precompile_module` for `wasm` by this cache's engine
    /// configuration. Does nothing when caching is off.
    pub fn store_artifact(&self, wasm: &[u8], artifact: &[u8]) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let key = Cache::key(wasm);
        store(
            &dir.join(format!("{key}.{ARTIFACT_EXT}")),
            &dir.join(format!("{key}.{SUM_EXT}")),
            artifact,
        )
    }

    /// Takes the lock that says "this module is being compiled into the cache", if no one
    /// holds it: a burst of starts of a new module then compiles it once, not once per
    /// container. Released when the returned file is closed (or its process ends).
    pub fn try_lock_fill(&self, wasm: &[u8]) -> Option<File> {
        let dir = self.dir.as_ref()?;
        let lock = dir.join(format!("{}.fill", Cache::key(wasm)));
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

    /// Loads the module at `path`, from the cache when possible.
    pub fn load_file(&self, engine: &Engine, path: &Path) -> Result<(Module, Outcome), CacheError> {
        self.load_file_with(engine, path, |engine, wasm| {
            engine.precompile_module(wasm).map_err(CacheError::Compile)
        })
    }

    /// [`Cache::load_file`] with the compilation done by `compile` (see
    /// [`Cache::load_bytes_with`]).
    pub fn load_file_with(
        &self,
        engine: &Engine,
        path: &Path,
        compile: impl FnOnce(&Engine, &[u8]) -> Result<Vec<u8>, CacheError>,
    ) -> Result<(Module, Outcome), CacheError> {
        let bytes = fs::read(path).map_err(|source| CacheError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_bytes_with(engine, &bytes, compile)
    }

    /// Loads a module from its bytes, from the cache when possible.
    pub fn load_bytes(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> Result<(Module, Outcome), CacheError> {
        self.load_bytes_with(engine, wasm, |engine, wasm| {
            engine.precompile_module(wasm).map_err(CacheError::Compile)
        })
    }

    /// Like [`Cache::load_bytes`], with the compilation on a miss done by `compile`, which
    /// must return what [`Engine::precompile_module`] would. The worker uses it to compile in
    /// a short-lived child process, so that Cranelift's memory and threads leave with it.
    pub fn load_bytes_with(
        &self,
        engine: &Engine,
        wasm: &[u8],
        compile: impl FnOnce(&Engine, &[u8]) -> Result<Vec<u8>, CacheError>,
    ) -> Result<(Module, Outcome), CacheError> {
        let Some(dir) = &self.dir else {
            let compiled = compile(engine, wasm)?;
            // SAFETY: `compile` returns this engine's `precompile_module` output (its contract).
            let m = unsafe { Module::deserialize(engine, &compiled) }.map_err(CacheError::Load)?;
            return Ok((m, Outcome::Uncached));
        };
        let key = hex::encode(Sha256::digest(wasm));
        let artifact = dir.join(format!("{key}.{ARTIFACT_EXT}"));
        let sum = dir.join(format!("{key}.{SUM_EXT}"));

        let mut outcome = Outcome::Miss;
        match verify(&artifact, &sum) {
            Ok(true) => {
                // SAFETY: the artifact was written by `precompile_module` of an engine with the
                // same compatibility hash (the directory name), into a directory only root can
                // write, and its checksum matches what was recorded when it was written.
                match unsafe { Module::deserialize_file(engine, &artifact) } {
                    Ok(m) => {
                        debug!("compile cache hit {key}");
                        return Ok((m, Outcome::Hit));
                    }
                    Err(e) => {
                        warn!("compile cache entry {key} rejected by wasmtime, recompiling: {e:#}");
                        outcome = Outcome::Replaced;
                    }
                }
            }
            Ok(false) => {}
            Err(reason) => {
                warn!("compile cache entry {key} is corrupt ({reason}), recompiling");
                outcome = Outcome::Replaced;
            }
        }

        let started = Instant::now();
        let compiled = compile(engine, wasm)?;
        info!(
            "compiled module {key} ({} bytes) in {:?}",
            wasm.len(),
            started.elapsed()
        );
        if let Err(e) = store(&artifact, &sum, &compiled) {
            warn!("cannot store compiled module {key}: {e}; continuing uncached");
            // SAFETY: `compiled` was produced just now by this engine.
            let m = unsafe { Module::deserialize(engine, &compiled) }.map_err(CacheError::Load)?;
            return Ok((m, Outcome::Uncached));
        }
        // SAFETY: written just now from this engine's output and checksummed.
        let m = unsafe { Module::deserialize_file(engine, &artifact) }.map_err(CacheError::Load)?;
        Ok((m, outcome))
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
    format!(
        "xxh3-128:{:032x}:{}\n",
        xxhash_rust::xxh3::xxh3_128(data),
        data.len()
    )
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
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|e| format!("read: {e}"))?;
    if checksum(&data) != expected {
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
