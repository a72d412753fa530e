//! Noticing that the kernel's OOM killer acted in a cgroup, as soon as it does.
//!
//! containerd learns that a container was OOM-killed (and the CRI reports `OOMKilled`) only
//! from a TaskOOM event, so the shim needs a descriptor that becomes readable when it happens:
//! on v1 an eventfd registered for `memory.oom_control` through `cgroup.event_control`, on v2 an
//! inotify watch of `memory.events`, whose `oom_kill` count is then read.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::fsutil::{io_err, read_optional, write_file};
use crate::{Error, Result};

/// An OOM notification for one cgroup: poll [`OomEvents::fd`] for readability, then call
/// [`OomEvents::take`].
#[derive(Debug)]
pub struct OomEvents {
    fd: OwnedFd,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// The eventfd registered for the directory's `memory.oom_control`. The control file is
    /// closed once the registration is written: the kernel checks it and keeps no reference,
    /// and the registration lasts until the eventfd is closed or the cgroup removed, so a
    /// shared shim holds one descriptor per container here, not two.
    V1 { dir: PathBuf },
    /// `memory.events` and the `oom_kill` count last seen.
    V2 { events: PathBuf, seen: u64 },
}

fn check(ret: libc::c_int, op: &'static str, path: &Path) -> Result<libc::c_int> {
    if ret < 0 {
        Err(Error::Io {
            op,
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

fn oom_kills(events: &Path) -> Result<u64> {
    let text = read_optional(events)?.unwrap_or_default();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

impl OomEvents {
    /// Watches the v1 memory cgroup directory `dir`.
    pub(crate) fn v1(dir: &Path) -> Result<OomEvents> {
        let control_path = dir.join("memory.oom_control");
        let control = File::open(&control_path).map_err(|e| io_err("open", &control_path, e))?;
        // SAFETY: eventfd with flags; the descriptor is owned at once.
        let efd = check(
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) },
            "eventfd",
            dir,
        )?;
        // SAFETY: just created.
        let fd = unsafe { OwnedFd::from_raw_fd(efd) };
        write_file(
            &dir.join("cgroup.event_control"),
            &format!("{} {}", fd.as_raw_fd(), control.as_raw_fd()),
        )?;
        drop(control);
        Ok(OomEvents {
            fd,
            kind: Kind::V1 {
                dir: dir.to_path_buf(),
            },
        })
    }

    /// Watches the v2 cgroup directory `dir`.
    pub(crate) fn v2(dir: &Path) -> Result<OomEvents> {
        let events = dir.join("memory.events");
        // SAFETY: inotify_init1 with flags; the descriptor is owned at once.
        let ifd = check(
            unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) },
            "inotify",
            dir,
        )?;
        // SAFETY: just created.
        let fd = unsafe { OwnedFd::from_raw_fd(ifd) };
        let c = std::ffi::CString::new(events.as_os_str().as_encoded_bytes()).map_err(|_| {
            Error::InvalidPath {
                path: events.display().to_string(),
                reason: "NUL in path".to_string(),
            }
        })?;
        // SAFETY: a watch on a NUL-terminated path.
        check(
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) },
            "inotify_add_watch",
            &events,
        )?;
        let seen = oom_kills(&events)?;
        Ok(OomEvents {
            fd,
            kind: Kind::V2 { events, seen },
        })
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// After the descriptor became readable: how many OOM kills happened since the last call
    /// (0 for a wake-up that was not one, such as the cgroup going away on v1).
    pub fn take(&mut self) -> Result<u64> {
        let mut buf = [0u8; 4096];
        let mut total = 0u64;
        loop {
            // SAFETY: reading into our buffer from our descriptor.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        return Err(Error::Io {
                            op: "read the OOM notification",
                            path: PathBuf::new(),
                            source: e,
                        });
                    }
                }
            }
            if n == 0 {
                break;
            }
            if let Kind::V1 { .. } = self.kind
                && n == 8
            {
                let mut count = [0u8; 8];
                count.copy_from_slice(&buf[..8]);
                total += u64::from_ne_bytes(count);
            }
        }
        match &mut self.kind {
            // The eventfd also fires when the cgroup is removed; an event counts only while
            // the cgroup exists.
            Kind::V1 { dir, .. } => Ok(if dir.is_dir() { total } else { 0 }),
            Kind::V2 { events, seen } => {
                let now = oom_kills(events)?;
                let new = now.saturating_sub(*seen);
                *seen = now;
                Ok(new)
            }
        }
    }
}
