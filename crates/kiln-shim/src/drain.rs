//! A container's exit is reported only once its reader has read what the worker wrote.
//!
//! A worker writes straight into containerd's stdout/stderr FIFOs, so when it exits its last
//! lines can still be in the pipe. A client that learns of the exit may stop reading at once,
//! and `ctr run --rm` does: when Wait returns it calls Delete, whose first step cancels every
//! FIFO that its own goroutines have not finished opening. The kernel's open may have
//! returned milliseconds before, with the guest's output written and waiting in the pipe; if
//! the goroutine that made it has simply not run again yet, ctr closes that reader unread and
//! prints nothing. A Kiln container can live 2 ms from its worker's open of the FIFO to its
//! exit, and about 3 `ctr run --rm` in 1,000 lost their output that way (`scripts/churn.sh`);
//! runc's containers live long enough that the same race is not seen.
//!
//! So the exit is held until each output pipe is empty (everything written was read) or has
//! no reader left, for at most `KILN_OUTPUT_DRAIN_SECS` (default 2, as long as containerd's
//! runc shim waits for its own output copies at Delete; 0 turns the wait off): a reader that
//! holds a FIFO open but never reads must not keep a container from ever being reported as
//! stopped, nor a Kill from taking effect.
//!
//! The check opens the FIFO write-only and non-blocking, after the worker is gone: the open
//! fails with ENXIO when there is no reader at all; `FIONREAD` on it counts the unread bytes,
//! and `poll` reports `POLLERR` once the last reader has closed. Holding that writer for the
//! wait is harmless: a reader sees end-of-file when it is closed, moments later.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::Duration;

use tokio::time::Instant;

/// The default of `KILN_OUTPUT_DRAIN_SECS`.
const DEFAULT_LIMIT: Duration = Duration::from_secs(2);

/// How long an exit may wait for its output to be read (`KILN_OUTPUT_DRAIN_SECS`; 0 turns the
/// wait off).
pub fn limit() -> Duration {
    std::env::var("KILN_OUTPUT_DRAIN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIMIT)
}

/// The first and the longest pause between two looks at a pipe that still holds output.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// What became of one stream's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Not a FIFO (empty, `file://`, gone): nothing to wait for.
    NotAFifo,
    /// Nobody reads the FIFO (`ctr run -d` after ctr left, or the reader already got
    /// end-of-file and closed it).
    NoReader,
    /// Everything written has been read.
    Read,
    /// The last reader closed the FIFO with output unread.
    ReaderLeft {
        /// Bytes left in the pipe.
        unread: usize,
    },
    /// The reader did not read everything within the limit.
    TimedOut {
        /// Bytes left in the pipe.
        unread: usize,
    },
}

/// Waits until the output the worker left in the FIFO at `path` has been read, its reader is
/// gone, or `deadline` has passed.
pub async fn drain(path: &str, deadline: Instant) -> Drained {
    let Some(pipe) = open_writer(path) else {
        return Drained::NotAFifo;
    };
    let Ok(pipe) = pipe else {
        return Drained::NoReader;
    };
    let mut pause = FIRST_PAUSE;
    loop {
        let unread = match unread(&pipe) {
            Ok(0) => return Drained::Read,
            Ok(n) => n,
            Err(e) => {
                log::debug!("FIONREAD on {path}: {e}");
                return Drained::NotAFifo;
            }
        };
        if !has_reader(&pipe) {
            return Drained::ReaderLeft { unread };
        }
        let now = Instant::now();
        if now >= deadline {
            return Drained::TimedOut { unread };
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// The FIFO at `path` opened write-only: `None` if it is not a FIFO, `Some(Err)` if it has no
/// reader.
fn open_writer(path: &str) -> Option<std::io::Result<File>> {
    if path.is_empty() || path.contains("://") {
        return None;
    }
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if !is_fifo {
        return None;
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => Some(Ok(f)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Some(Err(e)),
        Err(e) => {
            log::debug!("open {path} to see whether its output was read: {e}");
            None
        }
    }
}

/// Bytes in the pipe that no reader has taken yet.
fn unread(pipe: &File) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, on a descriptor we own.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether anyone still has the pipe open for reading (a writer's `poll` says `POLLERR` once
/// nobody has).
fn has_reader(pipe: &File) -> bool {
    let mut p = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    !(n > 0 && p.revents & libc::POLLERR != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(dir: &tempfile::TempDir) -> String {
        let path = dir.path().join("stdout");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        path.to_string_lossy().into_owned()
    }

    fn reader(path: &str) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .expect("open the reader")
    }

    /// What an exited worker leaves: `text` in the pipe, and no writer.
    fn worker_wrote(path: &str, text: &[u8]) {
        let mut w = OpenOptions::new().write(true).open(path).expect("writer");
        w.write_all(text).expect("write");
    }

    fn in_paused_time<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn the_exit_waits_until_the_reader_has_read_the_last_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(&dir);
        let mut r = reader(&path);
        worker_wrote(&path, b"last words\n");
        in_paused_time(async {
            let start = Instant::now();
            let wait = tokio::spawn({
                let path = path.clone();
                async move { drain(&path, start + Duration::from_secs(60)).await }
            });
            // However long the reader takes, within the limit, the exit waits for it.
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(!wait.is_finished(), "the exit did not wait for the reader");
            let mut got = [0u8; 64];
            let n = r.read(&mut got).expect("read");
            assert_eq!(&got[..n], b"last words\n");
            assert_eq!(wait.await.expect("join"), Drained::Read);
            assert!(start.elapsed() < Duration::from_secs(31));
        });
    }

    #[test]
    fn output_already_read_or_unread_by_anyone_does_not_hold_the_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(&dir);
        in_paused_time(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            // No reader at all (`ctr run -d` has gone): nothing can be delivered.
            assert_eq!(drain(&path, deadline).await, Drained::NoReader);
            // A reader that has read everything.
            let mut r = reader(&path);
            worker_wrote(&path, b"x\n");
            let mut got = [0u8; 8];
            assert_eq!(r.read(&mut got).expect("read"), 2);
            assert_eq!(drain(&path, deadline).await, Drained::Read);
            // Not FIFOs.
            assert_eq!(drain("", deadline).await, Drained::NotAFifo);
            assert_eq!(drain("file:///x", deadline).await, Drained::NotAFifo);
            let file = dir.path().join("plain");
            std::fs::write(&file, "x").expect("write");
            assert_eq!(
                drain(&file.to_string_lossy(), deadline).await,
                Drained::NotAFifo
            );
            assert_eq!(Instant::now(), deadline - Duration::from_secs(60));
        });
    }

    #[test]
    fn a_reader_that_leaves_without_reading_releases_the_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(&dir);
        let r = reader(&path);
        worker_wrote(&path, b"unread\n");
        in_paused_time(async {
            let start = Instant::now();
            let wait = tokio::spawn({
                let path = path.clone();
                async move { drain(&path, start + Duration::from_secs(60)).await }
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!wait.is_finished());
            drop(r);
            assert_eq!(wait.await.expect("join"), Drained::ReaderLeft { unread: 7 });
            assert!(start.elapsed() < Duration::from_secs(2));
        });
    }

    #[test]
    fn a_reader_that_never_reads_holds_the_exit_for_the_limit_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(&dir);
        let _r = reader(&path);
        worker_wrote(&path, b"ignored\n");
        in_paused_time(async {
            let start = Instant::now();
            let got = drain(&path, start + Duration::from_secs(2)).await;
            assert_eq!(got, Drained::TimedOut { unread: 8 });
            let took = start.elapsed();
            assert!(
                took >= Duration::from_secs(2) && took < Duration::from_secs(3),
                "{took:?}"
            );
        });
    }
}
