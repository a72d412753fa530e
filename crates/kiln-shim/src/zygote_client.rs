//! The shim's side of the zygote: spawn requests out, spawn replies and exits in.
//!
//! Exits are routed by pid to the container that owns the worker. The zygote sends a worker's
//! spawn reply before it can reap that worker, and one reader handles both in order, so a
//! route always exists before its exit arrives, however fast the guest is.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_worker::protocol::MAX_PACKET;
use kiln_worker::zygote::{ZygoteHandle, send_spawn};
use kiln_worker::{SpawnRequest, ZygoteEvent};
use log::{debug, error, warn};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, socketpair};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

type SpawnReply = oneshot::Sender<Result<i32, String>>;

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, (SpawnReply, oneshot::Sender<i32>)>,
    by_pid: HashMap<i32, oneshot::Sender<i32>>,
    dead: bool,
}

/// A spawned worker, as the shim holds it.
pub struct Spawned {
    /// The worker's pid.
    pub pid: i32,
    /// The shim's end of the worker's channel.
    pub chan: UnixStream,
    /// Resolves with the worker's exit status.
    pub exit: oneshot::Receiver<i32>,
}

/// Talks to the zygote.
pub struct ZygoteClient {
    fd: AsyncFd<OwnedFd>,
    routes: Mutex<Routes>,
    next_token: AtomicU64,
}

impl ZygoteClient {
    /// Wraps the zygote's socket and starts reading its events.
    pub fn start(handle: ZygoteHandle) -> std::io::Result<Arc<ZygoteClient>> {
        // SAFETY: the AsyncFd owns the descriptor, so it stays open while registered.
        let fd = unsafe { AsyncFd::register(handle.sock) }.map_err(|e| e.into_parts().1)?;
        let client = Arc::new(ZygoteClient {
            fd,
            routes: Mutex::new(Routes::default()),
            next_token: AtomicU64::new(1),
        });
        tokio::spawn(read_events(client.clone()));
        Ok(client)
    }

    /// Asks the zygote for a worker and waits for its pid.
    pub async fn spawn(&self, mut req: SpawnRequest) -> Result<Spawned, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        req.token = token;
        let (reply_tx, reply_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        {
            let mut routes = self.lock();
            if routes.dead {
                return Err("the Kiln zygote has exited; this shim cannot start containers".into());
            }
            routes.pending.insert(token, (reply_tx, exit_tx));
        }
        if let Err(e) = send_spawn(self.fd.get_ref().as_raw_fd(), &req, &theirs) {
            self.lock().pending.remove(&token);
            return Err(e);
        }
        drop(theirs);
        let pid = reply_rx
            .await
            .map_err(|_| "the zygote went away during spawn".to_string())??;
        let std_stream = std::os::unix::net::UnixStream::from(ours);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| format!("worker channel: {e}"))?;
        let chan = UnixStream::from_std(std_stream).map_err(|e| format!("worker channel: {e}"))?;
        Ok(Spawned {
            pid,
            chan,
            exit: exit_rx,
        })
    }

    /// Delivers an exit status to whoever waits for `pid` (also used for workers reaped by the
    /// shim itself after the zygote died).
    pub fn route_exit(&self, pid: i32, status: i32) {
        match self.lock().by_pid.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => debug!("exit of unknown pid {pid} ({status})"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, ev: ZygoteEvent) {
        match ev {
            ZygoteEvent::Spawned { token, pid } => {
                let mut routes = self.lock();
                if let Some((reply, exit)) = routes.pending.remove(&token) {
                    routes.by_pid.insert(pid, exit);
                    let _ = reply.send(Ok(pid));
                }
            }
            ZygoteEvent::SpawnFailed { token, error } => {
                if let Some((reply, _)) = self.lock().pending.remove(&token) {
                    let _ = reply.send(Err(error));
                }
            }
            ZygoteEvent::Exited { pid, status } => self.route_exit(pid, status),
        }
    }

    fn mark_dead(&self) {
        let mut routes = self.lock();
        routes.dead = true;
        for (_, (reply, _)) in routes.pending.drain() {
            let _ = reply.send(Err("the Kiln zygote exited".to_string()));
        }
    }
}

async fn read_events(client: Arc<ZygoteClient>) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let mut guard = match client.fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("zygote socket: {e}");
                break;
            }
        };
        let got = guard.try_io(|fd| {
            recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                .map_err(std::io::Error::from)
        });
        let n = match got {
            Err(_would_block) => continue,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            Ok(Err(e)) => {
                error!("zygote socket: {e}");
                break;
            }
        };
        if n == 0 {
            error!("the zygote closed its socket");
            break;
        }
        match serde_json::from_slice::<ZygoteEvent>(&buf[..n]) {
            Ok(ev) => client.handle(ev),
            Err(e) => warn!("undecodable zygote event: {e}"),
        }
    }
    client.mark_dead();
}
