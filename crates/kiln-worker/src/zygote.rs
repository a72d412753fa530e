//! The zygote: a single-threaded process, forked from the shim before the shim starts any
//! thread, that forks workers on request and reports their exits.
//!
//! It holds the Wasmtime [`Engine`](wasmtime::Engine) (created once, inherited by every worker
//! through fork), so a worker starts with the engine, the signal handlers and the code of the
//! whole runtime already in memory. It must stay single-threaded: it never compiles (a cache
//! miss is compiled by a short-lived child of the worker; Cranelift's parallel compilation
//! starts threads) and never enters an
//! async runtime. [`fork_zygote`] refuses to run in a process that already has threads, and
//! the zygote checks itself again after creating the engine.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use log::{debug, error, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, send, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::protocol::{MAX_PACKET, SpawnRequest, ZygoteEvent};

/// Why the zygote could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// Forking a multi-threaded process is undefined behaviour; refused.
    #[error("refusing to fork the zygote from a process with {0} threads")]
    NotSingleThreaded(usize),
    /// A system call failed.
    #[error("{op}: {errno}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> ZygoteError {
    move |errno| ZygoteError::Sys { op, errno }
}

/// The shim's end of a running zygote.
#[derive(Debug)]
pub struct ZygoteHandle {
    /// The zygote's pid.
    pub pid: i32,
    /// The shim's end of the `SOCK_SEQPACKET` control socket.
    pub sock: OwnedFd,
}

/// Number of threads of the calling process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Forks the zygote. Must be called while the calling process has exactly one thread.
pub fn fork_zygote() -> Result<ZygoteHandle, ZygoteError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ZygoteError::NotSingleThreaded(threads));
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))?;
    // SAFETY: the process is single-threaded (checked above), so the child inherits no lock
    // held by another thread.
    match unsafe { fork() }.map_err(sys("fork zygote"))? {
        ForkResult::Parent { child } => {
            drop(theirs);
            Ok(ZygoteHandle {
                pid: child.as_raw(),
                sock: ours,
            })
        }
        ForkResult::Child => {
            drop(ours);
            // The parent's stdout may be the pipe its launcher reads to the end as a readiness
            // signal; the zygote must not hold it open. Point it at stderr, as the parent will.
            // SAFETY: dup2 on the standard descriptors.
            unsafe { libc::dup2(2, 1) };
            let code = zygote_main(theirs);
            // SAFETY: leaving the forked child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
    }
}

fn zygote_main(sock: OwnedFd) -> i32 {
    // Dies with the shim: a zygote nobody can talk to has no purpose. Workers are not tied to
    // it, so containers survive until containerd cleans them up.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let engine = match crate::engine::new_engine() {
        Ok(e) => e,
        Err(e) => {
            error!("zygote: cannot create the Wasmtime engine: {e:#}");
            return 1;
        }
    };
    let threads = thread_count();
    if threads != 1 {
        error!("zygote: {threads} threads after creating the engine; refusing to fork workers");
        return 1;
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None) {
        error!("zygote: block SIGCHLD: {e}");
        return 1;
    }
    let sigfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            error!("zygote: signalfd: {e}");
            return 1;
        }
    };
    let own_pidns = std::fs::File::open("/proc/self/ns/pid").ok();
    let mut buf = vec![0u8; MAX_PACKET];
    debug!("zygote {} ready", std::process::id());
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!("zygote: poll: {e}");
                return 1;
            }
        }
        let sock_ready = fds[0].any().unwrap_or(false);
        let sig_ready = fds[1].any().unwrap_or(false);
        if sig_ready {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(&sock);
        }
        if sock_ready {
            match receive(&sock, &mut buf) {
                Ok(None) => {
                    debug!("zygote: shim closed the control socket; exiting");
                    return 0;
                }
                Ok(Some((req, chan))) => {
                    spawn(&engine, &sock, &sigfd, own_pidns.as_ref(), req, chan)
                }
                Err(e) => warn!("zygote: bad request: {e}"),
            }
        }
    }
}

fn receive(sock: &OwnedFd, buf: &mut [u8]) -> Result<Option<(SpawnRequest, OwnedFd)>, String> {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    );
    let msg = match msg {
        Ok(m) => m,
        Err(Errno::EINTR | Errno::EAGAIN) => return Err("interrupted".to_string()),
        Err(e) => return Err(format!("recvmsg: {e}")),
    };
    let len = msg.bytes;
    let mut chan = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if chan.is_none() {
                        chan = Some(owned);
                    }
                }
            }
        }
    }
    if len == 0 {
        return Ok(None);
    }
    let req: SpawnRequest =
        serde_json::from_slice(&buf[..len]).map_err(|e| format!("decode: {e}"))?;
    let chan = chan.ok_or_else(|| format!("request {} carried no worker socket", req.token))?;
    Ok(Some((req, chan)))
}

fn spawn(
    engine: &wasmtime::Engine,
    sock: &OwnedFd,
    sigfd: &SignalFd,
    own_pidns: Option<&std::fs::File>,
    req: SpawnRequest,
    chan: OwnedFd,
) {
    let token = req.token;
    // A pid namespace is entered for children only, so the zygote enters it around the fork
    // and returns to its own at once.
    let pidns = req.plan.namespaces.iter().find_map(|n| match &n.action {
        kiln_plan::NamespaceAction::Join(path) if n.kind == "pid" => Some(path.clone()),
        _ => None,
    });
    if let Some(path) = &pidns {
        let entered = std::fs::File::open(path)
            .map_err(|e| e.to_string())
            .and_then(|f| setns(f.as_fd(), CloneFlags::CLONE_NEWPID).map_err(|e| e.to_string()));
        if let Err(e) = entered {
            let error = format!("join pid namespace {}: {e}", path.display());
            send_event(sock, &ZygoteEvent::SpawnFailed { token, error });
            return;
        }
    }
    let in_pidns = pidns.is_some();
    let mut req = req;
    let forked = match req.clone_into.clone().as_deref().map(open_cgroup) {
        Some(Ok(dir)) => match clone_into_cgroup(&dir) {
            Ok(forked) => {
                // Placed by the kernel at birth: nothing for the worker to join.
                req.cgroup_procs.clear();
                Ok(forked)
            }
            Err(e) => {
                debug!("zygote: clone3 into a cgroup failed ({e}); the worker joins it instead");
                // SAFETY: the zygote is single-threaded (checked at start, starts no thread).
                unsafe { fork() }
            }
        },
        Some(Err(e)) => {
            debug!("zygote: cannot open the worker's cgroup ({e}); the worker joins it instead");
            // SAFETY: as above.
            unsafe { fork() }
        }
        // SAFETY: as above.
        None => unsafe { fork() },
    };
    if in_pidns
        && let Some(own) = own_pidns
        && let Err(e) = setns(own.as_fd(), CloneFlags::CLONE_NEWPID)
    {
        error!("zygote: cannot return to its own pid namespace: {e}");
    }
    match forked {
        Ok(ForkResult::Child) => {
            // The worker keeps only its own channel and stdio.
            // SAFETY: closing descriptors this child owns copies of; nothing else uses them.
            unsafe {
                libc::close(sock.as_raw_fd());
                libc::close(sigfd.as_fd().as_raw_fd());
            }
            let code = crate::worker::main(engine, req, chan);
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(chan);
            send_event(
                sock,
                &ZygoteEvent::Spawned {
                    token,
                    pid: child.as_raw(),
                },
            );
        }
        Err(e) => {
            drop(chan);
            send_event(
                sock,
                &ZygoteEvent::SpawnFailed {
                    token,
                    error: format!("fork: {e}"),
                },
            );
        }
    }
}

fn open_cgroup(dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map(OwnedFd::from)
}

/// `struct clone_args` of `clone3(2)`, up to and including `cgroup` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` from `<linux/sched.h>` (not in the libc crate for every target).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A `fork` whose child starts life in the cgroup v2 directory `cgroup`.
///
/// Moving a process into a cgroup afterwards (a write to `cgroup.procs`) takes the kernel's
/// global threadgroup lock for writing, and the first such write after a quiet period waits a
/// whole RCU grace period for it: 5–15 ms on our nodes, more than the rest of a warm container
/// start. A child cloned into its cgroup only takes that lock for reading, like any fork, so it
/// never waits. Like `fork`, this is only sound in a single-threaded process; the zygote is one.
///
/// Errors (an old kernel without `clone3` or `CLONE_INTO_CGROUP`, or a v1 directory) are
/// returned before any child exists; the caller then forks and joins the old way.
pub fn clone_into_cgroup(cgroup: &OwnedFd) -> Result<ForkResult, Errno> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed. Without CLONE_VM and with no
    // stack given, the child continues on a copy of this stack, exactly as after fork; the
    // caller guarantees the process is single-threaded, so the child's copy of every lock
    // (malloc's included) is unheld.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(ForkResult::Child),
        pid => Ok(ForkResult::Parent {
            child: Pid::from_raw(pid as i32),
        }),
    }
}

fn reap(sock: &OwnedFd) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => send_event(
                sock,
                &ZygoteEvent::Exited {
                    pid: pid.as_raw(),
                    status: code,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => send_event(
                sock,
                &ZygoteEvent::Exited {
                    pid: pid.as_raw(),
                    status: 128 + sig as i32,
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!("zygote: waitpid: {e}");
                return;
            }
        }
    }
}

fn send_event(sock: &OwnedFd, ev: &ZygoteEvent) {
    let bytes = match serde_json::to_vec(ev) {
        Ok(b) => b,
        Err(e) => {
            error!("zygote: encode {ev:?}: {e}");
            return;
        }
    };
    loop {
        match send(sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!("zygote: send {ev:?}: {e}");
                return;
            }
        }
    }
}

/// Sends a spawn request with the worker's channel. Used by the shim; blocking (the packet is
/// small and the zygote drains its socket continuously).
pub fn send_spawn(sock: RawFd, req: &SpawnRequest, chan: &OwnedFd) -> Result<(), String> {
    let bytes = serde_json::to_vec(req).map_err(|e| format!("encode spawn request: {e}"))?;
    let fds = [chan.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    loop {
        match nix::sys::socket::sendmsg::<()>(
            sock,
            &[IoSlice::new(&bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("send spawn request to zygote: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_fork_from_a_multi_threaded_process() {
        // The test harness runs this test on a thread of its own, so there are at least two.
        assert!(thread_count() >= 2);
        match fork_zygote() {
            Err(ZygoteError::NotSingleThreaded(n)) => assert!(n >= 2),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// The cgroup2 mount point, if one is mounted (hybrid hosts mount one at
    /// /sys/fs/cgroup/unified, without controllers, which is enough for placement).
    fn cgroup2_mount() -> Option<std::path::PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        text.lines().find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2")
                .then(|| before.split(' ').nth(4).map(std::path::PathBuf::from))
                .flatten()
        })
    }

    #[test]
    fn clone_into_cgroup_places_the_child_at_birth() {
        let Some(mount) = cgroup2_mount() else {
            eprintln!("no cgroup2 mount on this machine; nothing to test");
            return;
        };
        let name = format!("kiln-clone-test-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).expect("create a v2 cgroup");
        let fd = open_cgroup(&dir).expect("open it");
        // The harness is multi-threaded: the child only pauses (async-signal-safe) until
        // killed, which is sound after fork or clone in any process.
        match clone_into_cgroup(&fd).expect("clone3 into the cgroup") {
            ForkResult::Child => loop {
                // SAFETY: pause is async-signal-safe.
                unsafe { libc::pause() };
            },
            ForkResult::Parent { child } => {
                let cgroup = std::fs::read_to_string(format!("/proc/{child}/cgroup"));
                let procs = std::fs::read_to_string(dir.join("cgroup.procs"));
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                let _ = std::fs::remove_dir(&dir);
                let cgroup = cgroup.expect("read the child's cgroup");
                assert!(
                    cgroup.lines().any(|l| l == format!("0::/{name}")),
                    "child not in {name}: {cgroup}"
                );
                assert_eq!(procs.expect("read cgroup.procs").trim(), child.to_string());
            }
        }
    }

    #[test]
    fn clone_into_a_v1_cgroup_fails_without_a_child() {
        let Some(v1) = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"]
            .iter()
            .map(std::path::Path::new)
            .find(|p| p.join("memory.limit_in_bytes").exists() || p.join("pids.max").exists())
        else {
            eprintln!("no cgroup v1 hierarchy on this machine; nothing to test");
            return;
        };
        let fd = open_cgroup(v1).expect("open the v1 root");
        match clone_into_cgroup(&fd) {
            Err(_) => {}
            Ok(ForkResult::Child) => unsafe { libc::_exit(0) },
            Ok(ForkResult::Parent { child }) => {
                let _ = waitpid(child, None);
                panic!("clone3 into a v1 cgroup made a child");
            }
        }
    }
}
