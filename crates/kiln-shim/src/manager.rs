//! The short-lived actions containerd runs the shim binary for: `start` and `delete`.
//!
//! Both run without an async runtime: `start` is on the path of every container start, and a
//! fork, a pipe and a file write need no executor.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use containerd_shim::Flags;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim::DeleteResponse;

use crate::group::{self, Grouping};
use crate::service::now_timestamp;

/// `start`: launch the server for this container's group and print its address.
///
/// The reply is the bare socket address. containerd 1.6 and 1.7 only understand that; 2.x
/// takes a bare address as a v2 shim, and Kiln serves the Task API under both names.
pub fn start(flags: &Flags) -> Result<()> {
    let primer = prime_cgroup_migration();
    // containerd passes runtime options on stdin; Kiln has none, but the pipe must be drained
    // so containerd's writer does not block.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);

    let grouping = Grouping::from_env()?;
    let bundle = std::env::current_dir().context("bundle directory")?;
    let shim = grouping.group(&flags.id, &bundle);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &shim.key);
    let path = address.trim_start_matches("unix://");
    // Held until the server listens, so a concurrent start for the same group waits and then
    // shares it instead of launching a second one. A per-container shim has no one to race.
    let _lock = if shim.shared {
        Some(group::lock(&address).context("lock the shim group")?)
    } else {
        None
    };
    if shim.shared && std::os::unix::net::UnixStream::connect(path).is_ok() {
        // A server for this group is already running: share it.
        group::touch_lease(&address);
        std::fs::write("address", &address).context("write the address file")?;
        reap(primer);
        return reply(&address);
    }

    let server = spawn_server(flags, &address)?;
    // The server closes this pipe once it listens (or dies): reading to the end is the
    // readiness handshake.
    let mut out = String::new();
    let mut ready = std::fs::File::from(server.ready);
    let _ = ready.read_to_string(&mut out);
    if let Ok(nix::sys::wait::WaitStatus::Exited(_, code)) =
        nix::sys::wait::waitpid(server.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    {
        bail!(
            "the shim server exited during start (status {code}): {}",
            out.trim()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = nix::sys::signal::kill(server.pid, nix::sys::signal::Signal::SIGKILL);
        bail!(
            "the shim server did not start listening on {address}: {}",
            out.trim()
        );
    }
    if shim.shared {
        group::touch_lease(&address);
    }
    std::fs::write("address", &address).context("write the address file")?;
    reap(primer);
    reply(&address)
}

/// The server process `start` launched.
struct Server {
    pid: nix::unistd::Pid,
    /// Reaches end of file once the server listens (or has died).
    ready: std::os::fd::OwnedFd,
}

/// Forks the long-lived server from `start` itself, rather than exec'ing the binary again:
/// `start` is single-threaded (no runtime has been built), so the child is a sound copy, and a
/// container start saves an exec and the dynamic loader's relocation of a large binary. The
/// child leaves containerd's process group and stdio: stdin and stderr are `/dev/null`,
/// stdout is the readiness pipe, which the server closes once it listens.
fn spawn_server(flags: &Flags, address: &str) -> Result<Server> {
    use std::os::fd::AsRawFd;
    let (read_end, write_end) = nix::unistd::pipe().context("readiness pipe")?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    let server_flags = Flags {
        debug: flags.debug,
        namespace: flags.namespace.clone(),
        id: flags.id.clone(),
        socket: address.to_string(),
        address: flags.address.clone(),
        publish_binary: flags.publish_binary.clone(),
        ..Flags::default()
    };
    // SAFETY: `start` has one thread (it builds no runtime and spawns no thread), so the child
    // is a complete copy of it; the child never returns into `start`'s code.
    match unsafe { nix::unistd::fork() }.context("fork the shim server")? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: setpgid, dup2 and close_range on descriptors this process owns.
            unsafe {
                // Its own process group: signals for containerd's group must not reach it.
                libc::setpgid(0, 0);
                libc::dup2(devnull.as_raw_fd(), 0);
                libc::dup2(write_end.as_raw_fd(), 1);
                libc::dup2(devnull.as_raw_fd(), 2);
                // Nothing else of `start`'s crosses, as an exec would have closed it: above all
                // the group lock, which the server would otherwise hold for its whole life
                // (the next `start` for the group would wait for it for ever).
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            }
            // Closed just now, with everything else above 2.
            std::mem::forget(read_end);
            std::mem::forget(write_end);
            std::mem::forget(devnull);
            // Its command line says `start`, which it no longer is.
            let args: Vec<String> = std::env::args().filter(|a| a != "start").collect();
            kiln_worker::process::set_cmdline(&args.join("\0"));
            let code = match crate::server::serve(&server_flags) {
                Ok(()) => 0,
                Err(e) => {
                    // Where `start`'s caller sees it: the readiness pipe is still stdout.
                    println!("{e:#}");
                    1
                }
            };
            // SAFETY: leaving the forked server without returning into `start`.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => Ok(Server {
            pid: child,
            ready: read_end,
        }),
    }
}

/// The environment variable that turns the cgroup migration primer off (`0`), for A/B
/// measurements.
const PRIME_ENV: &str = "KILN_CGROUP_PRIME";

/// Starts the RCU grace period that the container's worker would otherwise wait for when it
/// joins its cgroup, 5–15 ms before the worker exists.
///
/// Every cgroup migration takes the kernel's global `cgroup_threadgroup_rwsem` for writing, and
/// the first writer after a quiet period waits a full RCU grace period for it; one that comes
/// while that wait is in progress, or within about a grace period after it, does not (see
/// [`kiln_cgroups::Layout::own_procs_file`]). That wait was the largest single item of a warm
/// container start on cgroup v1. `start` is the first moment the shim knows a container is
/// coming, and the worker joins its cgroup some 10 ms later, after the server has started and
/// containerd has sent Create; so a child forked here moves itself to the cgroup it is already
/// in, and the worker's own migration then finds the lock's grace period already under way or
/// done. The child is a separate process so that neither `start` nor containerd, which waits
/// for `start` to exit, ever waits for the grace period; its stdio is closed at once so that
/// containerd's read of `start`'s output does not wait for it either.
///
/// Best effort: any failure only means the worker waits as it would have anyway.
fn prime_cgroup_migration() -> Option<nix::unistd::Pid> {
    if std::env::var_os(PRIME_ENV).is_some_and(|v| v == "0") {
        return None;
    }
    // SAFETY: `start` has one thread (it builds no runtime and spawns no thread), so the child
    // is a complete copy that may allocate and read files; it never returns into `start`.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: closing our own stdio, so containerd's read of `start`'s output does not
            // wait for this child.
            unsafe {
                for fd in 0..=2 {
                    libc::close(fd);
                }
            }
            // The layout is found here, not in `start`: reading and parsing mountinfo costs
            // a fraction of a millisecond that `start`'s caller need not wait for.
            if let Some(procs) = primer_procs_file() {
                migrate_self(&procs);
            }
            // SAFETY: leaving the child without returning into `start`.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => Some(child),
        Err(_) => None,
    }
}

/// The `cgroup.procs` of the cgroup this process is in, in a v1 hierarchy; `None` on v2,
/// where the zygote clones the worker straight into its cgroup and nothing waits for the
/// grace period (a primer would only hold cgroup_mutex, which that clone and the cgroup's
/// mkdir both need, for the length of one).
fn primer_procs_file() -> Option<std::path::PathBuf> {
    let layout = kiln_cgroups::Layout::detect().ok()?;
    if layout.version() == 2 {
        return None;
    }
    layout.own_procs_file()
}

/// Writes `0` (this process) to `procs`: a migration to the cgroup it is already in.
fn migrate_self(procs: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .and_then(|mut f| f.write_all(b"0"));
}

/// Collects the primer if it has finished; if not, it is reparented and reaped by init.
fn reap(primer: Option<nix::unistd::Pid>) {
    if let Some(pid) = primer {
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
}

fn reply(address: &str) -> Result<()> {
    let mut stdout = std::io::stdout();
    stdout.write_all(address.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `delete`: containerd's cleanup after a shim disappeared. Kill whatever is left in the
/// container's cgroup, remove it, unmount the rootfs, and report the container as killed.
pub fn delete(flags: &Flags) -> Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("bundle directory")?
    } else {
        flags.bundle.clone().into()
    };
    cleanup_bundle(&bundle, &flags.namespace, &flags.id);
    let mut resp = DeleteResponse::new();
    resp.exit_status = 128 + libc::SIGKILL as u32;
    resp.exited_at = Some(now_timestamp()).into();
    let bytes = resp.write_to_bytes()?;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

/// Best-effort removal of everything a container may have left: its cgroup's processes and
/// directories and its rootfs mount.
pub fn cleanup_bundle(bundle: &Path, namespace: &str, id: &str) {
    if let Ok(spec) = oci_spec::runtime::Spec::load(bundle.join("config.json")) {
        let path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(layout) = kiln_cgroups::Layout::detect()
            && let Ok(cg) = kiln_cgroups::Cgroup::open(
                &layout,
                &path,
                &crate::service::default_cgroup(namespace, id),
            )
            && let Err(e) = cg.kill_and_remove(crate::create::CLEANUP_WITHIN)
        {
            log::warn!("cleanup {id}: remove cgroup: {e}");
        }
    }
    crate::service::unmount_rootfs(&bundle.join("rootfs"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primer_writes_itself_to_the_procs_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let procs = dir.path().join("cgroup.procs");
        std::fs::write(&procs, "").expect("create");
        migrate_self(&procs);
        assert_eq!(std::fs::read_to_string(&procs).expect("read"), "0");
    }
}
