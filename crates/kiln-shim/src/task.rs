//! One container, as a state machine: Created → Running → Stopped (or Created → Stopped when
//! its worker ends before Start), then deleted, which takes it out of the table. A task owns
//! its worker (by pidfd: a recycled pid is never signalled), its cgroup, its rootfs mount and
//! its exit, each stored once.
//!
//! The state lock orders the events as containerd's runc shim does: Start writes the start
//! byte and publishes TaskStart while holding it, and an exit is recorded under it, so a guest
//! that exits before Start has returned still has its TaskExit published after TaskStart.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::SystemTime;

use containerd_shim::protos::api;
use kiln_cgroups::Cgroup;
use kiln_worker::Stdio;
use kiln_worker::protocol::START_BYTE;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{Mutex, watch};

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit status, in shell convention.
    pub status: u32,
    /// When.
    pub at: SystemTime,
}

/// Where a task is in its life.
pub enum State {
    /// Set up and waiting; holds the channel that lets the worker start.
    Created(UnixStream),
    /// Running guest code.
    Running,
    /// Ended.
    Stopped(Exit),
}

/// Why a state change was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Start of a task that is not Created.
    #[error("container {0} is already running")]
    AlreadyRunning(String),
    /// Start or Kill of a task that ended.
    #[error("container {0} has already exited")]
    Exited(String),
    /// The worker went away before Start.
    #[error("container {id}: the worker is gone: {source}")]
    WorkerGone {
        /// The container.
        id: String,
        /// Why the start byte could not be written.
        source: std::io::Error,
    },
}

/// One container.
pub struct Task {
    /// The container id.
    pub id: String,
    /// This container's bundle.
    pub bundle: String,
    /// The worker's pid.
    pub pid: i32,
    pidfd: OwnedFd,
    /// Where the worker's stdio goes.
    pub stdio: Stdio,
    /// The rootfs the shim mounted, if it did.
    pub rootfs: Option<PathBuf>,
    /// The container's cgroup.
    pub cgroup: Option<Cgroup>,
    /// A Kubernetes pod's sandbox.
    pub pod_sandbox: bool,
    state: Mutex<State>,
    exited: watch::Sender<Option<Exit>>,
}

/// What a task is made of, once its worker has reported Ready.
pub struct Parts {
    /// The container id.
    pub id: String,
    /// Its bundle.
    pub bundle: String,
    /// The worker's pid.
    pub pid: i32,
    /// The worker's pidfd.
    pub pidfd: OwnedFd,
    /// The worker's channel.
    pub chan: UnixStream,
    /// Where its stdio goes.
    pub stdio: Stdio,
    /// The rootfs the shim mounted.
    pub rootfs: Option<PathBuf>,
    /// Its cgroup.
    pub cgroup: Option<Cgroup>,
    /// A Kubernetes pod's sandbox.
    pub pod_sandbox: bool,
}

impl Task {
    /// A task in state Created.
    pub fn new(p: Parts) -> Task {
        let (exited, _) = watch::channel(None);
        Task {
            id: p.id,
            bundle: p.bundle,
            pid: p.pid,
            pidfd: p.pidfd,
            stdio: p.stdio,
            rootfs: p.rootfs,
            cgroup: p.cgroup,
            pod_sandbox: p.pod_sandbox,
            state: Mutex::new(State::Created(p.chan)),
            exited,
        }
    }

    /// Lets the worker run guest code, then `published` (the TaskStart event) runs before any
    /// exit of this task is recorded.
    pub async fn start(
        &self,
        published: impl std::future::Future<Output = ()>,
    ) -> Result<(), StateError> {
        let mut state = self.state.lock().await;
        match &mut *state {
            State::Created(chan) => {
                chan.write_all(&[START_BYTE])
                    .await
                    .map_err(|source| StateError::WorkerGone {
                        id: self.id.clone(),
                        source,
                    })?;
                *state = State::Running;
            }
            State::Running => return Err(StateError::AlreadyRunning(self.id.clone())),
            State::Stopped(_) => return Err(StateError::Exited(self.id.clone())),
        }
        published.await;
        Ok(())
    }

    /// Records the worker's exit, which happened `at` (after any Start in progress has
    /// published its event).
    pub async fn stopped(&self, status: i32, at: SystemTime) -> Exit {
        let exit = Exit {
            status: status as u32,
            at,
        };
        let mut state = self.state.lock().await;
        *state = State::Stopped(exit);
        self.exited.send_replace(Some(exit));
        exit
    }

    /// The exit, if the task has ended.
    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    /// Waits for the task to end.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives in the task; unreachable while we hold it.
                return Exit {
                    status: kiln_worker::EXIT_KILLED as u32,
                    at: SystemTime::now(),
                };
            }
        }
    }

    /// containerd's view of the state.
    pub async fn status(&self) -> (api::Status, Option<Exit>) {
        if let Some(e) = self.exit() {
            return (api::Status::STOPPED, Some(e));
        }
        match &*self.state.lock().await {
            State::Created(_) => (api::Status::CREATED, None),
            State::Running => (api::Status::RUNNING, None),
            State::Stopped(e) => (api::Status::STOPPED, Some(*e)),
        }
    }

    /// Whether Start has not happened yet.
    pub async fn is_created(&self) -> bool {
        matches!(*self.state.lock().await, State::Created(_))
    }

    /// Sends `signal` to the worker through its pidfd.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        pidfd_send_signal(&self.pidfd, signal)
    }
}

/// `pidfd_send_signal(2)`: a signal to exactly the process the descriptor was made for.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        // A process that has ended (a zombie not reaped yet) cannot be signalled: not an error.
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Signals the process `pid` through a pidfd opened for it (so a pid that ends between
/// listing it and opening the pidfd is skipped, never a process that reused it afterwards).
pub fn signal_pid(pid: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_open with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e)
        };
    }
    // SAFETY: pidfd_open returned a new descriptor that we now own.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    pidfd_send_signal(&fd, signal)
}
