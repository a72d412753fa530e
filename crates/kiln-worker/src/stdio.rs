//! Binding a worker's stdio to what containerd asked for.
//!
//! The worker writes straight into containerd's FIFOs: no copy loop in the shim, no extra
//! thread, and output is never held in a buffer that a crash could lose. `file://` URIs (as
//! `ctr run --log-uri file://...` sends) are appended to; other URI schemes (`binary://`
//! logging drivers) need a helper process and are refused with a clear error.
//!
//! The worker's stdout/stderr are containerd's FIFOs themselves, so a reader that disappears
//! would turn every later write into EPIPE; see `open_output` for how that is avoided.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use crate::protocol::Stdio;

/// Opens the three streams and installs them as fds 0, 1 and 2.
pub(crate) fn install(stdio: &Stdio) -> Result<(), String> {
    let stdin = open_input(&stdio.stdin)?;
    let stdout = open_output(&stdio.stdout, "stdout")?;
    let stderr = open_output(&stdio.stderr, "stderr")?;
    for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
        // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(format!(
                "dup2 onto fd {target}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn open_input(path: &str) -> Result<OwnedFd, String> {
    if path.is_empty() {
        return dev_null(false);
    }
    // A FIFO opened for reading without O_NONBLOCK waits for a writer; containerd may not
    // have one yet. Open non-blocking, then make reads blocking again.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("open stdin {path}: {e}"))?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(f.into())
}

fn open_output(path: &str, what: &str) -> Result<OwnedFd, String> {
    if path.is_empty() {
        return dev_null(true);
    }
    if let Some(file) = path.strip_prefix("file://") {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(file)
            .map_err(|e| format!("open {what} log file {file}: {e}"))?;
        return Ok(f.into());
    }
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(format!(
            "{what} URI scheme {scheme}:// is not supported by Kiln (use a FIFO or file://)"
        ));
    }
    // A FIFO is opened read-write, as runc's shim does: the worker then holds a reading end
    // itself, so when the client that read the FIFO goes away (`ctr run -d` exits at once)
    // the guest's writes fill the pipe and block instead of failing with EPIPE, which would
    // make Rust's println! panic and the container die with 134.
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    let f = OpenOptions::new()
        .write(true)
        .read(is_fifo)
        .open(path)
        .map_err(|e| format!("open {what} {path}: {e}"))?;
    Ok(f.into())
}

fn dev_null(write: bool) -> Result<OwnedFd, String> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .map(Into::into)
        .map_err(|e| format!("open /dev/null: {e}"))
}
