//! Which containers share a shim process, and the lock that keeps two starts (or a start and
//! an idle server's exit) from racing.
//!
//! `KILN_SHIM_GROUPING` in containerd's environment chooses:
//! * unset (the default): the containers of a Kubernetes pod (those the CRI creates, which
//!   carry its sandbox id) share one shim, as runc's shim does, and every other container gets
//!   a shim of its own. A shim crash affects that pod, or that container.
//! * `container`: one shim per container, pods included.
//! * `pod`: as the default (pods share one; a container outside a pod gets its own).
//! * `namespace`: every container of a containerd namespace shares one shim. The blast radius
//!   is the namespace: if that shim dies, containerd cleans up every container it served (their
//!   workers are killed by the `delete` action). In exchange, a container costs no shim process
//!   at all and a start skips launching one.
//!
//! A shared shim stays up for `KILN_SHIM_IDLE_SECS` (default 10) after its last container is
//! deleted, so that a burst of short-lived containers reuses it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::{info, warn};

use crate::service::Service;

/// How containers are grouped into shim processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One shim per container.
    Container,
    /// One shim per Kubernetes pod; one per container outside a pod.
    Pod,
    /// One shim per containerd namespace.
    Namespace,
}

/// Where one container's shim is: its group's key, and whether the shim is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Names the shim (its socket).
    pub key: String,
    /// Whether other containers may share it.
    pub shared: bool,
    /// A pod's shim: it exits when its pod's sandbox is gone and it serves no container.
    pub pod: bool,
}

/// The CRI's annotation naming a container's pod sandbox.
const SANDBOX_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

impl Grouping {
    /// From `KILN_SHIM_GROUPING`; an unknown value is an error rather than a silent default.
    pub fn from_env() -> anyhow::Result<Grouping> {
        match std::env::var("KILN_SHIM_GROUPING").as_deref() {
            Ok("container") => Ok(Grouping::Container),
            Err(_) | Ok("") | Ok("pod") => Ok(Grouping::Pod),
            Ok("namespace") => Ok(Grouping::Namespace),
            Ok(other) => anyhow::bail!(
                "KILN_SHIM_GROUPING={other:?} is not one of container, pod, namespace"
            ),
        }
    }

    /// The shim of container `id`, whose bundle is `bundle`.
    pub fn group(self, id: &str, bundle: &Path) -> Group {
        let alone = Group {
            key: id.to_string(),
            shared: false,
            pod: false,
        };
        match self {
            Grouping::Container => alone,
            Grouping::Namespace => Group {
                key: "kiln-namespace".to_string(),
                shared: true,
                pod: false,
            },
            Grouping::Pod => match sandbox_id(bundle) {
                Some(sandbox) => Group {
                    key: sandbox,
                    shared: true,
                    pod: true,
                },
                None => alone,
            },
        }
    }
}

fn sandbox_id(bundle: &Path) -> Option<String> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("annotations")?
        .get(SANDBOX_ANNOTATION)?
        .as_str()
        .map(str::to_string)
}

/// How long a shared shim waits, idle, before exiting.
pub fn idle_timeout() -> Duration {
    let secs = std::env::var("KILN_SHIM_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.trim_start_matches("unix://"))
}

fn side_file(address: &str, ext: &str) -> PathBuf {
    let mut p = socket_path(address).into_os_string();
    p.push(ext);
    PathBuf::from(p)
}

/// An exclusive lock on the group: held by `start` while it finds or launches the server, and
/// by an idle server while it decides to exit.
pub struct Lock(#[allow(dead_code)] File);

/// Takes the group's lock, waiting for it.
pub fn lock(address: &str) -> std::io::Result<Lock> {
    let path = side_file(address, ".lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Lock(f))
}

/// Records that `start` just handed this server's address to containerd: a Create follows.
pub fn touch_lease(address: &str) {
    let _ = std::fs::write(side_file(address, ".lease"), b"");
}

/// Time since the last lease (a large value when there is none).
pub fn lease_age(address: &str) -> Duration {
    std::fs::metadata(side_file(address, ".lease"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or(Duration::MAX)
}

/// Removes the socket and its side files (under the lock, when the server exits).
pub fn remove(address: &str) {
    let _ = std::fs::remove_file(socket_path(address));
    let _ = std::fs::remove_file(side_file(address, ".lease"));
}

/// In a shared shim: exit once no container has been served, no Create is in flight, and no
/// `start` has handed out this shim's address, for the idle timeout. Decided under the group
/// lock, so a concurrent `start` either sees the socket gone (and launches a new server) or
/// hands out a server that is still there.
///
/// A pod's shim does not wait once its pod's sandbox has been deleted: no container of that
/// pod can come any more.
pub async fn exit_when_idle(service: Arc<Service>) {
    let Some(address) = service.shared_address.clone() else {
        return;
    };
    let idle = idle_timeout();
    loop {
        service.maybe_idle.notified().await;
        loop {
            if !service.pod_over() {
                tokio::time::sleep(idle).await;
            }
            if !service.table.is_idle() {
                break;
            }
            let addr = address.clone();
            let locked = tokio::task::spawn_blocking(move || lock(&addr)).await;
            let Ok(Ok(_lock)) = locked else {
                warn!("cannot take the shim group lock; staying up");
                break;
            };
            if !service.table.is_idle() {
                break;
            }
            if !service.pod_over() && lease_age(&address) < idle {
                continue;
            }
            info!("idle for {idle:?} with no containers; exiting");
            remove(&address);
            service.shut_down();
            return;
        }
    }
}
