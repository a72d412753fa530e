//! The shim's side of the zygote: spawn requests out, spawn replies in, never blocking.
//!
//! Requests are sent and replies read through the tokio reactor (the socket is non-blocking),
//! so a zygote that is slow to answer, or a burst of Creates, never stalls the shim's other
//! requests, and neither side can fill the other's buffer while blocked in a send. Each request
//! has a token, carried in the packet's header; a reply is matched to its request by it.
//!
//! A zygote that dies is replaced by a fresh one, exec'd (forking the threaded shim would be
//! unsound); requests in flight to the dead one fail with a clear error. No worker is lost
//! with it: workers are the shim's children (see `exits`).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_worker::SpawnRequest;
use kiln_worker::protocol::{self, MAX_PACKET, ZygoteEvent};
use kiln_worker::zygote::{EXEC_FD, ZygoteHandle, control_socket};
use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::exits::Exits;

/// A spawned worker, as the shim holds it.
pub struct Spawned {
    /// The worker's pid.
    pub pid: i32,
    /// Its pidfd: the only way the shim signals it.
    pub pidfd: OwnedFd,
    /// The shim's end of the worker's channel.
    pub chan: UnixStream,
    /// Resolves with the worker's exit status.
    pub exit: oneshot::Receiver<i32>,
}

type Reply = oneshot::Sender<Result<(i32, OwnedFd, oneshot::Receiver<i32>), String>>;

/// One zygote and the requests waiting for it.
struct Conn {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
    pending: Mutex<HashMap<u64, Reply>>,
}

impl Conn {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, why: &str) {
        for (_, reply) in self.pending().drain() {
            let _ = reply.send(Err(why.to_string()));
        }
    }
}

/// Talks to the zygote, replacing it when it dies.
pub struct ZygoteClient {
    exits: Arc<Exits>,
    conn: Mutex<Option<Arc<Conn>>>,
    next_token: AtomicU64,
}

impl ZygoteClient {
    /// Wraps the zygote forked at start-up.
    pub fn start(handle: ZygoteHandle, exits: Arc<Exits>) -> std::io::Result<Arc<ZygoteClient>> {
        let client = Arc::new(ZygoteClient {
            exits,
            conn: Mutex::new(None),
            next_token: AtomicU64::new(1),
        });
        client.attach(handle)?;
        Ok(client)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Conn>>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attach(self: &Arc<Self>, handle: ZygoteHandle) -> std::io::Result<Arc<Conn>> {
        set_nonblocking(handle.sock.as_raw_fd())?;
        let conn = Arc::new(Conn {
            pid: handle.pid,
            // SAFETY: the AsyncFd owns the descriptor, so it stays open while registered.
            fd: unsafe { AsyncFd::register(handle.sock) }.map_err(|e| e.into_parts().1)?,
            pending: Mutex::new(HashMap::new()),
        });
        *self.slot() = Some(conn.clone());
        tokio::spawn(read_replies(self.clone(), conn.clone()));
        Ok(conn)
    }

    /// Whether `pid` is the current zygote.
    pub fn is_zygote(&self, pid: i32) -> bool {
        self.slot().as_ref().is_some_and(|c| c.pid == pid)
    }

    /// The reaper saw the zygote `pid` exit.
    pub fn zygote_exited(&self, pid: i32, status: i32) {
        let conn = {
            let mut slot = self.slot();
            match slot.as_ref() {
                Some(c) if c.pid == pid => slot.take(),
                _ => None,
            }
        };
        if let Some(conn) = conn {
            error!("the zygote {pid} exited ({status}); the next Create starts a new one");
            conn.fail_all("the Kiln zygote exited while forking this worker");
        }
    }

    /// The live zygote, or a fresh one.
    fn live(self: &Arc<Self>) -> Result<Arc<Conn>, String> {
        if let Some(c) = self.slot().clone() {
            return Ok(c);
        }
        let handle = exec_zygote().map_err(|e| format!("start a new Kiln zygote: {e}"))?;
        info!("started zygote {} to replace the one that died", handle.pid);
        self.attach(handle)
            .map_err(|e| format!("talk to the new Kiln zygote: {e}"))
    }

    /// Asks the zygote for a worker and waits for its pid and pidfd.
    pub async fn spawn(self: &Arc<Self>, req: &SpawnRequest) -> Result<Spawned, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let packet = protocol::encode_request(token, req)
            .map_err(|e| format!("the request for this container cannot be sent: {e}"))?;
        let conn = self.live()?;
        let (reply_tx, reply_rx) = oneshot::channel();
        conn.pending().insert(token, reply_tx);
        if let Err(e) = send(&conn, &packet, theirs.as_raw_fd()).await {
            conn.pending().remove(&token);
            return Err(format!("send the spawn request to the zygote: {e}"));
        }
        drop(theirs);
        let (pid, pidfd, exit) = reply_rx
            .await
            .map_err(|_| "the zygote went away during spawn".to_string())??;
        let std_stream = std::os::unix::net::UnixStream::from(ours);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| format!("worker channel: {e}"))?;
        let chan = UnixStream::from_std(std_stream).map_err(|e| format!("worker channel: {e}"))?;
        Ok(Spawned {
            pid,
            pidfd,
            chan,
            exit,
        })
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends one packet with the worker's socket, waiting (not blocking) while the zygote's
/// side is full.
async fn send(conn: &Conn, packet: &[u8], chan: RawFd) -> std::io::Result<()> {
    let fds = [chan];
    loop {
        let mut guard = conn.fd.writable().await?;
        let sent = guard.try_io(|fd| {
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                fd.get_ref().as_raw_fd(),
                &[IoSlice::new(packet)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Reads the zygote's replies until it closes its socket.
async fn read_replies(client: Arc<ZygoteClient>, conn: Arc<Conn>) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let mut guard = match conn.fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("zygote socket: {e}");
                break;
            }
        };
        let got = guard.try_io(|fd| receive(fd.get_ref().as_raw_fd(), &mut buf));
        let (n, pidfd) = match got {
            Err(_would_block) => continue,
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            Ok(Err(e)) => {
                error!("zygote socket: {e}");
                break;
            }
        };
        if n == 0 {
            debug!("the zygote {} closed its socket", conn.pid);
            break;
        }
        let packet = &buf[..n];
        let (token, event) = match protocol::decode_event(packet) {
            Ok(v) => v,
            Err(e) => {
                warn!("undecodable reply from the zygote: {e}");
                if let Some(token) = protocol::token(packet)
                    && let Some(reply) = conn.pending().remove(&token)
                {
                    let _ = reply.send(Err(format!("the zygote's reply could not be read: {e}")));
                }
                continue;
            }
        };
        let Some(reply) = conn.pending().remove(&token) else {
            warn!("a zygote reply for no request ({token})");
            continue;
        };
        let _ = reply.send(match (event, pidfd) {
            // The exit route is made here, in the order of the replies, so that an exit
            // reaped before this reply pairs with this worker and no later one of the same pid.
            (ZygoteEvent::Spawned { pid }, Some(pidfd)) => {
                Ok((pid, pidfd, client.exits.expect(pid)))
            }
            (ZygoteEvent::Spawned { pid }, None) => {
                Err(format!("worker {pid} came without a pidfd"))
            }
            (ZygoteEvent::SpawnFailed { error }, _) => Err(error),
        });
    }
    conn.fail_all("the Kiln zygote closed its socket while forking this worker");
    let mut slot = client.slot();
    if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        slot.take();
    }
}

fn receive(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let mut fd = None;
    for c in msg.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok((msg.bytes, fd))
}

/// Starts a zygote by exec'ing this binary (`… zygote`, its control socket at [`EXEC_FD`]).
fn exec_zygote() -> std::io::Result<ZygoteHandle> {
    let (ours, theirs) = control_socket().map_err(std::io::Error::other)?;
    let exe = std::env::current_exe()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("zygote")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl,
    // which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == EXEC_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, EXEC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    // The reaper collects it: the Child handle is not waited on.
    Ok(ZygoteHandle {
        pid: child.id() as i32,
        sock: ours,
    })
}
