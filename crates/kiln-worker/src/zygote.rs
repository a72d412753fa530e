//! The zygote: a single-threaded process that forks workers on request.
//!
//! It holds the Wasmtime [`Engine`](wasmtime::Engine) (created once, inherited by every worker
//! through fork), so a worker starts with the engine, the signal handlers and the code of the
//! whole runtime already in memory. It must stay single-threaded: it never compiles and never
//! enters an async runtime. The shim forks the first one before it starts any thread
//! ([`fork_zygote`] refuses to run in a process that already has threads); a replacement for a
//! zygote that died is exec'd ([`exec_main`]), as forking the threaded shim would be unsound.
//!
//! Each worker is cloned with `CLONE_PARENT`, so the *shim* is its parent: the shim reaps its
//! workers and learns their exit statuses itself, and nothing is lost if the zygote dies. With
//! `CLONE_PIDFD` the zygote gets each worker's pidfd at birth and hands it to the shim, which
//! signals workers only through them (a recycled pid is never signalled). On cgroup v2,
//! `CLONE_INTO_CGROUP` places the worker in its container's cgroup at birth.
//!
//! Replies never block the zygote: they wait in a queue while the shim's side of the socket
//! is full, and requests keep being served.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use log::{debug, error, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::{ForkResult, Pid, fork};

use crate::process::thread_count;
use crate::protocol::{MAX_PACKET, ZygoteEvent, decode_request, encode_event, token};

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

/// The control socketpair: (the shim's end, the zygote's end).
pub fn control_socket() -> Result<(OwnedFd, OwnedFd), ZygoteError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))
}

/// Forks the zygote. Must be called while the calling process has exactly one thread.
pub fn fork_zygote() -> Result<ZygoteHandle, ZygoteError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ZygoteError::NotSingleThreaded(threads));
    }
    let (ours, theirs) = control_socket()?;
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

/// The descriptor number at which an exec'd zygote finds its control socket.
pub const EXEC_FD: RawFd = 3;

/// The entry of an exec'd zygote (a replacement for one that died): its control socket is
/// descriptor [`EXEC_FD`].
pub fn exec_main() -> i32 {
    // SAFETY: the shim put the socket at EXEC_FD for this process, which owns it from now on.
    let sock = unsafe { OwnedFd::from_raw_fd(EXEC_FD) };
    zygote_main(sock)
}

fn zygote_main(sock: OwnedFd) -> i32 {
    // Dies with the shim: a zygote nobody can talk to has no purpose. Workers are the shim's
    // children, not the zygote's, so they are not affected either way.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let engine = match crate::engine::new_engine() {
        Ok(e) => e,
        Err(e) => {
            error!("zygote: cannot create the Wasmtime engine: {e:#}");
            return 1;
        }
    };
    // Over the handlers the engine just installed, so that workers die of fault signals sent
    // from outside (see `signals`).
    if let Err(e) = crate::signals::install() {
        error!("zygote: install the fault-signal handler: {e}");
        return 1;
    }
    let threads = thread_count();
    if threads != 1 {
        error!("zygote: {threads} threads after creating the engine; refusing to fork workers");
        return 1;
    }
    let own_pidns = std::fs::File::open("/proc/self/ns/pid").ok();
    let mut buf = vec![0u8; MAX_PACKET];
    let mut replies: VecDeque<(Vec<u8>, Option<OwnedFd>)> = VecDeque::new();
    debug!("zygote {} ready", std::process::id());
    loop {
        let mut flags = PollFlags::POLLIN;
        if !replies.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(sock.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!("zygote: poll: {e}");
                return 1;
            }
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.contains(PollFlags::POLLOUT) && !flush(&sock, &mut replies) {
            return 1;
        }
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match receive(&sock, &mut buf) {
                Received::Closed => {
                    debug!("zygote: shim closed the control socket; exiting");
                    return 0;
                }
                Received::Nothing => {}
                Received::Packet { len, chan } => {
                    let reply = spawn(&engine, &sock, own_pidns.as_ref(), &buf[..len], chan);
                    replies.push_back(reply);
                    if !flush(&sock, &mut replies) {
                        return 1;
                    }
                }
            }
        }
    }
}

enum Received {
    Closed,
    Nothing,
    Packet { len: usize, chan: Option<OwnedFd> },
}

fn receive(sock: &OwnedFd, buf: &mut [u8]) -> Received {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    );
    let msg = match msg {
        Ok(m) => m,
        Err(Errno::EINTR | Errno::EAGAIN) => return Received::Nothing,
        Err(e) => {
            warn!("zygote: recvmsg: {e}");
            return Received::Closed;
        }
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
        return Received::Closed;
    }
    Received::Packet { len, chan }
}

/// Sends queued replies until the socket is full; false when the shim is gone.
fn flush(sock: &OwnedFd, replies: &mut VecDeque<(Vec<u8>, Option<OwnedFd>)>) -> bool {
    while let Some((bytes, fd)) = replies.front() {
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(_) => {
                replies.pop_front();
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return true,
            Err(e) => {
                error!("zygote: send a reply: {e}");
                return false;
            }
        }
    }
    true
}

fn failed(token: u64, error: String) -> (Vec<u8>, Option<OwnedFd>) {
    let ev = ZygoteEvent::SpawnFailed { error };
    match encode_event(token, &ev) {
        Ok(b) => (b, None),
        Err(e) => {
            // A message that does not fit in a packet: answer with a short one.
            let short = ZygoteEvent::SpawnFailed {
                error: format!("the zygote could not encode its answer: {e}"),
            };
            (encode_event(token, &short).unwrap_or_default(), None)
        }
    }
}

/// Serves one request packet: returns the reply to queue.
fn spawn(
    engine: &wasmtime::Engine,
    sock: &OwnedFd,
    own_pidns: Option<&std::fs::File>,
    packet: &[u8],
    chan: Option<OwnedFd>,
) -> (Vec<u8>, Option<OwnedFd>) {
    let Some(token) = token(packet) else {
        // No header, no token: nobody to answer. The shim only sends whole packets.
        warn!("zygote: a packet without a header");
        return (Vec::new(), None);
    };
    let mut req = match decode_request(packet) {
        Ok((_, req)) => req,
        Err(e) => {
            return failed(
                token,
                format!("the zygote could not decode the request: {e}"),
            );
        }
    };
    let Some(chan) = chan else {
        return failed(token, "the request carried no worker socket".to_string());
    };
    // A pid namespace is entered for children only, so the zygote enters it around the clone
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
            return failed(token, format!("join pid namespace {}: {e}", path.display()));
        }
    }
    let cgroup = match req.clone_into.as_deref().map(open_cgroup) {
        Some(Ok(dir)) => Some(dir),
        Some(Err(e)) => {
            debug!("zygote: cannot open the worker's cgroup ({e}); the worker joins it instead");
            None
        }
        None => None,
    };
    let mut cloned = clone_worker(cgroup.as_ref());
    if cgroup.is_some()
        && let Err(e) = &cloned
    {
        debug!("zygote: clone3 into a cgroup failed ({e}); the worker joins it instead");
        cloned = clone_worker(None);
    } else if cgroup.is_some() {
        // Placed by the kernel at birth: nothing for the worker to join.
        req.cgroup_procs.clear();
    }
    if pidns.is_some()
        && let Some(own) = own_pidns
        && let Err(e) = setns(own.as_fd(), CloneFlags::CLONE_NEWPID)
    {
        error!("zygote: cannot return to its own pid namespace: {e}");
    }
    match cloned {
        Ok(Cloned::Child) => {
            // The worker keeps only its own channel and stdio.
            // SAFETY: closing a descriptor this child owns a copy of; nothing else uses it.
            unsafe { libc::close(sock.as_raw_fd()) };
            let code = crate::worker::main(engine, req, chan);
            // SAFETY: leaving the cloned child.
            unsafe { libc::_exit(code) }
        }
        Ok(Cloned::Parent { pid, pidfd }) => {
            drop(chan);
            match encode_event(token, &ZygoteEvent::Spawned { pid: pid.as_raw() }) {
                Ok(bytes) => (bytes, Some(pidfd)),
                Err(e) => failed(token, e.to_string()),
            }
        }
        Err(e) => {
            drop(chan);
            failed(token, format!("clone the worker: {e}"))
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

/// What [`clone_worker`] returns on each side.
pub enum Cloned {
    /// In the new worker.
    Child,
    /// In the zygote.
    Parent {
        /// The worker's pid.
        pid: Pid,
        /// Its pidfd.
        pidfd: OwnedFd,
    },
}

/// A `fork` whose child is a child of the zygote's parent (`CLONE_PARENT`), with a pidfd
/// (`CLONE_PIDFD`), and, given a cgroup v2 directory, starts life in that cgroup
/// (`CLONE_INTO_CGROUP`).
///
/// Moving a process into a cgroup afterwards (a write to `cgroup.procs`) takes the kernel's
/// global threadgroup lock for writing, and the first such write after a quiet period waits a
/// whole RCU grace period for it: 5–15 ms on our nodes, more than the rest of a warm container
/// start. A child cloned into its cgroup only takes that lock for reading, like any fork, so it
/// never waits. Like `fork`, this is only sound in a single-threaded process; the zygote is one.
///
/// Errors (a kernel without `clone3`, a v1 directory for `CLONE_INTO_CGROUP`) are returned
/// before any child exists.
pub fn clone_worker(cgroup: Option<&OwnedFd>) -> Result<Cloned, Errno> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: (libc::CLONE_PARENT | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        // With CLONE_PARENT the kernel requires 0 here and gives the child the zygote's own
        // exit signal (SIGCHLD), delivered to the shim.
        exit_signal: 0,
        ..CloneArgs::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid clone_args of the size passed, and `pidfd` outlives the call.
    // Without CLONE_VM and with no stack given, the child continues on a copy of this stack,
    // exactly as after fork; the caller guarantees the process is single-threaded, so the
    // child's copy of every lock (malloc's included) is unheld.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(Cloned::Child),
        pid => Ok(Cloned::Parent {
            pid: Pid::from_raw(pid as i32),
            // SAFETY: clone3 with CLONE_PIDFD stored a new descriptor that we now own.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
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

    /// The cgroup2 mount point: this project's machines mount one (hybrid hosts at
    /// /sys/fs/cgroup/unified, without controllers, which is enough for placement).
    fn cgroup2_mount() -> std::path::PathBuf {
        let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        text.lines()
            .find_map(|l| {
                let (before, after) = l.split_once(" - ")?;
                (after.split(' ').next()? == "cgroup2")
                    .then(|| before.split(' ').nth(4).map(std::path::PathBuf::from))
                    .flatten()
            })
            .expect("a cgroup2 mount (hybrid hosts have one at /sys/fs/cgroup/unified)")
    }

    /// Runs `f` in a forked child (the test harness is multi-threaded; clone_worker's
    /// CLONE_PARENT would make the worker a child of the harness's parent otherwise) and
    /// returns its exit status.
    fn in_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child makes only raw syscalls and file reads, then _exits.
        match unsafe { libc::fork() } {
            0 => unsafe { libc::_exit(f()) },
            pid => {
                let mut status = 0;
                // SAFETY: our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status:#x}");
                libc::WEXITSTATUS(status)
            }
        }
    }

    /// Where the stand-in zygote of the test below leaves its worker's pid.
    fn worker_pid_file(cgroup: &std::path::Path) -> std::path::PathBuf {
        let name = cgroup.file_name().unwrap_or_default().to_string_lossy();
        std::env::temp_dir().join(format!("{name}.worker"))
    }

    #[test]
    fn a_worker_is_cloned_into_its_cgroup_as_a_child_of_the_zygotes_parent() {
        let mount = cgroup2_mount();
        let name = format!("kiln-clone-test-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).expect("create a v2 cgroup");
        // SAFETY: setting a variable read by the forked child below, before it forks.
        unsafe { std::env::set_var("KILN_CLONE_TEST_DIR", &dir) };
        // In a child (standing in for the zygote): clone a worker into the cgroup and check
        // the worker's parent is the child's parent (this test process) and its cgroup.
        let code = in_child(|| {
            let dir = std::env::var_os("KILN_CLONE_TEST_DIR").expect("dir");
            let Ok(fd) = open_cgroup(std::path::Path::new(&dir)) else {
                return 10;
            };
            match clone_worker(Some(&fd)) {
                Ok(Cloned::Child) => loop {
                    // SAFETY: pause is async-signal-safe.
                    unsafe { libc::pause() };
                },
                Ok(Cloned::Parent { pid, pidfd }) => {
                    // For the test process, which reaps it: waitpid(-1) there would steal the
                    // children of tests running beside it.
                    let _ = std::fs::write(
                        worker_pid_file(std::path::Path::new(&dir)),
                        pid.to_string(),
                    );
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let ppid: i32 = stat
                        .rsplit_once(") ")
                        .and_then(|(_, r)| r.split(' ').nth(1)?.parse().ok())
                        .unwrap_or(0);
                    let cg =
                        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                    // SAFETY: pidfd_send_signal on the worker's pidfd.
                    unsafe {
                        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 9, 0, 0)
                    };
                    // SAFETY: getppid has no preconditions.
                    let expected = unsafe { libc::getppid() };
                    let name = std::path::Path::new(&dir)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if ppid != expected {
                        return 11;
                    }
                    if !cg.lines().any(|l| l == format!("0::/{name}")) {
                        return 12;
                    }
                    0
                }
                Err(_) => 13,
            }
        });
        // The worker, our child through CLONE_PARENT, was killed: reap it.
        let pid_file = worker_pid_file(&dir);
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let mut status = 0;
            // SAFETY: reaping the worker, our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(
            code, 0,
            "11: wrong parent, 12: wrong cgroup, 13: clone3 failed"
        );
    }

    #[test]
    fn clone_into_a_directory_that_is_not_a_v2_cgroup_fails_without_a_child() {
        // A v1 cgroup or any other directory: the kernel refuses before making a child, and
        // the zygote then clones without CLONE_INTO_CGROUP.
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = open_cgroup(dir.path()).expect("open");
        match clone_worker(Some(&fd)) {
            Err(_) => {}
            // SAFETY: leaving a child that should not exist.
            Ok(Cloned::Child) => unsafe { libc::_exit(0) },
            Ok(Cloned::Parent { .. }) => panic!("clone3 into a plain directory made a child"),
        }
    }
}
