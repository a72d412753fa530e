//! Worker exits: the shim is every worker's parent (the zygote clones them with
//! `CLONE_PARENT`), so it reaps them on SIGCHLD and routes each status by pid to the container
//! waiting for it.
//!
//! A worker can exit, and be reaped, before the zygote's reply announcing its pid has been read
//! (a setup that fails at once). Such an exit is kept, in order, until the announcement claims
//! it. A pid cannot be reused before it is reaped, and the zygote announces a worker before it
//! clones the next one, so announcements and kept exits of the same pid pair up in order.
//! The shim is not a child subreaper: a worker's own children (the cache fill, which may
//! outlive it) go to init, and the only children the shim ever reaps are its zygote and its
//! workers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::zygote_client::ZygoteClient;

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, oneshot::Sender<i32>>,
    early: HashMap<i32, VecDeque<i32>>,
}

/// The routes from worker pids to the containers that wait for them.
#[derive(Default)]
pub struct Exits {
    inner: Mutex<Inner>,
}

impl Exits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit status of the worker `pid`, just announced by the zygote.
    pub fn expect(&self, pid: i32) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        let early = inner.early.get_mut(&pid).and_then(VecDeque::pop_front);
        if inner.early.get(&pid).is_some_and(VecDeque::is_empty) {
            inner.early.remove(&pid);
        }
        match early {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                inner.waiting.insert(pid, tx);
            }
        }
        rx
    }

    /// A reaped worker's status.
    pub fn deliver(&self, pid: i32, status: i32) {
        let mut inner = self.lock();
        match inner.waiting.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                debug!("worker {pid} exited ({status}) before its spawn reply was read");
                inner.early.entry(pid).or_default().push_back(status);
            }
        }
    }
}

/// Reaps every ended child, routing workers' statuses to their containers and telling the
/// zygote client when a zygote died. Runs for the shim's life.
pub async fn reap(exits: Arc<Exits>, zygote: Arc<ZygoteClient>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGCHLD ({e}); worker exits will not be seen");
            return;
        }
    };
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    break;
                }
                Ok(status) => {
                    let Some(pid) = status.pid().map(Pid::as_raw) else {
                        continue;
                    };
                    let Some(code) = kiln_worker::status::from_wait(status) else {
                        continue;
                    };
                    if zygote.is_zygote(pid) {
                        zygote.zygote_exited(pid, code);
                    } else {
                        exits.deliver(pid, code);
                    }
                }
            }
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_reaped_before_its_announcement_is_kept_in_order() {
        let exits = Exits::default();
        // Two workers in a row got pid 7; both were reaped before either was announced.
        exits.deliver(7, 1);
        exits.deliver(7, 2);
        let mut first = exits.expect(7);
        let mut second = exits.expect(7);
        assert_eq!(first.try_recv(), Ok(1));
        assert_eq!(second.try_recv(), Ok(2));
        // An announced worker gets its exit when it comes.
        let mut third = exits.expect(7);
        assert!(third.try_recv().is_err());
        exits.deliver(7, 3);
        assert_eq!(third.try_recv(), Ok(3));
    }
}
