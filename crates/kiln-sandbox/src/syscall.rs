//! The system calls that change a worker's privileges, behind a trait: the order in which they
//! are made is a security property (capabilities dropped before the identity changes would
//! lose the right to change it; seccomp loaded early would block the later calls), and a unit
//! test can only check an order it can observe. youki's `Syscall` trait is the model.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use caps::{CapSet, Capability, CapsHashSet};

use crate::check;
use crate::seccomp::Filter;

/// The privilege-changing calls of a worker's setup.
pub trait Syscall {
    /// `setrlimit(resource, soft, hard)`.
    fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()>;
    /// `chroot` into the directory `dir` (then `chdir("/")`).
    fn chroot(&self, dir: BorrowedFd<'_>) -> io::Result<()>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&self) -> io::Result<()>;
    /// Drops every capability not in `keep` from the bounding set.
    fn drop_bounding(&self, keep: &CapsHashSet) -> io::Result<()>;
    /// `prctl(PR_SET_KEEPCAPS, on)`.
    fn set_keep_caps(&self, on: bool) -> io::Result<()>;
    /// `setgroups(groups)`.
    fn set_groups(&self, groups: &[u32]) -> io::Result<()>;
    /// `setresgid(gid, gid, gid)`.
    fn set_gid(&self, gid: u32) -> io::Result<()>;
    /// `setresuid(uid, uid, uid)`.
    fn set_uid(&self, uid: u32) -> io::Result<()>;
    /// Sets one capability set (inheritable, effective or permitted, or the ambient set).
    fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> io::Result<()>;
    /// `umask(mask)`.
    fn set_umask(&self, mask: u32);
    /// Loads a seccomp filter.
    fn load_seccomp(&self, filter: &Filter) -> io::Result<()>;
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

fn caps_err(e: caps::errors::CapsError) -> io::Error {
    io::Error::other(e.to_string())
}

impl Syscall for Linux {
    fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads a valid rlimit struct.
        check(unsafe { libc::setrlimit(resource as _, &lim) } as libc::c_long).map(drop)
    }

    fn chroot(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: fchdir and chroot on a directory descriptor we hold and a static path.
        unsafe {
            check(libc::fchdir(dir.as_raw_fd()) as libc::c_long)?;
            check(libc::chroot(c".".as_ptr()) as libc::c_long)?;
            check(libc::chdir(c"/".as_ptr()) as libc::c_long)?;
        }
        Ok(())
    }

    fn set_no_new_privs(&self) -> io::Result<()> {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)
            .map(drop)
    }

    fn drop_bounding(&self, keep: &CapsHashSet) -> io::Result<()> {
        let supported = caps::runtime::thread_all_supported();
        for cap in supported.difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(caps_err)?;
        }
        Ok(())
    }

    fn set_keep_caps(&self, on: bool) -> io::Result<()> {
        // SAFETY: prctl with integer arguments.
        check(
            unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) }
                as libc::c_long,
        )
        .map(drop)
    }

    fn set_groups(&self, groups: &[u32]) -> io::Result<()> {
        // SAFETY: setgroups reads `groups.len()` gids from a valid slice.
        check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } as libc::c_long).map(drop)
    }

    fn set_gid(&self, gid: u32) -> io::Result<()> {
        // SAFETY: setresgid with integer arguments.
        check(unsafe { libc::setresgid(gid, gid, gid) } as libc::c_long).map(drop)
    }

    fn set_uid(&self, uid: u32) -> io::Result<()> {
        // SAFETY: setresuid with integer arguments.
        check(unsafe { libc::setresuid(uid, uid, uid) } as libc::c_long).map(drop)
    }

    fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> io::Result<()> {
        caps::set(None, set, caps).map_err(caps_err)
    }

    fn set_umask(&self, mask: u32) {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }

    fn load_seccomp(&self, filter: &Filter) -> io::Result<()> {
        filter.load()
    }
}

/// Capability names (`CAP_CHOWN`) to the `caps` crate's values.
pub(crate) fn parse_caps(names: &[String]) -> crate::Result<CapsHashSet> {
    names
        .iter()
        .map(|n| {
            n.parse::<Capability>()
                .map_err(|_| crate::Error::Invalid(format!("unknown capability {n}")))
        })
        .collect::<crate::Result<HashSet<_>>>()
}
