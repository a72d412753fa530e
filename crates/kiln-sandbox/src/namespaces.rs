//! Entering the container's namespaces: joining those the spec names by path, creating the
//! others (which ones the plan decides), then what lives in them: the hostname and the
//! namespaced sysctls.
//!
//! A user namespace created with id maps needs its maps written by a process outside it that
//! is privileged there: the worker forks a helper before `unshare(CLONE_NEWUSER)`, which writes
//! the worker's `uid_map` and `gid_map` once the namespace exists (runc has its parent do the
//! same).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kiln_plan::{IdMap, Namespace, NamespaceAction, Sandbox};

use crate::{Error, Result, check, sys};

fn flag(kind: &str) -> Result<libc::c_int> {
    Ok(match kind {
        "network" => libc::CLONE_NEWNET,
        "ipc" => libc::CLONE_NEWIPC,
        "uts" => libc::CLONE_NEWUTS,
        "mount" => libc::CLONE_NEWNS,
        "user" => libc::CLONE_NEWUSER,
        "cgroup" => libc::CLONE_NEWCGROUP,
        "pid" => libc::CLONE_NEWPID,
        other => {
            return Err(Error::Invalid(format!(
                "a {other} namespace is not supported by Kiln"
            )));
        }
    })
}

/// Enters `namespaces` in order. A pid namespace given by path is skipped here: it applies to
/// children only, so the zygote enters it around the worker's fork.
pub fn enter(namespaces: &[Namespace], sandbox: &Sandbox) -> Result<()> {
    let mut create = 0;
    for ns in namespaces {
        match &ns.action {
            NamespaceAction::Join(_) if ns.kind == "pid" => {}
            NamespaceAction::Join(path) => {
                let f = File::open(path).map_err(sys(format!(
                    "open {} namespace {}",
                    ns.kind,
                    path.display()
                )))?;
                // SAFETY: setns on a namespace descriptor we hold.
                check(unsafe { libc::setns(f.as_raw_fd(), flag(&ns.kind)?) } as libc::c_long)
                    .map_err(sys(format!(
                        "join {} namespace {}",
                        ns.kind,
                        path.display()
                    )))?;
            }
            NamespaceAction::Create if ns.kind == "user" => {
                create_user_namespace(&sandbox.uid_mappings, &sandbox.gid_mappings)?;
            }
            NamespaceAction::Create => create |= flag(&ns.kind)?,
        }
    }
    if create != 0 {
        // SAFETY: unshare with namespace flags.
        check(unsafe { libc::unshare(create) } as libc::c_long)
            .map_err(sys(format!("create namespaces ({})", describe(namespaces))))?;
    }
    if let Some(name) = &sandbox.hostname {
        // SAFETY: sethostname reads `len` bytes.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } as libc::c_long)
            .map_err(sys(format!("set hostname {name:?}")))?;
    }
    if let Some(name) = &sandbox.domainname {
        // SAFETY: setdomainname reads `len` bytes.
        check(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) } as libc::c_long)
            .map_err(sys(format!("set domainname {name:?}")))?;
    }
    for (key, value) in &sandbox.sysctls {
        // /proc/sys resolves net.* and IPC sysctls through the opener's namespaces.
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(sys(format!("set sysctl {key}={value}")))?;
    }
    Ok(())
}

fn describe(namespaces: &[Namespace]) -> String {
    namespaces
        .iter()
        .filter(|n| n.action == NamespaceAction::Create)
        .map(|n| n.kind.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn map_text(maps: &[IdMap]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: both were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `unshare(CLONE_NEWUSER)` with `uid_map`/`gid_map` written by a helper that stays outside.
/// The caller must be single-threaded (it forks).
fn create_user_namespace(uid: &[IdMap], gid: &[IdMap]) -> Result<()> {
    let me = std::process::id();
    let uid_path =
        CString::new(format!("/proc/{me}/uid_map")).map_err(|_| Error::Invalid("path".into()))?;
    let gid_path =
        CString::new(format!("/proc/{me}/gid_map")).map_err(|_| Error::Invalid("path".into()))?;
    let (uid_text, gid_text) = (map_text(uid), map_text(gid));
    let (go_read, go_write) = pipe().map_err(sys("pipe for the id-map helper"))?;
    // SAFETY: the worker is single-threaded during setup; the child only reads a pipe, opens
    // and writes two files and exits.
    let pid =
        check(unsafe { libc::fork() } as libc::c_long).map_err(sys("fork the id-map helper"))?;
    if pid == 0 {
        drop(go_write);
        let mut byte = [0u8; 1];
        let ok = File::from(go_read).read(&mut byte).is_ok_and(|n| n == 1)
            && write_map(&uid_path, &uid_text)
            && write_map(&gid_path, &gid_text);
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) }
    }
    drop(go_read);
    // SAFETY: unshare with a namespace flag.
    let unshared = check(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long);
    if unshared.is_ok() {
        let _ = File::from(go_write).write_all(b"1");
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    unshared.map_err(sys("create the user namespace"))?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(Error::Invalid(format!(
            "writing the user namespace's id maps failed (uid map {:?}, gid map {:?})",
            uid_text.trim(),
            gid_text.trim()
        )));
    }
    Ok(())
}

fn write_map(path: &CString, text: &str) -> bool {
    // SAFETY: open/write/close with a NUL-terminated path and a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::write(fd, text.as_ptr().cast(), text.len());
        libc::close(fd);
        n == text.len() as isize
    }
}
