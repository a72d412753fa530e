//! Create: from containerd's request to a worker that is set up and waiting for Start.
//!
//! The steps that touch files and syscalls (the log pipe, `config.json`, the rootfs mount, the
//! plan, the seccomp filter, the cgroup) run on a blocking thread, never on the shim's async
//! runtime; then the zygote forks the worker, and its one-line setup report is read with a size
//! and a time limit, so a worker whose setup hangs fails Create with a clear error.
//!
//! Whatever a failed or cancelled Create made is taken back by [`Undo`], a drop guard: the
//! worker (killed through its pidfd), the cgroup and the rootfs mount.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::protos::api::CreateTaskRequest;
use kiln_cgroups::{Cgroup, Layout};
use kiln_worker::protocol::{MAX_REPORT, MODULE_BYTE};
use kiln_worker::{SpawnRequest, Stdio, WorkerReport};
use log::{debug, warn};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use crate::service::{Service, default_cgroup, unmount_rootfs};
use crate::task::{Parts, Task, pidfd_send_signal};

/// How long a worker may take to set up (`KILN_SETUP_TIMEOUT_SECS`, default 120): a cache miss
/// compiled with `KILN_FIRST_START=optimized` on a loaded node is the slowest legitimate case.
fn setup_timeout() -> Duration {
    let secs = std::env::var("KILN_SETUP_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// How long a cleanup waits for a cgroup's processes to exit before it gives up removing it.
pub const CLEANUP_WITHIN: Duration = Duration::from_secs(5);

/// What a Create made so far, taken back when the guard is dropped unarmed.
#[derive(Default)]
pub struct Undo {
    made: Made,
}

/// The things themselves (without a destructor of their own, so the guard can move them to a
/// blocking thread).
#[derive(Default)]
struct Made {
    rootfs: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    worker: Option<OwnedFd>,
}

impl Made {
    fn run(self) {
        if let Some(pidfd) = &self.worker {
            let _ = pidfd_send_signal(pidfd, libc::SIGKILL);
        }
        if let Some(cg) = &self.cgroup
            && let Err(e) = cg.kill_and_remove(CLEANUP_WITHIN)
        {
            warn!("remove cgroup after a failed create: {e}");
        }
        if let Some(rootfs) = &self.rootfs {
            unmount_rootfs(rootfs);
        }
    }

    fn is_empty(&self) -> bool {
        self.rootfs.is_none() && self.cgroup.is_none() && self.worker.is_none()
    }
}

impl Undo {
    /// Disarms the guard: everything it holds now belongs to the task.
    fn disarm(&mut self) {
        self.made = Made::default();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let made = std::mem::take(&mut self.made);
        if made.is_empty() {
            return;
        }
        // Removing a cgroup waits for the kernel: on a blocking thread when there is a runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || made.run());
            }
            Err(_) => made.run(),
        }
    }
}

/// The blocking part of Create.
struct Prepared {
    plan: kiln_plan::Plan,
    seccomp: Option<kiln_sandbox::seccomp::Filter>,
    cgroup: Cgroup,
    rootfs: Option<PathBuf>,
    fs_dev: Option<u64>,
    undo: Undo,
}

/// The bundle read and the rootfs mounted.
struct Mounted {
    spec: oci_spec::runtime::Spec,
    rootfs: PathBuf,
    mounted: Option<PathBuf>,
    /// The filesystem the rootfs's files are on, for the worker's module index.
    fs_dev: Option<u64>,
    undo: Undo,
}

/// What the blocking part found.
enum Stage {
    Prepared(Box<Prepared>),
    /// The entrypoint is not a file of the rootfs: it may be a layer of the image.
    NoFile(Box<(Mounted, kiln_plan::PlanError)>),
}

fn mount(req: &CreateTaskRequest) -> Result<Mounted, String> {
    let mut undo = Undo::default();
    let bundle = PathBuf::from(&req.bundle);
    let t0 = Instant::now();
    if let Err(e) = crate::logging::add(&req.id, &bundle) {
        debug!(id = req.id.as_str(); "no log pipe in {}: {e}", bundle.display());
    }
    let t_log = t0.elapsed();
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .map_err(|e| format!("read config.json: {e}"))?;
    debug!(id = req.id.as_str(); "{}: log pipe {t_log:?}, config.json {:?}", req.id, t0.elapsed());
    if req.terminal {
        return Err("terminal: true is not supported by Kiln yet (run without -t / tty)".into());
    }
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    let rootfs = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    let mut mounted = None;
    // A pod sandbox runs nothing from its image: its rootfs is not mounted.
    if !req.rootfs.is_empty() && !kiln_plan::is_pod_sandbox(&spec) {
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| format!("create {}: {e}", rootfs.display()))?;
        for m in &req.rootfs {
            let typ = Some(m.type_.as_str()).filter(|s| !s.is_empty());
            let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
            containerd_shim::mount::mount_rootfs(typ, source, &m.options, &rootfs)
                .map_err(|e| format!("mount rootfs ({}): {e}", m.type_))?;
            undo.made.rootfs = Some(rootfs.clone());
            mounted = Some(rootfs.clone());
        }
    }
    let fs_dev = files_device(&req.rootfs, &rootfs);
    Ok(Mounted {
        spec,
        rootfs,
        mounted,
        fs_dev,
        undo,
    })
}

/// The device whose inode numbers the files of the mounted `rootfs` report, if there is one
/// (the worker's module index identifies a file by device and inode: kiln_cache::Index). A
/// plain directory or bind mount reports its filesystem's own. An overlay reports a device of
/// its own, new with every mount; when all its layers are on one filesystem it reports their
/// files' real inode numbers, so that filesystem's device is the one. Anything else: none.
fn files_device(mounts: &[containerd_shim::protos::api::Mount], rootfs: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let on_overlay = nix::sys::statfs::statfs(rootfs)
        .map(|s| s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
        .ok()?;
    if !on_overlay {
        return std::fs::metadata(rootfs).ok().map(|m| m.dev());
    }
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let mut layers = Vec::new();
    for o in &m.options {
        if let Some(l) = o.strip_prefix("lowerdir=") {
            layers.extend(l.split(':'));
        } else if let Some(u) = o.strip_prefix("upperdir=") {
            layers.push(u);
        }
    }
    let mut devs = layers
        .iter()
        .map(|l| std::fs::metadata(l).ok().map(|m| m.dev()));
    let first = devs.next()??;
    devs.all(|d| d == Some(first)).then_some(first)
}

fn prepare(
    req: &CreateTaskRequest,
    namespace: &str,
    host: &kiln_plan::Host,
    layout: &Layout,
) -> Result<Stage, String> {
    let t0 = Instant::now();
    let m = mount(req)?;
    let t_mount = t0.elapsed();
    match kiln_plan::plan(&req.id, &m.spec, &m.rootfs, host) {
        Ok(plan) => {
            let t_plan = t0.elapsed();
            let p = finish(req, namespace, layout, m, plan)?;
            debug!(
                id = req.id.as_str();
                "prepare {}: bundle and rootfs {t_mount:?}, plan {t_plan:?}, seccomp and cgroup {:?}",
                req.id,
                t0.elapsed()
            );
            Ok(Stage::Prepared(Box::new(p)))
        }
        Err(e @ kiln_plan::PlanError::EntrypointNotFound { .. }) => {
            Ok(Stage::NoFile(Box::new((m, e))))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The plan of a container whose module is `layer`, then [`finish`].
fn prepare_layer(
    req: &CreateTaskRequest,
    namespace: &str,
    host: &kiln_plan::Host,
    layout: &Layout,
    m: Mounted,
    layer: &kiln_plan::ImageLayer,
) -> Result<Prepared, String> {
    let plan = kiln_plan::plan_with_layer(&req.id, &m.spec, &m.rootfs, host, layer)
        .map_err(|e| e.to_string())?;
    finish(req, namespace, layout, m, plan)
}

fn finish(
    req: &CreateTaskRequest,
    namespace: &str,
    layout: &Layout,
    m: Mounted,
    plan: kiln_plan::Plan,
) -> Result<Prepared, String> {
    let Mounted {
        mounted,
        fs_dev,
        mut undo,
        ..
    } = m;
    let seccomp = crate::seccomp::filter(&plan.sandbox.seccomp)?;
    let cgroup = Cgroup::create(
        layout,
        &plan.cgroups_path,
        &default_cgroup(namespace, &req.id),
        &plan.resources,
    )
    .map_err(|e| format!("cgroup: {e}"))?;
    undo.made.cgroup = Some(cgroup.clone());
    Ok(Prepared {
        plan,
        seccomp,
        cgroup,
        rootfs: mounted,
        fs_dev,
        undo,
    })
}

/// The blocking stages, then (for a module that is not in the rootfs) the image's layer.
async fn prepare_all(svc: &Service, req: &CreateTaskRequest) -> Result<Prepared, String> {
    let layout = svc.layout()?;
    let host = *svc.host();
    let namespace = svc.namespace.clone();
    let r = req.clone();
    let (l, ns) = (layout.clone(), namespace.clone());
    let stage = tokio::task::spawn_blocking(move || prepare(&r, &ns, &host, &l))
        .await
        .map_err(|e| format!("prepare the container: {e}"))??;
    let (mounted, not_found) = match stage {
        Stage::Prepared(p) => return Ok(*p),
        Stage::NoFile(b) => *b,
    };
    let arg0 = mounted
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.args().as_ref())
        .and_then(|a| a.first().cloned())
        .unwrap_or_default();
    let layer = match svc.images.wasm_layer(&namespace, &req.id, &arg0).await {
        Ok(Some(l)) => l,
        Ok(None) => return Err(not_found.to_string()),
        Err(crate::image::LayerError::Choose(e)) => return Err(e),
        Err(crate::image::LayerError::Read(e)) => {
            return Err(format!(
                "{not_found}; and its image could not be read for a Wasm layer: {e}"
            ));
        }
    };
    debug!(
        id = req.id.as_str();
        "{}: the module is layer {} ({}, {} bytes) of the image",
        req.id, layer.digest, layer.media_type, layer.size
    );
    let r = req.clone();
    tokio::task::spawn_blocking(move || {
        prepare_layer(&r, &namespace, &host, &layout, mounted, &layer)
    })
    .await
    .map_err(|e| format!("prepare the container: {e}"))?
}

/// Reads the worker's one-line report, at most [`MAX_REPORT`] bytes.
async fn read_report(chan: &mut tokio::net::UnixStream) -> Result<WorkerReport, String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        let n = chan
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read the worker's report: {e}"))?;
        if n == 0 {
            return Err("the worker exited during setup".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            return serde_json::from_slice(&buf[..end])
                .map_err(|e| format!("bad worker report: {e}"));
        }
        if buf.len() > MAX_REPORT {
            return Err(format!(
                "the worker's report is longer than {MAX_REPORT} bytes"
            ));
        }
    }
}

/// Hands the worker the memfd holding its module.
async fn send_fd(chan: &tokio::net::UnixStream, fd: &OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    loop {
        chan.writable()
            .await
            .map_err(|e| format!("send the module to the worker: {e}"))?;
        let sent = chan.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                chan.as_raw_fd(),
                &[std::io::IoSlice::new(&[MODULE_BYTE])],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("send the module to the worker: {e}")),
        }
    }
}

/// Everything Create does; on error, what it made is gone by the time the error is seen.
pub async fn create(
    svc: &Service,
    req: &CreateTaskRequest,
) -> Result<(Task, oneshot::Receiver<i32>), String> {
    let t0 = Instant::now();
    // An earlier container with this id may still be cleaning up its cgroup.
    svc.table.cleanups_of(&req.id).await;
    let Prepared {
        plan,
        seccomp,
        cgroup,
        rootfs,
        fs_dev,
        mut undo,
    } = prepare_all(svc, req).await?;
    let t_plan = t0.elapsed();

    let stdio = Stdio {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
    };
    let role = plan.role;
    let layer = match &plan.module {
        kiln_plan::ModuleSource::Layer { digest, .. } => Some(digest.clone()),
        _ => None,
    };
    let spawn = SpawnRequest {
        plan,
        stdio: stdio.clone(),
        cgroup_procs: cgroup
            .dirs()
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect(),
        clone_into: (cgroup.version() == 2)
            .then(|| cgroup.dirs().into_iter().next())
            .flatten(),
        cache_root: svc.cache_root.clone(),
        log_path: Some(Path::new(&req.bundle).join("log")),
        seccomp,
        fs_dev,
    };
    let spawned = svc.zygote.spawn(&spawn).await?;
    undo.made.worker = Some(
        spawned
            .pidfd
            .try_clone()
            .map_err(|e| format!("keep the worker's pidfd: {e}"))?,
    );
    let t_spawn = t0.elapsed();

    let mut chan = spawned.chan;
    let timeout = setup_timeout();
    let setup = async {
        loop {
            match read_report(&mut chan).await? {
                WorkerReport::NeedModule { digest } => {
                    if layer.as_deref() != Some(digest.as_str()) {
                        return Err(format!(
                            "the worker asked for {digest}, which is not the container's layer"
                        ));
                    }
                    let fd = svc.images.blob(&svc.namespace, &digest).await?;
                    send_fd(&chan, &fd).await?;
                    debug!(id = req.id.as_str(); "{}: sent layer {digest} to the worker", req.id);
                }
                other => return Ok(other),
            }
        }
    };
    let report = match tokio::time::timeout(timeout, setup).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "the worker did not finish its setup within {timeout:?} \
                 (KILN_SETUP_TIMEOUT_SECS)"
            ));
        }
    };
    if let WorkerReport::Failed { error } = report {
        return Err(error);
    }
    debug!(
        id = req.id.as_str();
        "create {}: plan {t_plan:?}, spawn {t_spawn:?}, ready {:?} ({report:?})",
        req.id,
        t0.elapsed()
    );
    // Armed no more: the task owns its worker, cgroup and mount from here.
    undo.disarm();
    let task = Task::new(Parts {
        id: req.id.clone(),
        bundle: req.bundle.clone(),
        pid: spawned.pid,
        pidfd: spawned.pidfd,
        chan,
        stdio,
        rootfs,
        cgroup: Some(cgroup),
        pod_sandbox: role == kiln_plan::Role::PodSandbox,
    });
    Ok((task, spawned.exit))
}
