//! The Task API: the table of containers this shim serves and their lifecycle.
//!
//! Each container moves Created → Running → Stopped (or Created → Stopped when killed before
//! Start). The table is keyed by container id, so one shim process can serve many containers.
//! Requests Kiln cannot honour (exec, pause, checkpoint, resource updates, terminals) get an
//! explicit "not supported by Kiln" error: containerd and its user must never believe
//! something happened that did not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::TtrpcContext;
use containerd_shim::protos::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, KillRequest, PidsRequest, PidsResponse, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, WaitRequest,
    WaitResponse,
};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use kiln_cgroups::{Cgroup, Layout};
use kiln_worker::protocol::START_BYTE;
use kiln_worker::{SpawnRequest, Stdio, WorkerReport};
use log::{debug, info, warn};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{Notify, watch};

use crate::events::Publisher;
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

#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

enum Phase {
    /// Worker set up and waiting; holds the channel that lets it start.
    Created(UnixStream),
    Running,
    Stopped(Exit),
}

struct Container {
    id: String,
    bundle: String,
    pid: i32,
    stdio: Stdio,
    rootfs: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    phase: tokio::sync::Mutex<Phase>,
    exited: watch::Sender<Option<Exit>>,
}

impl Container {
    fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }
}

/// The Task service.
pub struct Service {
    namespace: String,
    publisher: Arc<Publisher>,
    zygote: Arc<ZygoteClient>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    layout: Mutex<Option<Layout>>,
    host: std::sync::OnceLock<kiln_plan::Host>,
    cache_root: PathBuf,
    shutdown: Notify,
    /// Set when containers share this shim: its socket address, for the idle exit.
    shared_address: Option<String>,
    /// Woken when the last container is gone, in a shared shim.
    maybe_idle: Notify,
    /// Cgroup removals still running in the background.
    cleanups: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Service {
    /// A service with no containers.
    pub fn new(
        namespace: String,
        publisher: Publisher,
        zygote: Arc<ZygoteClient>,
        shared_address: Option<String>,
    ) -> Self {
        let cache_root = std::env::var_os("KILN_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        Service {
            namespace,
            publisher: Arc::new(publisher),
            zygote,
            containers: Mutex::new(HashMap::new()),
            layout: Mutex::new(None),
            host: std::sync::OnceLock::new(),
            cache_root,
            shutdown: Notify::new(),
            shared_address,
            maybe_idle: Notify::new(),
            cleanups: Mutex::new(Vec::new()),
        }
    }

    /// Resolves when containerd has shut the shim down.
    pub async fn wait_for_shutdown(&self) {
        self.shutdown.notified().await;
        let pending: Vec<_> = self.lock_cleanups().drain(..).collect();
        for task in pending {
            let _ = task.await;
        }
    }

    fn lock_cleanups(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        let mut list = self.cleanups.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|t| !t.is_finished());
        list
    }

    /// In a shared shim: exit once no container has been served, and no `start` has handed
    /// out this shim's address, for the idle timeout. Decided under the group lock, so a
    /// concurrent `start` either sees the socket gone (and launches a new server) or hands
    /// out a server that is still there.
    pub async fn exit_when_idle(self: Arc<Self>) {
        let Some(address) = self.shared_address.clone() else {
            return;
        };
        let idle = crate::group::idle_timeout();
        loop {
            self.maybe_idle.notified().await;
            loop {
                tokio::time::sleep(idle).await;
                if !self.table().is_empty() {
                    break;
                }
                let addr = address.clone();
                let lock = tokio::task::spawn_blocking(move || crate::group::lock(&addr)).await;
                let Ok(Ok(_lock)) = lock else {
                    warn!("cannot take the shim group lock; staying up");
                    break;
                };
                if !self.table().is_empty() {
                    break;
                }
                if crate::group::lease_age(&address) < idle {
                    continue;
                }
                info!("idle for {idle:?} with no containers; exiting");
                crate::group::remove(&address);
                self.shutdown.notify_one();
                return;
            }
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn host(&self) -> &kiln_plan::Host {
        self.host.get_or_init(kiln_plan::Host::detect)
    }

    fn layout(&self) -> Result<Layout, String> {
        let mut l = self.layout.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() {
            *l = Some(Layout::detect().map_err(|e| format!("detect cgroups: {e}"))?);
        }
        l.clone().ok_or_else(|| "no cgroup layout".to_string())
    }

    async fn publish(
        &self,
        topic: &str,
        event: Box<dyn containerd_shim::protos::protobuf::MessageDyn>,
    ) {
        if let Err(e) = self.publisher.publish(topic, &self.namespace, event).await {
            warn!("publish {topic}: {e}");
        }
    }

    /// Everything Create does that can fail, with the cleanup kept by the caller.
    async fn create_inner(
        &self,
        req: &CreateTaskRequest,
        undo: &mut Undo,
    ) -> Result<(Arc<Container>, tokio::sync::oneshot::Receiver<i32>), String> {
        let t0 = Instant::now();
        let bundle = PathBuf::from(&req.bundle);
        if let Err(e) = crate::logging::add(&req.id, &bundle) {
            debug!(id = req.id.as_str(); "no log pipe in {}: {e}", bundle.display());
        }
        let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
            .map_err(|e| format!("read config.json: {e}"))?;
        if req.terminal {
            return Err(
                "terminal: true is not supported by Kiln yet (run without -t / tty)".into(),
            );
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
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| format!("create {}: {e}", rootfs.display()))?;
            for m in &req.rootfs {
                containerd_shim::util::mount_rootfs(m, &rootfs)
                    .await
                    .map_err(|e| format!("mount rootfs ({}): {e}", m.type_))?;
                undo.rootfs = Some(rootfs.clone());
            }
        }
        let plan =
            kiln_plan::plan(&req.id, &spec, &rootfs, self.host()).map_err(|e| e.to_string())?;
        let seccomp = crate::seccomp::filter(&plan.sandbox.seccomp)?;
        let t_plan = t0.elapsed();

        let layout = self.layout()?;
        let cgroup = Cgroup::create(
            &layout,
            &plan.cgroups_path,
            &default_cgroup(&self.namespace, &req.id),
            &plan.resources,
        )
        .map_err(|e| format!("cgroup: {e}"))?;
        undo.cgroup = Some(cgroup.clone());
        let t_cgroup = t0.elapsed();

        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
        };
        let spawn = SpawnRequest {
            token: 0,
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
            home_cgroup_procs: layout.own_procs_files(),
            cache_root: self.cache_root.clone(),
            log_path: Some(bundle.join("log")),
            seccomp,
        };
        let spawned = self.zygote.spawn(spawn).await?;
        undo.pid = Some(spawned.pid);
        let t_spawn = t0.elapsed();

        let mut chan = spawned.chan;
        let mut line = String::new();
        BufReader::new(&mut chan)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read worker report: {e}"))?;
        if line.is_empty() {
            return Err("the worker exited during setup".to_string());
        }
        let report: WorkerReport =
            serde_json::from_str(&line).map_err(|e| format!("bad worker report: {e}"))?;
        if let WorkerReport::Failed { error } = report {
            return Err(error);
        }
        debug!(
            id = req.id.as_str();
            "create {}: plan {t_plan:?}, cgroup {t_cgroup:?}, spawn {t_spawn:?}, ready {:?} ({report:?})",
            req.id,
            t0.elapsed()
        );
        let (exited, _) = watch::channel(None);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            pid: spawned.pid,
            stdio,
            rootfs: undo.rootfs.take(),
            cgroup: undo.cgroup.take(),
            phase: tokio::sync::Mutex::new(Phase::Created(chan)),
            exited,
        });
        undo.pid = None;
        Ok((container, spawned.exit))
    }
}

/// What a failed Create must take back.
#[derive(Default)]
struct Undo {
    rootfs: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    pid: Option<i32>,
}

impl Undo {
    fn run(self) {
        if let Some(pid) = self.pid {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        if let Some(cg) = self.cgroup {
            let _ = cg.kill_all();
            if let Err(e) = cg.remove() {
                warn!("remove cgroup after failed create: {e}");
            }
        }
        if let Some(rootfs) = self.rootfs {
            unmount_rootfs(&rootfs);
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if self.table().contains_key(&req.id) {
            return Err(rpc_err(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let mut undo = Undo::default();
        let (container, exit_rx) = match self.create_inner(&req, &mut undo).await {
            Ok(c) => c,
            Err(e) => {
                undo.run();
                warn!(id = req.id.as_str(); "create {}: {e}", req.id);
                crate::logging::remove(&req.id);
                return Err(rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("kiln: container {}: {e}", req.id),
                ));
            }
        };
        let pid = container.pid;
        self.table().insert(req.id.clone(), container.clone());
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
        tokio::spawn(watch_exit(
            self.publisher.clone(),
            self.namespace.clone(),
            container,
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
        let c = self.get(&req.id)?;
        let mut phase = c.phase.lock().await;
        match &mut *phase {
            Phase::Created(chan) => {
                chan.write_all(&[START_BYTE]).await.map_err(|e| {
                    rpc_err(
                        Code::FAILED_PRECONDITION,
                        format!("container {}: the worker is gone: {e}", c.id),
                    )
                })?;
                *phase = Phase::Running;
            }
            Phase::Running => {
                return Err(rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is already running", c.id),
                ));
            }
            Phase::Stopped(_) => {
                return Err(rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} has already exited", c.id),
                ));
            }
        }
        drop(phase);
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: c.id.clone(),
                pid: c.pid as u32,
                ..Default::default()
            }),
        )
        .await;
        Ok(StartResponse {
            pid: c.pid as u32,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let exit = match c.exit() {
            Some(e) => e,
            None => {
                let created = matches!(*c.phase.lock().await, Phase::Created(_));
                if !created {
                    return Err(rpc_err(
                        Code::FAILED_PRECONDITION,
                        format!("container {} is running; kill it first", c.id),
                    ));
                }
                // Never started: the worker only waits; end it and wait for its exit.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.pid),
                    nix::sys::signal::SIGKILL,
                );
                wait_exit(&c).await
            }
        };
        if let Some(cg) = c.cgroup.clone() {
            // Removing a cgroup waits for the kernel to take its controllers offline (an RCU
            // grace period on v1, milliseconds), and nothing in Delete's reply depends on it:
            // it is done in the background, and the shim waits for it before exiting.
            let id = c.id.clone();
            let task = tokio::task::spawn_blocking(move || {
                let _ = cg.kill_all();
                if let Err(e) = cg.remove() {
                    warn!(id = id.as_str(); "delete {id}: remove cgroup: {e}");
                }
            });
            self.lock_cleanups().push(task);
        }
        if let Some(rootfs) = &c.rootfs {
            unmount_rootfs(rootfs);
        }
        self.table().remove(&c.id);
        crate::logging::remove(&c.id);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                pid: c.pid as u32,
                exit_status: exit.status,
                exited_at: Some(to_timestamp(exit.at)).into(),
                ..Default::default()
            }),
        )
        .await;
        Ok(DeleteResponse {
            pid: c.pid as u32,
            exit_status: exit.status,
            exited_at: Some(to_timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let c = self.get(&req.id)?;
        let mut pids: Vec<i32> = match &c.cgroup {
            Some(cg) => cg.pids().unwrap_or_default(),
            None => Vec::new(),
        };
        if c.exit().is_none() && !pids.contains(&c.pid) {
            pids.push(c.pid);
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
        let c = self.get(&req.id)?;
        if c.exit().is_some() {
            return Err(rpc_err(
                Code::NOT_FOUND,
                format!("container {}: process already finished", c.id),
            ));
        }
        let signal = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|_| {
            rpc_err(
                Code::INVALID_ARGUMENT,
                format!("invalid signal {}", req.signal),
            )
        })?;
        let mut targets = vec![c.pid];
        if req.all
            && let Some(cg) = &c.cgroup
        {
            targets.extend(cg.pids().unwrap_or_default());
            targets.sort_unstable();
            targets.dedup();
        }
        for pid in targets {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(rpc_err(
                        Code::INTERNAL,
                        format!("container {}: kill {pid} with {signal}: {e}", c.id),
                    ));
                }
            }
        }
        debug!(id = c.id.as_str(); "kill {} with {signal} (all: {})", c.id, req.all);
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let exit = wait_exit(&c).await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(to_timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        no_exec(&req.exec_id)?;
        let c = self.get(&req.id)?;
        let (status, exit) = match c.exit() {
            Some(e) => (api::Status::STOPPED, Some(e)),
            None => match *c.phase.lock().await {
                Phase::Created(_) => (api::Status::CREATED, None),
                Phase::Running => (api::Status::RUNNING, None),
                Phase::Stopped(e) => (api::Status::STOPPED, Some(e)),
            },
        };
        Ok(StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid as u32,
            status: status.into(),
            stdin: c.stdio.stdin.clone(),
            stdout: c.stdio.stdout.clone(),
            stderr: c.stdio.stderr.clone(),
            terminal: false,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| to_timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let c = self.get(&req.id)?;
        let cg = c
            .cgroup
            .as_ref()
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("container {} has no cgroup", c.id)))?;
        let stats = cg
            .stats()
            .map_err(|e| rpc_err(Code::INTERNAL, format!("container {}: stats: {e}", c.id)))?;
        let any = crate::metrics::to_any(cg.version(), &stats)
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
        let task_pid = self.table().get(&req.id).map(|c| c.pid as u32).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.table().is_empty() {
            if self.shared_address.is_some() {
                self.maybe_idle.notify_one();
            } else {
                self.shutdown.notify_one();
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
        Err(unsupported("exec (a Wasm container has one process)"))
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

async fn wait_exit(c: &Container) -> Exit {
    let mut rx = c.exited.subscribe();
    loop {
        if let Some(e) = *rx.borrow_and_update() {
            return e;
        }
        if rx.changed().await.is_err() {
            // The sender lives in the container; unreachable while we hold it.
            return Exit {
                status: 255,
                at: SystemTime::now(),
            };
        }
    }
}

/// Records a worker's exit and tells containerd.
async fn watch_exit(
    publisher: Arc<Publisher>,
    namespace: String,
    c: Arc<Container>,
    rx: tokio::sync::oneshot::Receiver<i32>,
) {
    // A dropped sender means the zygote vanished without reporting: treat as killed.
    let status = rx.await.unwrap_or(128 + libc::SIGKILL);
    let exit = Exit {
        status: status as u32,
        at: SystemTime::now(),
    };
    *c.phase.lock().await = Phase::Stopped(exit);
    c.exited.send_replace(Some(exit));
    info!(id = c.id.as_str(); "container {} exited with {status}", c.id);
    let event = TaskExit {
        container_id: c.id.clone(),
        id: c.id.clone(),
        pid: c.pid as u32,
        exit_status: exit.status,
        exited_at: Some(to_timestamp(exit.at)).into(),
        ..Default::default()
    };
    if let Err(e) = publisher
        .publish(topics::TASK_EXIT_EVENT_TOPIC, &namespace, Box::new(event))
        .await
    {
        warn!("publish exit of {}: {e}", c.id);
    }
}
