//! The Task API over ttrpc: a thin layer that finds the container a request is about and asks
//! its state machine (`task`), the Create orchestration (`create`) or its cgroup.
//!
//! Requests Kiln cannot honour (exec, pause, checkpoint, resource updates, terminals) get an
//! explicit "not supported by Kiln" error: containerd and its user must never believe
//! something happened that did not.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::TtrpcContext;
use containerd_shim::protos::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, KillRequest, PidsRequest, PidsResponse, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, WaitRequest,
    WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task as TaskApi;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use kiln_cgroups::Layout;
use log::{debug, info, warn};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, oneshot};

use crate::events::Publisher;
use crate::table::Table;
use crate::task::{Exit, Task, signal_pid};
use crate::zygote_client::ZygoteClient;

/// Where compiled modules are cached unless `KILN_CACHE_DIR` says otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/kiln/cache";

/// The cgroup used when the spec gives no `linux.cgroupsPath`.
pub fn default_cgroup(namespace: &str, id: &str) -> String {
    format!("/kiln/{namespace}/{id}")
}

/// Now, as a protobuf timestamp.
pub fn now_timestamp() -> Timestamp {
    to_timestamp(SystemTime::now())
}

fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

/// Lazily unmounts a container rootfs; missing or already unmounted is fine.
pub fn unmount_rootfs(rootfs: &Path) {
    match nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!("unmount {}: {e}", rootfs.display()),
    }
}

fn rpc_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn unsupported(what: &str) -> ttrpc::Error {
    rpc_err(
        Code::UNIMPLEMENTED,
        format!("{what} is not supported by Kiln"),
    )
}

/// The Task service.
pub struct Service {
    pub(crate) namespace: String,
    publisher: Arc<Publisher>,
    pub(crate) zygote: Arc<ZygoteClient>,
    pub(crate) table: Table,
    layout: Mutex<Option<Layout>>,
    host: OnceLock<kiln_plan::Host>,
    pub(crate) cache_root: PathBuf,
    /// containerd's API, for images whose module is a layer.
    pub(crate) images: crate::image::Images,
    shutdown: Notify,
    /// Set when containers share this shim: its socket address, for the idle exit.
    pub(crate) shared_address: Option<String>,
    /// Woken when the last container is gone, in a shared shim.
    pub(crate) maybe_idle: Notify,
    /// This shim serves one Kubernetes pod.
    pod: bool,
    /// That pod's sandbox has been deleted.
    pod_sandbox_deleted: std::sync::atomic::AtomicBool,
    /// containerd has sent Shutdown.
    shutdown_asked: std::sync::atomic::AtomicBool,
}

impl Service {
    /// A service with no containers.
    pub fn new(
        namespace: String,
        publisher: Publisher,
        zygote: Arc<ZygoteClient>,
        shared_address: Option<String>,
        pod: bool,
        containerd_address: &str,
    ) -> Self {
        let cache_root = std::env::var_os("KILN_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        Service {
            namespace,
            publisher: Arc::new(publisher),
            zygote,
            table: Table::default(),
            layout: Mutex::new(None),
            host: OnceLock::new(),
            cache_root,
            images: crate::image::Images::new(containerd_address),
            shutdown: Notify::new(),
            shared_address,
            maybe_idle: Notify::new(),
            pod,
            pod_sandbox_deleted: std::sync::atomic::AtomicBool::new(false),
            shutdown_asked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A pod's shim whose pod is gone (its sandbox was deleted) and that containerd has asked
    /// to shut down: it exits at once instead of after the idle time. Not on the sandbox's
    /// Delete alone: exiting while that reply is on its way cut it off (containerd 2.1 then
    /// failed StopPodSandbox with "ttrpc: closed" and retried), and containerd follows every
    /// Delete with a Shutdown.
    pub(crate) fn pod_over(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.pod && self.pod_sandbox_deleted.load(SeqCst) && self.shutdown_asked.load(SeqCst)
    }

    /// Resolves when containerd has shut the shim down (or an idle shared shim exits), once
    /// the background cleanups are done.
    pub async fn wait_for_shutdown(&self) {
        self.shutdown.notified().await;
        self.table.all_cleanups().await;
    }

    /// Ends the server.
    pub(crate) fn shut_down(&self) {
        self.shutdown.notify_one();
    }

    pub(crate) fn host(&self) -> &kiln_plan::Host {
        self.host.get_or_init(kiln_plan::Host::detect)
    }

    pub(crate) fn layout(&self) -> Result<Layout, String> {
        let mut l = self.layout.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() {
            *l = Some(Layout::detect().map_err(|e| format!("detect cgroups: {e}"))?);
        }
        l.clone().ok_or_else(|| "no cgroup layout".to_string())
    }

    fn get(&self, id: &str) -> ttrpc::Result<Arc<Task>> {
        self.table
            .get(id)
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn publish(
        &self,
        topic: &str,
        event: Box<dyn containerd_shim::protos::protobuf::MessageDyn>,
    ) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }
}

async fn publish(
    publisher: &Publisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn containerd_shim::protos::protobuf::MessageDyn>,
) {
    if let Err(e) = publisher.publish(topic, namespace, event).await {
        warn!("publish {topic}: {e}");
    }
}

#[async_trait]
impl TaskApi for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let Some(reservation) = self.table.reserve(&req.id) else {
            return Err(rpc_err(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        };
        let (task, exit_rx) = match crate::create::create(self, &req).await {
            Ok(c) => c,
            Err(e) => {
                warn!(id = req.id.as_str(); "create {}: {e}", req.id);
                crate::logging::remove(&req.id);
                return Err(rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("kiln: container {}: {e}", req.id),
                ));
            }
        };
        let task = Arc::new(task);
        let pid = task.pid;
        reservation.commit(task.clone());
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: false,
                    ..Default::default()
                })
                .into(),
                pid: pid as u32,
                ..Default::default()
            }),
        )
        .await;
        tokio::spawn(watch(
            self.publisher.clone(),
            self.namespace.clone(),
            task,
            exit_rx,
        ));
        info!(id = req.id.as_str(); "created {} (worker pid {pid})", req.id);
        Ok(CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        no_exec(&req.exec_id)?;
        let t = self.get(&req.id)?;
        let event = Box::new(TaskStart {
            container_id: t.id.clone(),
            pid: t.pid as u32,
            ..Default::default()
        });
        t.start(self.publish(topics::TASK_START_EVENT_TOPIC, event))
            .await
            .map_err(|e| rpc_err(Code::FAILED_PRECONDITION, e))?;
        Ok(StartResponse {
            pid: t.pid as u32,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        no_exec(&req.exec_id)?;
        let t = self.get(&req.id)?;
        let exit = match t.exit() {
            Some(e) => e,
            None => {
                if !t.is_created().await {
                    return Err(rpc_err(
                        Code::FAILED_PRECONDITION,
                        format!("container {} is running; kill it first", t.id),
                    ));
                }
                // Never started: the worker only waits; end it and wait for its exit.
                let _ = t.signal(libc::SIGKILL);
                t.wait().await
            }
        };
        self.table.remove(&t);
        if let Some(rootfs) = t.rootfs.clone() {
            // containerd removes the snapshot once Delete returns: unmounted by then.
            let _ = tokio::task::spawn_blocking(move || unmount_rootfs(&rootfs)).await;
        }
        if let Some(cg) = t.cgroup.clone() {
            // Removing a cgroup waits for the kernel to take its controllers offline (an RCU
            // grace period on v1), and nothing in Delete's reply depends on it.
            let id = t.id.clone();
            self.table.clean_up_in_background(&t.id, move || {
                if let Err(e) = cg.kill_and_remove(crate::create::CLEANUP_WITHIN) {
                    warn!(id = id.as_str(); "delete {id}: remove cgroup: {e}");
                }
            });
        }
        crate::logging::remove(&t.id);
        if t.pod_sandbox {
            self.pod_sandbox_deleted
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: t.id.clone(),
                pid: t.pid as u32,
                exit_status: exit.status,
                exited_at: Some(to_timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
        if self.table.is_idle() {
            self.maybe_idle.notify_one();
        }
        Ok(DeleteResponse {
            pid: t.pid as u32,
            exit_status: exit.status,
            exited_at: Some(to_timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let t = self.get(&req.id)?;
        let mut pids = match t.cgroup.clone() {
            Some(cg) => tokio::task::spawn_blocking(move || cg.pids().unwrap_or_default())
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        if t.exit().is_none() && !pids.contains(&t.pid) {
            pids.push(t.pid);
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| api::ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        no_exec(&req.exec_id)?;
        let t = self.get(&req.id)?;
        if t.exit().is_some() {
            return Err(rpc_err(
                Code::NOT_FOUND,
                format!("container {}: process already finished", t.id),
            ));
        }
        let signal = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|_| {
            rpc_err(
                Code::INVALID_ARGUMENT,
                format!("invalid signal {}", req.signal),
            )
        })?;
        t.signal(signal as i32).map_err(|e| {
            rpc_err(
                Code::INTERNAL,
                format!("container {}: signal the worker with {signal}: {e}", t.id),
            )
        })?;
        if req.all
            && let Some(cg) = t.cgroup.clone()
        {
            let worker = t.pid;
            let others = tokio::task::spawn_blocking(move || cg.pids().unwrap_or_default())
                .await
                .unwrap_or_default();
            for pid in others.into_iter().filter(|p| *p != worker) {
                if let Err(e) = signal_pid(pid, signal as i32) {
                    warn!(id = t.id.as_str(); "kill {pid} with {signal}: {e}");
                }
            }
        }
        debug!(id = t.id.as_str(); "kill {} with {signal} (all: {})", t.id, req.all);
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        no_exec(&req.exec_id)?;
        let t = self.get(&req.id)?;
        let exit = t.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(to_timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        no_exec(&req.exec_id)?;
        let t = self.get(&req.id)?;
        let (status, exit) = t.status().await;
        Ok(StateResponse {
            id: t.id.clone(),
            bundle: t.bundle.clone(),
            pid: t.pid as u32,
            status: status.into(),
            stdin: t.stdio.stdin.clone(),
            stdout: t.stdio.stdout.clone(),
            stderr: t.stdio.stderr.clone(),
            terminal: false,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| to_timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let t = self.get(&req.id)?;
        let cg = t
            .cgroup
            .clone()
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {} has no cgroup", t.id)))?;
        let version = cg.version();
        let stats = tokio::task::spawn_blocking(move || cg.stats())
            .await
            .map_err(|e| rpc_err(Code::INTERNAL, format!("stats: {e}")))?
            .map_err(|e| rpc_err(Code::INTERNAL, format!("container {}: stats: {e}", t.id)))?;
        let any = crate::metrics::to_any(version, &stats)
            .map_err(|e| rpc_err(Code::INTERNAL, format!("encode stats: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self.table.get(&req.id).map(|t| t.pid as u32).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.shutdown_asked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if self.table.is_idle() {
            if self.shared_address.is_some() {
                self.maybe_idle.notify_one();
            } else {
                self.shut_down();
            }
        } else {
            debug!("shutdown requested while containers remain; staying up");
        }
        Ok(Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        // The worker reads containerd's stdin FIFO directly, so it sees end-of-file as soon as
        // containerd's writer closes; there is no pipe of the shim's own to close.
        self.get(&req.id)?;
        Ok(Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unsupported(
            "exec (a Wasm container has one process; use an HTTP or TCP probe instead of an \
             exec probe)",
        ))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unsupported("a terminal (resize pty)"))
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> ttrpc::Result<Empty> {
        Err(unsupported("pause"))
    }

    async fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        Err(unsupported("resume"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unsupported("checkpoint"))
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(unsupported("updating resources of a running container"))
    }
}

fn no_exec(exec_id: &str) -> ttrpc::Result<()> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        Err(rpc_err(
            Code::NOT_FOUND,
            format!("exec {exec_id} not found: exec is not supported by Kiln"),
        ))
    }
}

/// Waits until the output the ended worker left in its FIFOs has been read (see `drain`), so
/// that a client which stops reading when it learns of the exit has all of it. No lock is held
/// here: the other containers of a shared shim carry on meanwhile, and a Kill of this one is
/// answered at once (its exit follows within the limit).
async fn output_read(task: &Task) {
    use crate::drain::{Drained, drain};
    let limit = crate::drain::limit();
    if limit.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    for (name, path) in [
        ("stdout", &task.stdio.stdout),
        ("stderr", &task.stdio.stderr),
    ] {
        match drain(path, deadline).await {
            Drained::TimedOut { unread } => warn!(
                id = task.id.as_str();
                "container {}: {unread} bytes of its {name} still unread by its reader after \
                 {limit:?} (KILN_OUTPUT_DRAIN_SECS); reporting its exit",
                task.id
            ),
            Drained::ReaderLeft { unread } => debug!(
                id = task.id.as_str();
                "container {}: the reader of its {name} left {unread} bytes unread",
                task.id
            ),
            Drained::NotAFifo | Drained::NoReader | Drained::Read => {}
        }
    }
}

/// An OOM notification as tokio polls it.
struct Oom(kiln_cgroups::OomEvents);

impl std::os::fd::AsRawFd for Oom {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.fd().as_raw_fd()
    }
}

/// Watches one task to its end: publishes TaskOOM when the kernel's OOM killer acts in its
/// cgroup, then records its exit and publishes TaskExit.
async fn watch(
    publisher: Arc<Publisher>,
    namespace: String,
    task: Arc<Task>,
    mut exit_rx: oneshot::Receiver<i32>,
) {
    let oom = task.cgroup.as_ref().and_then(|cg| match cg.oom_events() {
        // SAFETY: the AsyncFd owns the notification, so its descriptor stays open while
        // registered.
        Ok(e) => {
            unsafe { AsyncFd::register_with_interest(Oom(e), tokio::io::Interest::READABLE) }.ok()
        }
        Err(e) => {
            debug!(id = task.id.as_str(); "no OOM notification for {}: {e}", task.id);
            None
        }
    });
    let oom_event = || {
        publish(
            &publisher,
            &namespace,
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id: task.id.clone(),
                ..Default::default()
            }),
        )
    };
    let status = match oom {
        None => (&mut exit_rx).await,
        Some(mut oom) => {
            let status = loop {
                tokio::select! {
                    status = &mut exit_rx => break status,
                    ready = oom.readable_mut() => {
                        let Ok(mut guard) = ready else { break (&mut exit_rx).await };
                        let kills = guard.get_inner_mut().0.take().unwrap_or(0);
                        guard.clear_ready();
                        if kills > 0 {
                            warn!(id = task.id.as_str(); "container {} was OOM-killed", task.id);
                            oom_event().await;
                        }
                    }
                }
            };
            // The kill that ended the worker is counted before its exit can be reaped; an OOM
            // still unread here goes out before TaskExit, as containerd expects.
            if oom.get_mut().0.take().unwrap_or(0) > 0 {
                warn!(id = task.id.as_str(); "container {} was OOM-killed", task.id);
                oom_event().await;
            }
            status
        }
    };
    // A dropped sender means the worker's exit can no longer be learned: as killed.
    let status = status.unwrap_or(kiln_worker::EXIT_KILLED);
    // The time of the exit itself, not of the end of the wait for its output.
    let exited_at = SystemTime::now();
    output_read(&task).await;
    let exit: Exit = task.stopped(status, exited_at).await;
    info!(id = task.id.as_str(); "container {} exited with {status}", task.id);
    publish(
        &publisher,
        &namespace,
        topics::TASK_EXIT_EVENT_TOPIC,
        Box::new(TaskExit {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: task.pid as u32,
            exit_status: exit.status,
            exited_at: Some(to_timestamp(exit.at)).into(),
            ..Default::default()
        }),
    )
    .await;
}
