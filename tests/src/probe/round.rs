//! One round: a task's life from its snapshot to its exit event, each phase timed, then its
//! removal (also timed). Whatever a round created is removed even when the round fails.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, KillRequest, StartRequest,
};
use containerd_client::tonic::{Code, Status};
use serde_json::Value;

use super::client::Ctx;
use super::events::ExitWatcher;
use super::spec;

/// The phases, in the order a round passes them: (key in the JSON, title in the table).
pub const PHASES: &[(&str, &str)] = &[
    ("prepare", "snapshot prepare"),
    ("container_create", "container create"),
    ("mounts", "snapshot mounts"),
    ("task_create", "task create"),
    ("start", "start"),
    ("exit", "start -> exit event"),
    ("total", "total (prepare -> exit)"),
    ("task_delete", "task delete"),
    ("container_delete", "container delete"),
    ("snapshot_remove", "snapshot remove"),
    ("cleanup", "cleanup (the 3 above)"),
];

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Keeps the active snapshot from containerd's garbage collector in the moment between
/// Prepare and the container that references it (`ctr` holds a lease for that instead, which
/// costs two more calls per run).
const GC_ROOT: &str = "containerd.io/gc.root";
const SIGKILL: u32 = 9;

/// What every round of one probe shares.
pub struct Plan {
    pub runtime: String,
    pub image: String,
    pub snapshotter: String,
    pub chain_id: String,
    pub spec: Value,
    /// The limit of every call, and of the wait for the exit event.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Round {
    pub n: usize,
    pub warmup: bool,
    pub id: String,
    /// Milliseconds per phase key; a phase the round did not reach is missing.
    pub phases: Vec<(&'static str, f64)>,
    pub exit_status: Option<u32>,
    /// The first failure, naming its phase.
    pub error: Option<String>,
    /// A failure while removing what a failed round left.
    pub cleanup_error: Option<String>,
}

impl Round {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn phase(&self, key: &str) -> Option<f64> {
        self.phases.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn record(&mut self, key: &'static str, d: Duration) {
        self.phases.push((key, d.as_secs_f64() * 1000.0));
    }
}

/// What may exist of a round's container, so that a failure removes that. Set before each
/// create call: a call that timed out on our side may still have succeeded in containerd.
#[derive(Default)]
struct Made {
    snapshot: bool,
    container: bool,
    task: bool,
}

pub async fn run(
    ctx: &Ctx,
    plan: &Plan,
    watcher: &mut ExitWatcher,
    n: usize,
    warmup: bool,
    id: String,
) -> Round {
    let mut round = Round {
        n,
        warmup,
        id: id.clone(),
        ..Round::default()
    };
    let mut made = Made::default();
    let result = match spec::for_container(&plan.spec, &ctx.namespace, &id) {
        Ok(spec) => lifecycle(ctx, plan, watcher, &id, spec, &mut made, &mut round).await,
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(()) => cleanup(ctx, plan, &id, &mut made, &mut round).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        round.error = Some(format!("{e:#}"));
        if let Err(e) = teardown(ctx, plan, &id, &made).await {
            round.cleanup_error = Some(format!("{e:#}"));
        }
    }
    round
}

async fn lifecycle(
    ctx: &Ctx,
    plan: &Plan,
    watcher: &mut ExitWatcher,
    id: &str,
    spec: Vec<u8>,
    made: &mut Made,
    round: &mut Round,
) -> Result<()> {
    let mut snapshots = SnapshotsClient::new(ctx.channel.clone());
    let mut containers = ContainersClient::new(ctx.channel.clone());
    let mut tasks = TasksClient::new(ctx.channel.clone());
    let t = plan.timeout;

    let t0 = Instant::now();
    let prepare = PrepareSnapshotRequest {
        snapshotter: plan.snapshotter.clone(),
        key: id.to_string(),
        parent: plan.chain_id.clone(),
        labels: HashMap::from([(GC_ROOT.to_string(), "kiln-probe".to_string())]),
    };
    made.snapshot = true;
    call("snapshot prepare", t, snapshots.prepare(ctx.req(prepare))).await?;
    let t1 = Instant::now();
    round.record("prepare", t1 - t0);

    let container = Container {
        id: id.to_string(),
        image: plan.image.clone(),
        runtime: Some(Runtime {
            name: plan.runtime.clone(),
            options: None,
        }),
        spec: Some(prost_types::Any {
            type_url: SPEC_TYPE_URL.to_string(),
            value: spec,
        }),
        snapshotter: plan.snapshotter.clone(),
        snapshot_key: id.to_string(),
        ..Container::default()
    };
    let create = CreateContainerRequest {
        container: Some(container),
    };
    made.container = true;
    call("container create", t, containers.create(ctx.req(create))).await?;
    let t2 = Instant::now();
    round.record("container_create", t2 - t1);

    // What containerd's own client does in NewTask: the rootfs comes from the snapshotter.
    let mounts = MountsRequest {
        snapshotter: plan.snapshotter.clone(),
        key: id.to_string(),
    };
    let rootfs = call("snapshot mounts", t, snapshots.mounts(ctx.req(mounts)))
        .await?
        .into_inner()
        .mounts;
    let t3 = Instant::now();
    round.record("mounts", t3 - t2);

    // Empty stdio: both runc's shim and Kiln's give the process /dev/null.
    let create = CreateTaskRequest {
        container_id: id.to_string(),
        rootfs,
        ..CreateTaskRequest::default()
    };
    made.task = true;
    call("task create", t, tasks.create(ctx.req(create))).await?;
    let t4 = Instant::now();
    round.record("task_create", t4 - t3);

    let start = StartRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
    };
    let t_start = Instant::now();
    call("start", t, tasks.start(ctx.req(start))).await?;
    round.record("start", t_start.elapsed());

    let exit = watcher.wait_exit(id, t).await.context("exit event")?;
    round.record("exit", exit.at.duration_since(t_start));
    round.record("total", exit.at.duration_since(t0));
    round.exit_status = Some(exit.exit_status);
    Ok(())
}

/// The timed removal after a round that went well.
async fn cleanup(
    ctx: &Ctx,
    plan: &Plan,
    id: &str,
    made: &mut Made,
    round: &mut Round,
) -> Result<()> {
    let mut snapshots = SnapshotsClient::new(ctx.channel.clone());
    let mut containers = ContainersClient::new(ctx.channel.clone());
    let mut tasks = TasksClient::new(ctx.channel.clone());
    let t = plan.timeout;

    let t0 = Instant::now();
    let delete = DeleteTaskRequest {
        container_id: id.to_string(),
    };
    call("task delete", t, tasks.delete(ctx.req(delete))).await?;
    made.task = false;
    let t1 = Instant::now();
    round.record("task_delete", t1 - t0);

    let delete = DeleteContainerRequest { id: id.to_string() };
    call("container delete", t, containers.delete(ctx.req(delete))).await?;
    made.container = false;
    let t2 = Instant::now();
    round.record("container_delete", t2 - t1);

    let remove = RemoveSnapshotRequest {
        snapshotter: plan.snapshotter.clone(),
        key: id.to_string(),
    };
    call("snapshot remove", t, snapshots.remove(ctx.req(remove))).await?;
    made.snapshot = false;
    let t3 = Instant::now();
    round.record("snapshot_remove", t3 - t2);
    round.record("cleanup", t3 - t0);
    Ok(())
}

/// Removes what a failed round left, whatever state it is in; untimed. Every step is tried;
/// the first error is returned.
async fn teardown(ctx: &Ctx, plan: &Plan, id: &str, made: &Made) -> Result<()> {
    let mut snapshots = SnapshotsClient::new(ctx.channel.clone());
    let mut containers = ContainersClient::new(ctx.channel.clone());
    let mut tasks = TasksClient::new(ctx.channel.clone());
    let t = plan.timeout;
    let mut first: Option<anyhow::Error> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r
            && first.is_none()
        {
            first = Some(e);
        }
    };

    if made.task {
        let kill = KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: SIGKILL,
            all: true,
        };
        // It may have exited already: only the delete's outcome matters.
        let _ = call("task kill", t, tasks.kill(ctx.req(kill))).await;
        let deadline = Instant::now() + t;
        let deleted = loop {
            let delete = DeleteTaskRequest {
                container_id: id.to_string(),
            };
            match call("task delete", t, tasks.delete(ctx.req(delete))).await {
                Ok(_) => break Ok(()),
                Err(e) if code(&e) == Some(Code::NotFound) => break Ok(()),
                // The kill is asynchronous: a task still stopping refuses the delete.
                Err(e)
                    if code(&e) == Some(Code::FailedPrecondition) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break Err(e),
            }
        };
        note(deleted);
    }
    if made.container {
        let delete = DeleteContainerRequest { id: id.to_string() };
        note(not_found_ok(
            call("container delete", t, containers.delete(ctx.req(delete))).await,
        ));
    }
    if made.snapshot {
        let remove = RemoveSnapshotRequest {
            snapshotter: plan.snapshotter.clone(),
            key: id.to_string(),
        };
        note(not_found_ok(
            call("snapshot remove", t, snapshots.remove(ctx.req(remove))).await,
        ));
    }
    match first {
        Some(e) => Err(e.context(format!("removing what is left of {id}"))),
        None => Ok(()),
    }
}

/// A call to containerd, bounded by `limit` (a stuck shim must not hang the probe), with an
/// error naming the phase.
async fn call<T>(
    phase: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(status)) => Err(anyhow!(status).context(phase.to_string())),
        Err(_) => Err(anyhow!("no answer within {limit:?}").context(phase.to_string())),
    }
}

fn code(e: &anyhow::Error) -> Option<Code> {
    e.downcast_ref::<Status>().map(Status::code)
}

fn not_found_ok<T>(r: Result<T>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(Code::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}
