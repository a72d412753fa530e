//! Logging to containerd, one log pipe per container.
//!
//! containerd reads a shim's log from the FIFO `log` in each container's bundle and stops
//! reading when that container is deleted. A shim that serves several containers must therefore
//! write each record to the pipe of the container it concerns (records carry the container id as
//! the `id` key, as containerd's own logs do); a record about no container in particular goes to
//! every live pipe. Writing everything to the first container's pipe would lose every line once
//! that container is gone.
//!
//! Workers are forked from this process and inherit the router; [`redirect_to`] narrows a
//! worker's copy to its own container's pipe.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use containerd_shim::logger::FifoLogger;
use log::{LevelFilter, Log, Metadata, Record};

/// The environment variable that sets the log level (as for other containerd shims).
const LEVEL_ENV: &str = "RUST_LOG";

struct Router {
    pipes: Mutex<HashMap<String, FifoLogger>>,
}

static ROUTER: OnceLock<Router> = OnceLock::new();

fn router() -> &'static Router {
    ROUTER.get_or_init(|| Router {
        pipes: Mutex::new(HashMap::new()),
    })
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FifoLogger>> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Logger;

/// The most a dependency may log. containerd passes `-debug` to every shim when it runs at
/// debug level; Cranelift then logs every pass of every function it compiles (thousands of
/// lines for a small module, and tens of milliseconds spent formatting them), which buries
/// Kiln's own phase timings.
const DEPENDENCY_MAX: LevelFilter = LevelFilter::Info;

/// Kiln's own targets: its library crates, and this binary (whose crate is named after it).
fn is_kiln(target: &str) -> bool {
    target.starts_with("kiln")
        || target.starts_with(module_path!().split("::").next().unwrap_or("kiln"))
}

fn level_for(target: &str) -> LevelFilter {
    if is_kiln(target) {
        log::max_level()
    } else {
        log::max_level().min(DEPENDENCY_MAX)
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pipes = router().lock();
        let id = record
            .key_values()
            .get(log::kv::Key::from_str("id"))
            .map(|v| v.to_string());
        match id.as_deref().and_then(|id| pipes.get(id)) {
            Some(pipe) => pipe.log(record),
            None => pipes.values().for_each(|p| p.log(record)),
        }
    }

    fn flush(&self) {
        router().lock().values().for_each(|p| p.flush());
    }
}

/// Installs the logger, with the pipe in the current directory (the first container's bundle)
/// registered for container `id`.
pub fn init(debug: bool, id: &str) -> std::io::Result<()> {
    add(id, Path::new("."))?;
    let level = std::env::var(LEVEL_ENV)
        .ok()
        .and_then(|l| LevelFilter::from_str(&l).ok())
        .unwrap_or(LevelFilter::Info);
    let level = if debug {
        level.max(LevelFilter::Debug)
    } else {
        level
    };
    log::set_max_level(level);
    log::set_logger(&Logger).map_err(std::io::Error::other)
}

/// Installs the logger with no pipe yet (an exec'd zygote: its workers redirect to their
/// containers' pipes).
pub fn init_detached() {
    let level = std::env::var(LEVEL_ENV)
        .ok()
        .and_then(|l| LevelFilter::from_str(&l).ok())
        .unwrap_or(LevelFilter::Info);
    log::set_max_level(level);
    let _ = log::set_logger(&Logger);
}

/// Starts sending container `id`'s records to the `log` FIFO in its bundle.
pub fn add(id: &str, bundle: &Path) -> std::io::Result<()> {
    let pipe = open_pipe(&bundle.join("log"))?;
    router().lock().insert(id.to_string(), pipe);
    Ok(())
}

/// Stops writing to container `id`'s pipe (containerd stops reading it on delete).
pub fn remove(id: &str) {
    router().lock().remove(id);
}

/// In a worker: keep only this container's pipe.
pub fn redirect_to(id: &str, path: &Path) {
    let pipe = open_pipe(path).ok();
    let mut pipes = router().lock();
    pipes.clear();
    if let Some(p) = pipe {
        pipes.insert(id.to_string(), p);
    }
}

fn open_pipe(path: &Path) -> std::io::Result<FifoLogger> {
    // containerd holds the reading end open for the container's lifetime; it is opened
    // write-only as containerd expects, and non-blocking: a reader that falls behind loses
    // log lines (the write fails with EAGAIN) instead of stalling the shim's runtime or a
    // guest.
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    Ok(FifoLogger::with_file(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_are_capped_at_info_kiln_is_not() {
        log::set_max_level(LevelFilter::Debug);
        let debug = |target| {
            Logger.enabled(
                &Metadata::builder()
                    .level(log::Level::Debug)
                    .target(target)
                    .build(),
            )
        };
        let info = |target| {
            Logger.enabled(
                &Metadata::builder()
                    .level(log::Level::Info)
                    .target(target)
                    .build(),
            )
        };
        assert!(debug("kiln_worker::run"));
        // The shim's own modules log under the binary's crate name.
        assert!(debug("containerd_shim_kiln_v1::create"));
        assert!(!debug("cranelift_codegen::timing"));
        assert!(!debug("wasmtime::runtime"));
        assert!(info("wasmtime::runtime"));
        log::set_max_level(LevelFilter::Info);
        assert!(!debug("kiln_worker::run"));
    }
}
