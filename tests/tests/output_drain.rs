//! A container's exit is reported only once its reader has read what it wrote, its reader has
//! gone, or `KILN_OUTPUT_DRAIN_SECS` has passed: `ctr run --rm` stops reading when Wait
//! returns, and used to lose hello's whole output about 3 times in 1,000 (`scripts/churn.sh`).
//!
//! The test is the reader of the container's stdout FIFO itself (the task is created through
//! containerd's gRPC API, not by ctr), so it decides when, and whether, the output is read.
//! Every container of this binary shares one shim (namespace grouping), so a held exit is also
//! seen not to hold up another container of that shim.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CreateTaskRequest, GetContainerRequest, GetRequest, KillRequest, StartRequest, WaitRequest,
    WaitResponse,
};
use kiln_e2e::probe::client::Ctx;
use kiln_e2e::probe::events::ExitWatcher;
use kiln_e2e::{Container, Kiln, RUNTIME, image, kiln_with_env, process};
use tokio::task::JoinHandle;

/// `KILN_OUTPUT_DRAIN_SECS` for this binary's shim: far above the default 2 s and above every
/// "not yet" look below, so that a look made late by a busy machine still comes first.
fn limit_secs() -> u64 {
    10 * u64::from(process::slow_factor())
}

fn k() -> &'static Kiln {
    static LIMIT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| limit_secs().to_string());
    kiln_with_env(&[
        ("KILN_OUTPUT_DRAIN_SECS", limit.as_str()),
        ("KILN_SHIM_GROUPING", "namespace"),
    ])
}

/// containerd's `Status` of a task that runs.
const RUNNING: i32 = 2;
const SIGKILL: u32 = 9;
/// The words of Kiln's warning when it reports an exit with output still unread.
const UNREAD_WARNING: &str = "still unread by its reader";

/// The stdout FIFO of a task, read by the test (or not).
struct Stdout {
    /// Holds the FIFO.
    _dir: tempfile::TempDir,
    path: String,
    reader: File,
}

impl Stdout {
    /// Makes the FIFO and opens its reading end (a blocking reader from then on).
    fn new() -> Stdout {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        // Non-blocking, so that the open does not wait for a writer; reads block afterwards.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("open the FIFO for reading");
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(reader.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        Stdout {
            _dir: dir,
            path: path.to_string_lossy().into_owned(),
            reader,
        }
    }

    /// Bytes in the pipe that nobody has read.
    fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, on a descriptor we own.
        let r = unsafe { libc::ioctl(self.reader.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert!(r >= 0, "FIONREAD: {}", std::io::Error::last_os_error());
        usize::try_from(n).unwrap_or(0)
    }

    /// Everything up to end-of-file (every writer gone).
    async fn read_to_end(mut self) -> String {
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            self.reader.read_to_string(&mut text).expect("read stdout");
            text
        })
        .await
        .expect("join the reader")
    }
}

/// A Kiln task of `image` (with `args`) whose stdout is `stdout` and whose stdin and stderr are
/// /dev/null, created and started; the returned handle is its Wait call.
async fn start(
    k: &Kiln,
    ctx: &Ctx,
    c: &Container,
    image: &str,
    args: &[&str],
    stdout: &Stdout,
) -> JoinHandle<WaitResponse> {
    let mut create = vec!["containers", "create", "--runtime", RUNTIME, image, &c.id];
    create.extend_from_slice(args);
    let out = k.ctr(&create);
    assert!(out.success(), "ctr containers create:\n{out}");
    let container = ContainersClient::new(ctx.channel.clone())
        .get(ctx.req(GetContainerRequest { id: c.id.clone() }))
        .await
        .expect("get the container")
        .into_inner()
        .container
        .expect("a container");
    // What containerd's client does in NewTask: the rootfs comes from the snapshotter.
    let rootfs = SnapshotsClient::new(ctx.channel.clone())
        .mounts(ctx.req(MountsRequest {
            snapshotter: container.snapshotter.clone(),
            key: container.snapshot_key.clone(),
        }))
        .await
        .expect("the snapshot's mounts")
        .into_inner()
        .mounts;
    let mut tasks = TasksClient::new(ctx.channel.clone());
    tasks
        .create(ctx.req(CreateTaskRequest {
            container_id: c.id.clone(),
            rootfs,
            stdout: stdout.path.clone(),
            ..CreateTaskRequest::default()
        }))
        .await
        .expect("create the task");
    let wait = tokio::spawn({
        let (mut tasks, req) = (
            tasks.clone(),
            ctx.req(WaitRequest {
                container_id: c.id.clone(),
                exec_id: String::new(),
            }),
        );
        async move { tasks.wait(req).await.expect("wait").into_inner() }
    });
    tasks
        .start(ctx.req(StartRequest {
            container_id: c.id.clone(),
            exec_id: String::new(),
        }))
        .await
        .expect("start the task");
    wait
}

/// containerd's view of the task's status.
async fn status(ctx: &Ctx, id: &str) -> i32 {
    TasksClient::new(ctx.channel.clone())
        .get(ctx.req(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }))
        .await
        .expect("get the task")
        .into_inner()
        .process
        .expect("a process")
        .status
}

/// Asserts that no exit of `id` is reported in the next `secs` seconds: no TaskExit event,
/// Wait still waiting, the task still running.
async fn assert_no_exit_for(
    ctx: &Ctx,
    watcher: &mut ExitWatcher,
    wait: &JoinHandle<WaitResponse>,
    id: &str,
    secs: u64,
) {
    if let Ok(e) = watcher.wait_exit(id, Duration::from_secs(secs)).await {
        panic!("{id} was reported as exited ({e:?}) while its output sat unread");
    }
    assert!(!wait.is_finished(), "Wait of {id} returned");
    assert_eq!(status(ctx, id).await, RUNNING, "{id}'s task");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(k: &Kiln) -> (Ctx, ExitWatcher) {
    let ctx = Ctx::connect(Path::new(&k.sock), "default")
        .await
        .expect("connect to containerd");
    let watcher = ExitWatcher::start(&ctx).await.expect("watch exits");
    (ctx, watcher)
}

fn warned(k: &Kiln, id: &str) -> bool {
    k.containerd_log_lines(id)
        .iter()
        .any(|l| l.contains(UNREAD_WARNING))
}

#[test]
fn an_exit_is_reported_once_the_output_has_been_read() {
    let k = k();
    let c = k.container("drain-read");
    let stdout = Stdout::new();
    runtime().block_on(async {
        let (ctx, mut watcher) = connect(k).await;
        let wait = start(k, &ctx, &c, &image("hello"), &[], &stdout).await;
        // The guest is done in milliseconds; its exit waits for the output to be read.
        assert_no_exit_for(&ctx, &mut watcher, &wait, &c.id, 1).await;
        // End-of-file comes once the worker and Kiln's check are both gone.
        assert_eq!(stdout.read_to_end().await, "Hello from Kiln!\n");
        let exit = watcher
            .wait_exit(&c.id, process::deadline(Duration::from_secs(30)))
            .await
            .expect("the exit, once the output was read");
        assert_eq!(exit.exit_status, 0);
        assert_eq!(wait.await.expect("join Wait").exit_status, 0);
    });
    // Released by the read, not by the limit.
    assert!(!warned(k, &c.id), "{:#?}", k.containerd_log_lines(&c.id));
}

#[test]
fn an_exit_whose_output_is_never_read_is_reported_after_the_limit() {
    let k = k();
    let c = k.container("drain-unread");
    let stdout = Stdout::new();
    let other = k.container("drain-other");
    runtime().block_on(async {
        let (ctx, mut watcher) = connect(k).await;
        let wait = start(k, &ctx, &c, &image("hello"), &[], &stdout).await;
        // Beyond the default limit of 2 s: the setting is the one in force.
        assert_no_exit_for(&ctx, &mut watcher, &wait, &c.id, 3).await;
        // The shared shim still runs another container from start to exit meanwhile.
        let out = other.run(&image("hello")).output();
        assert!(
            out.success() && out.stdout == "Hello from Kiln!\n",
            "another container of the shim:\n{out}"
        );
        assert!(!wait.is_finished(), "Wait of {} returned", c.id);
        let exit = watcher
            .wait_exit(&c.id, process::deadline(Duration::from_secs(60)))
            .await
            .expect("the exit, after the limit");
        assert_eq!(exit.exit_status, 0);
        assert_eq!(wait.await.expect("join Wait").exit_status, 0);
        // Still there, and still readable.
        assert_eq!(stdout.unread(), "Hello from Kiln!\n".len());
        assert_eq!(stdout.read_to_end().await, "Hello from Kiln!\n");
    });
    assert!(warned(k, &c.id), "{:#?}", k.containerd_log_lines(&c.id));
}

#[test]
fn a_kill_ends_a_container_whose_output_is_never_read_within_the_limit() {
    let k = k();
    let c = k.container("drain-kill");
    let stdout = Stdout::new();
    runtime().block_on(async {
        let (ctx, mut watcher) = connect(k).await;
        // `sleep` without an argument prints "sleeping" and sleeps for ever.
        let wait = start(k, &ctx, &c, &image("sleep"), &[], &stdout).await;
        let printed = process::wait_until(Duration::from_secs(30), || {
            (stdout.unread() > 0).then_some(())
        });
        assert!(printed.is_some(), "nothing was written to stdout");
        TasksClient::new(ctx.channel.clone())
            .kill(ctx.req(KillRequest {
                container_id: c.id.clone(),
                exec_id: String::new(),
                signal: SIGKILL,
                all: false,
            }))
            .await
            .expect("kill");
        assert_no_exit_for(&ctx, &mut watcher, &wait, &c.id, 1).await;
        let exit = watcher
            .wait_exit(&c.id, process::deadline(Duration::from_secs(60)))
            .await
            .expect("the exit of the killed container, after the limit");
        assert_eq!(exit.exit_status, 137);
        assert_eq!(wait.await.expect("join Wait").exit_status, 137);
        assert_eq!(stdout.read_to_end().await, "sleeping\n");
    });
    assert!(warned(k, &c.id), "{:#?}", k.containerd_log_lines(&c.id));
}
