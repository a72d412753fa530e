//! Small file helpers for cgroupfs: every error names the path and the
//! operation, writes are a single `write(2)` as cgroupfs requires, and
//! control files are never created (a missing one is reported as such
//! instead of as a confusing "permission denied" from kernfs).

use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::Path;
use std::thread;
use std::time::Duration;

use log::debug;

use crate::{Error, Result};

/// How many times `rmdir` is retried on EBUSY, and how long to wait between
/// attempts. The kernel can report a cgroup busy for a moment after its last
/// process exited.
const RMDIR_RETRIES: u32 = 10;
const RMDIR_BACKOFF: Duration = Duration::from_millis(5);

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a file; `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path, e)),
    }
}

/// Writes `value` to an existing control file.
pub(crate) fn write_file(path: &Path, value: &str) -> Result<()> {
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    };
    // O_TRUNC like runc: harmless on cgroupfs, and keeps the plain files
    // used by the tests exact.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(werr)?;
    file.write_all(value.as_bytes()).map_err(werr)?;
    debug!("wrote {value:?} to {}", path.display());
    Ok(())
}

/// Creates a directory and its missing parents; an existing one is fine.
pub(crate) fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {
            debug!("created cgroup {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            debug!("cgroup {} already exists; reusing it", path.display());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir_all(path).map_err(|e| io_err("create directory", path, e))?;
            debug!("created cgroup {} (and missing parents)", path.display());
            Ok(())
        }
        Err(e) => Err(io_err("create directory", path, e)),
    }
}

/// Removes a cgroup directory, retrying EBUSY; a missing one is fine.
pub(crate) fn remove_dir(path: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => {
                debug!("removed cgroup {}", path.display());
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == ErrorKind::ResourceBusy && attempt < RMDIR_RETRIES => {
                attempt += 1;
                thread::sleep(RMDIR_BACKOFF);
            }
            Err(e) => return Err(io_err("remove directory", path, e)),
        }
    }
}

fn parse_err(path: &Path, reason: String) -> Error {
    Error::Parse {
        what: path.display().to_string(),
        reason,
    }
}

/// Parses a single-number control file's content; `max` (and a negative
/// number, which v1 never prints but is accepted) mean "no limit" and give 0.
pub(crate) fn parse_limit(path: &Path, text: &str) -> Result<u64> {
    let text = text.trim();
    if text == "max" || text.starts_with('-') {
        return Ok(0);
    }
    parse_u64(path, text)
}

pub(crate) fn parse_u64(path: &Path, text: &str) -> Result<u64> {
    let text = text.trim();
    text.parse()
        .map_err(|_| parse_err(path, format!("{text:?} is not a number")))
}

/// Reads a single-number control file; 0 when the file does not exist.
pub(crate) fn read_u64(path: &Path) -> Result<u64> {
    match read_optional(path)? {
        Some(text) => parse_u64(path, &text),
        None => Ok(0),
    }
}

/// Reads a limit control file (see [`parse_limit`]); 0 when missing.
pub(crate) fn read_limit(path: &Path) -> Result<u64> {
    match read_optional(path)? {
        Some(text) => parse_limit(path, &text),
        None => Ok(0),
    }
}

/// Looks `key` up in a flat-keyed file (`key value` per line).
pub(crate) fn keyed(path: &Path, text: &str, key: &str) -> Result<Option<u64>> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some(key) {
            let value = fields
                .next()
                .ok_or_else(|| parse_err(path, format!("no value for {key}")))?;
            return parse_u64(path, value).map(Some);
        }
    }
    Ok(None)
}

/// Parses `cgroup.procs`: one pid per line.
pub(crate) fn parse_pids(path: &Path, text: &str) -> Result<Vec<i32>> {
    text.split_whitespace()
        .map(|p| {
            p.parse()
                .map_err(|_| parse_err(path, format!("{p:?} is not a pid")))
        })
        .collect()
}
