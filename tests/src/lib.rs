//! End-to-end test harness for Kiln: a private containerd per test binary, driven with `ctr`.
//!
//! [`kiln()`] starts (once per test binary) a containerd of its own under a temporary
//! directory in /tmp, with the freshly built `containerd-shim-kiln-v1` first on its PATH and
//! the test images imported; it is stopped and its directory removed when the test binary
//! exits (through `atexit`). Tests create containers through [`Kiln::container`], whose guard
//! kills and deletes whatever is left of the container when the test ends, passed or failed.
//! When a test fails, the panic hook prints the containerd log lines about the test's
//! containers and the log's tail (the shim logs through containerd), and the output of the
//! test's detached containers.
//!
//! Environment knobs:
//! * `KILN_TEST_IMAGES=DIR`: where the test images are (default `<target>/test-images`; built
//!   with `scripts/build-test-images.sh DIR` when missing);
//! * `CONTAINERD_LOG_LEVEL=debug`: a more talkative containerd (and shim) log;
//! * `KILN_E2E_KEEP=1`: keep containerd's directory (log, state) after the run, for debugging;
//! * `KILN_E2E_SLOW=N`: multiply every deadline by N, on a slow (emulated) node; see
//!   [`process::slow_factor`].
//!
//! [`cri`] is the other harness: the same kind of private containerd, driven through the CRI as
//! kubelet drives it (pods, runtime handlers `runc` and `kiln`).
//!
//! [`probe`] is the `kiln-probe` binary's code (a gRPC cold-start probe, see
//! `scripts/bench-probe.sh`), in the library so that its parts are unit-tested with the rest.

pub mod cri;
pub mod net;
pub mod probe;
pub mod process;
pub mod registry;

use sha2::Digest as _;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use process::{Output, Proc, wait_until};

/// The runtime name containerd knows Kiln by.
pub const RUNTIME: &str = "io.containerd.kiln.v1";

/// The workloads `scripts/build-test-images.sh` builds, each imported as
/// `docker.io/kiln-test/<name>:latest`.
pub const WORKLOADS: &[&str] = &[
    "hello",
    "printargs",
    "fileio",
    "exitcode",
    "trap",
    "sleep",
    "memgrow",
    "spin",
    "tablegrow",
    "cli-p2",
    "net-p2",
    "http-p2",
];

/// Default deadline for one `ctr` command.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(30);

/// The image reference of test workload `name`.
pub fn image(name: &str) -> String {
    format!("docker.io/kiln-test/{name}:latest")
}

/// The private containerd and everything the tests need to find.
#[derive(Debug)]
pub struct Kiln {
    /// The repository root (holds `scripts/`).
    pub repo: PathBuf,
    /// The cargo profile directory holding the binaries (`target/debug`).
    pub bin_dir: PathBuf,
    /// Where the test images are (`target/test-images`).
    pub images_dir: PathBuf,
    /// containerd's directory (root, state, log, socket, cache).
    pub dir: PathBuf,
    /// containerd's socket.
    pub sock: String,
    /// The `ctr` matching the containerd under test.
    pub ctr: PathBuf,
    /// The environment containerd was started with (so a restart gives it the same).
    daemon_env: Vec<(String, String)>,
}

/// The directory of the containerd (and ctr) binaries under test: `KILN_E2E_CONTAINERD_BIN`
/// (e.g. a containerd 1.7 or 2.x unpacked by scripts/fetch-containerd.sh), else those on PATH.
pub(crate) fn containerd_bin_dir() -> Option<PathBuf> {
    std::env::var_os("KILN_E2E_CONTAINERD_BIN").map(PathBuf::from)
}

pub(crate) fn tool(name: &str) -> PathBuf {
    containerd_bin_dir()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

static KILN: OnceLock<Result<Kiln, String>> = OnceLock::new();
/// (stop script, containerd dir) for the atexit handler.
static TEARDOWN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The container ids the current test created, for the failure report.
    static TEST_IDS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The shared private containerd, started on first use.
///
/// Panics (failing the calling test) with a message saying what to build when the shim or the
/// images are missing, or when containerd does not start.
pub fn kiln() -> &'static Kiln {
    kiln_with_env(&[])
}

/// Like [`kiln`], with extra environment for containerd (and so the shim), e.g.
/// `KILN_SHIM_GROUPING`. The first call in a test binary decides it: use one setting per
/// test binary.
pub fn kiln_with_env(env: &[(&str, &str)]) -> &'static Kiln {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match KILN.get_or_init(|| setup(env)) {
        Ok(k) => k,
        Err(e) => panic!("the e2e environment could not be set up:\n{e}"),
    }
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The directory holding the workspace binaries: the test executable is
/// `<target>/<profile>/deps/<test>-<hash>`, so two levels up; `CARGO_TARGET_DIR/debug` and
/// `<repo>/target/debug` are the fallbacks.
pub(crate) fn find_bin_dir(repo: &Path) -> Result<PathBuf, String> {
    let shim = "containerd-shim-kiln-v1";
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(dir.to_path_buf());
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug"));
    }
    candidates.push(repo.join("target/debug"));
    for c in &candidates {
        if c.join(shim).is_file() {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "the shim binary {shim} was not found in {}.\n\
         Build it first: cargo build -j1 -p kiln-shim -p kiln-cli",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn missing_images(dir: &Path) -> Vec<String> {
    WORKLOADS
        .iter()
        .filter(|w| {
            !dir.join(format!("{w}.tar")).is_file() || !dir.join(format!("{w}.wasm")).is_file()
        })
        .map(|w| w.to_string())
        .collect()
}

/// Where the test images are (`KILN_TEST_IMAGES`, default `<target>/test-images`), built with
/// `scripts/build-test-images.sh` once per test binary when missing.
pub fn test_images_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let repo = repo_root();
        let bin_dir = find_bin_dir(&repo)?;
        let images_dir = match std::env::var_os("KILN_TEST_IMAGES") {
            Some(d) => PathBuf::from(d),
            None => bin_dir
                .parent()
                .map(|t| t.join("test-images"))
                .unwrap_or_else(|| repo.join("target/test-images")),
        };
        if !missing_images(&images_dir).is_empty() {
            eprintln!(
                "kiln-e2e: test images missing in {}; running scripts/build-test-images.sh",
                images_dir.display()
            );
            let mut cmd = Command::new(repo.join("scripts/build-test-images.sh"));
            cmd.arg(&images_dir).env(
                "CARGO_BUILD_JOBS",
                std::env::var("CARGO_BUILD_JOBS").unwrap_or_else(|_| "1".into()),
            );
            let out = process::run(cmd, Duration::from_secs(1800));
            let missing = missing_images(&images_dir);
            if !out.success() || !missing.is_empty() {
                return Err(format!(
                    "the test images are missing ({}) and building them failed.\n\
                     Build them with: scripts/build-test-images.sh {}\n{out}",
                    missing.join(", "),
                    images_dir.display()
                ));
            }
        }
        Ok(images_dir)
    })
    .clone()
}

fn setup(env: Vec<(String, String)>) -> Result<Kiln, String> {
    install_panic_hook();
    let repo = repo_root();
    let bin_dir = find_bin_dir(&repo)?;
    if !bin_dir.join("kiln").is_file() {
        return Err(format!(
            "the kiln CLI was not found in {}.\nBuild it first: cargo build -j1 -p kiln-shim -p kiln-cli",
            bin_dir.display()
        ));
    }
    for name in ["containerd", "ctr"] {
        let t = tool(name);
        if Command::new(&t).arg("--version").output().is_err() {
            return Err(format!("`{}` is not installed or not on PATH", t.display()));
        }
    }

    let images_dir = test_images_dir()?;

    let dir = tempfile::Builder::new()
        .prefix("kiln-e2e-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("create a temporary directory in /tmp: {e}"))?
        .keep();
    let script = repo.join("scripts/containerd-private.sh");
    let _ = TEARDOWN.set((script.clone(), dir.clone()));
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(teardown) };

    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let mut cmd = Command::new(&script);
    cmd.arg("start").arg(&dir);
    if let Some(bin) = containerd_bin_dir() {
        cmd.arg("--bin-dir").arg(bin);
    }
    let mut daemon_env = env;
    daemon_env.push(("PATH".to_string(), path));
    daemon_env.push((
        "KILN_CACHE_DIR".to_string(),
        dir.join("cache").display().to_string(),
    ));
    cmd.envs(daemon_env.iter().map(|(k, v)| (k, v)));
    let out = process::run(cmd, Duration::from_secs(60));
    if !out.success() {
        return Err(format!("starting containerd failed:\n{out}"));
    }
    let sock = out.stdout.trim().to_string();
    if sock.is_empty() {
        return Err(format!("containerd-private.sh printed no socket:\n{out}"));
    }
    std::fs::create_dir_all(dir.join("logs"))
        .map_err(|e| format!("create {}/logs: {e}", dir.display()))?;
    let k = Kiln {
        repo,
        bin_dir,
        images_dir,
        dir,
        sock,
        ctr: tool("ctr"),
        daemon_env,
    };
    for w in WORKLOADS {
        let tar = k.images_dir.join(format!("{w}.tar"));
        let out = k.import(&tar);
        if !out.success() {
            return Err(format!("importing {} failed:\n{out}", tar.display()));
        }
    }
    Ok(k)
}

extern "C" fn teardown() {
    if let Some((script, dir)) = TEARDOWN.get() {
        stop_private_containerd(script, dir);
    }
}

/// Stops the private containerd in `dir` with `script` (containerd-private.sh) and removes the
/// directory, unless `KILN_E2E_KEEP` is set.
pub(crate) fn stop_private_containerd(script: &Path, dir: &Path) {
    let _ = Command::new(script)
        .arg("stop")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status();
    if std::env::var_os("KILN_E2E_KEEP").is_some() {
        eprintln!("kiln-e2e: KILN_E2E_KEEP set; keeping {}", dir.display());
        return;
    }
    // Remove the directory only when nothing is mounted under it any more: a still-mounted
    // overlay would have its upper layer deleted through the mount point.
    let prefix = format!("{}/", dir.display());
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&prefix)));
    if mounted {
        eprintln!(
            "kiln-e2e: mounts remain under {}; leaving the directory in place",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(Ok(k)) = KILN.get() {
            let ids = TEST_IDS.with(|ids| ids.borrow().clone());
            eprintln!("{}", k.log_report(&ids));
        }
    }));
}

impl Kiln {
    /// Stops the containerd daemon (its shims and containers keep running), waits `down`, and
    /// starts it again with the same configuration: a node's containerd restarted.
    pub fn restart_containerd(&self, down: Duration) -> Output {
        let mut cmd = Command::new(self.repo.join("scripts/containerd-private.sh"));
        cmd.arg("restart")
            .arg(&self.dir)
            .arg("--down")
            .arg(format!("{:.3}", down.as_secs_f64()))
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        process::run(cmd, Duration::from_secs(60) + down)
    }

    /// containerd's log (it holds the shim's log lines too).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// The lines of containerd's log (which holds the shim's) that mention `id`.
    pub fn containerd_log_lines(&self, id: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(id))
            .map(str::to_string)
            .collect()
    }

    /// The version of the containerd under test, as (major, minor).
    pub fn containerd_version(&self) -> (u32, u32) {
        containerd_version()
    }

    /// Where a detached container's output goes.
    pub fn container_log(&self, id: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{id}.log"))
    }

    /// The output of the detached containers among `ids`, the containerd log lines mentioning
    /// any of `ids`, then the log's last lines.
    pub fn log_report(&self, ids: &[String]) -> String {
        let mut out = String::new();
        for id in ids {
            if let Ok(text) = std::fs::read_to_string(self.container_log(id)) {
                let tail: Vec<&str> = text.lines().collect();
                out += &format!("---- output of detached container {id} (last 20 lines) ----\n");
                for l in &tail[tail.len().saturating_sub(20)..] {
                    out += l;
                    out.push('\n');
                }
            }
        }
        out += &containerd_log_report(&self.log_path(), ids);
        out
    }

    /// `ctr -a SOCK <args>` with the default deadline.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// `ctr -a SOCK <args>` with a deadline.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        process::run(self.ctr_cmd(args), timeout)
    }

    /// The `ctr -a SOCK <args>` command, not started.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("-a").arg(&self.sock).args(args);
        cmd
    }

    /// Imports an image tarball (all platforms, so Wasm images are unpacked).
    pub fn import(&self, tar: &Path) -> Output {
        let tar = tar.to_string_lossy();
        self.ctr_timeout(
            &["images", "import", "--all-platforms", &tar],
            Duration::from_secs(60),
        )
    }

    /// Writes `img` (kiln-image's writer, the one `kiln image build` uses) to a temporary
    /// tarball and imports it.
    pub fn import_image(&self, img: &kiln_image::Image) -> Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar = dir.path().join("img.tar");
        std::fs::write(&tar, img.to_tar().expect("write the image tarball")).expect("write");
        self.import(&tar)
    }

    /// A container id unique to this test binary run, cleaned up when the guard drops.
    pub fn container(&'static self, name: &str) -> Container {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{name}-{}-{n}", std::process::id());
        TEST_IDS.with(|ids| ids.borrow_mut().push(id.clone()));
        Container { k: self, id }
    }

    /// The `kiln` CLI.
    pub fn kiln_cli(&self) -> PathBuf {
        self.bin_dir.join("kiln")
    }

    /// A test workload's module file.
    pub fn wasm(&self, name: &str) -> PathBuf {
        self.images_dir.join(format!("{name}.wasm"))
    }

    /// Imports a copy of workload `name` whose bytes (and so compile-cache key) are unique to
    /// this test binary run and `tag`: a custom section is appended. Its first run is a
    /// guaranteed cache miss. Returns the image reference and the module's cache key.
    pub fn import_unique(&self, name: &str, tag: &str) -> (String, String) {
        self.import_unique_as(name, tag, "")
    }

    /// [`Kiln::import_unique`] with the image config's `User` set to `user` (`uid[:gid]`;
    /// empty for none).
    pub fn import_unique_as(&self, name: &str, tag: &str, user: &str) -> (String, String) {
        let reference = format!("docker.io/kiln-test/{name}-{tag}:latest");
        let mut wasm = std::fs::read(self.wasm(name)).expect("read module");
        let payload = format!("{tag}-{}-{}", std::process::id(), self.dir.display());
        let section = b"kiln-test";
        let size = 1 + section.len() + payload.len();
        assert!(size < 128, "one-byte LEB128 section size");
        wasm.extend_from_slice(&[0, size as u8, section.len() as u8]);
        wasm.extend_from_slice(section);
        wasm.extend_from_slice(payload.as_bytes());
        let key = hex::encode(sha2::Sha256::digest(&wasm));
        let mut img = kiln_image::Image::single_file(&reference, &format!("/{name}.wasm"), wasm)
            .expect("describe the image");
        if !user.is_empty()
            && let Some(config) = img.exec_config_mut()
        {
            config.user = Some(user.to_string());
        }
        let out = self.import_image(&img);
        assert!(out.success(), "import {reference}:\n{out}");
        (reference, key)
    }

    /// The compile cache's artifact for the module with cache key `key`, if it is there.
    pub fn cached_artifact(&self, key: &str) -> Option<PathBuf> {
        std::fs::read_dir(self.dir.join("cache"))
            .ok()?
            .flatten()
            .map(|e| e.path().join(format!("{key}.cwasm")))
            .find(|p| p.is_file() && p.with_extension("sum").is_file())
    }

    /// `ctr task ls`, parsed.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        let out = self.ctr(&["task", "ls"]);
        assert!(out.success(), "ctr task ls failed:\n{out}");
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [id, pid, status] => Some(TaskInfo {
                        id: id.to_string(),
                        pid: pid.parse().ok()?,
                        status: status.to_string(),
                    }),
                    _ => None,
                }
            })
            .collect()
    }

    /// The task of container `id` in `ctr task ls`, if any.
    pub fn task(&self, id: &str) -> Option<TaskInfo> {
        self.tasks().into_iter().find(|t| t.id == id)
    }
}

/// One line of `ctr task ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Container id.
    pub id: String,
    /// The task's pid (Kiln: the worker).
    pub pid: u32,
    /// `CREATED`, `RUNNING`, `STOPPED`, ...
    pub status: String,
}

/// A container id owned by one test; dropping it kills and deletes whatever is left.
#[derive(Debug)]
pub struct Container {
    k: &'static Kiln,
    /// The container id.
    pub id: String,
}

impl Container {
    /// Starts describing `ctr run` of `image` (a full reference) as this container.
    pub fn run(&self, image: &str) -> Run {
        Run {
            k: self.k,
            id: self.id.clone(),
            image: image.to_string(),
            opts: Vec::new(),
            args: Vec::new(),
            timeout: CTR_TIMEOUT,
        }
    }

    /// `ctr task kill [-s SIG] ID`.
    pub fn kill(&self, signal: Option<&str>) -> Output {
        let mut args = vec!["task", "kill"];
        if let Some(s) = signal {
            args.extend(["-s", s]);
        }
        args.push(&self.id);
        self.k.ctr(&args)
    }

    /// `ctr task ps ID`, parsed into pids (panics if ctr fails).
    pub fn ps(&self) -> Vec<u32> {
        let out = self.k.ctr(&["task", "ps", &self.id]);
        assert!(out.success(), "ctr task ps failed:\n{out}");
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// `ctr task metrics ID`, as (metric, value) rows of its table.
    pub fn metrics(&self) -> (Output, Vec<(String, String)>) {
        let out = self.k.ctr(&["task", "metrics", &self.id]);
        let rows = out
            .stdout
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let key = f.next()?;
                let value = f.next()?;
                (f.next().is_none()).then(|| (key.to_string(), value.to_string()))
            })
            .collect();
        (out, rows)
    }

    /// `ctr task delete ID`.
    pub fn delete_task(&self) -> Output {
        self.k.ctr(&["task", "delete", &self.id])
    }

    /// `ctr container delete ID`.
    pub fn delete_container(&self) -> Output {
        self.k.ctr(&["container", "delete", &self.id])
    }

    /// This container's task in `ctr task ls`.
    pub fn task(&self) -> Option<TaskInfo> {
        self.k.task(&self.id)
    }

    /// The exit status of this container's task, as containerd holds it (asked over its gRPC
    /// API, so no client's wording has to be parsed); `None` while it runs or when there is
    /// no task.
    pub fn exit_status(&self) -> Option<u32> {
        use containerd_client::services::v1::GetRequest;
        use containerd_client::services::v1::tasks_client::TasksClient;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the gRPC call");
        rt.block_on(async {
            let ctx = probe::client::Ctx::connect(Path::new(&self.k.sock), "default")
                .await
                .expect("connect to containerd");
            let mut tasks = TasksClient::new(ctx.channel.clone());
            let resp = tasks
                .get(ctx.req(GetRequest {
                    container_id: self.id.clone(),
                    exec_id: String::new(),
                }))
                .await
                .ok()?
                .into_inner();
            let p = resp.process?;
            // containerd's Status: 3 is STOPPED.
            (p.status == 3).then_some(p.exit_status)
        })
    }

    /// Waits up to `timeout` for the task to reach `status`.
    pub fn wait_status(&self, status: &str, timeout: Duration) -> Option<TaskInfo> {
        wait_until(timeout, || self.task().filter(|t| t.status == status))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let t = Duration::from_secs(15);
        let id = self.id.as_str();
        let _ = self
            .k
            .ctr_timeout(&["task", "kill", "-s", "SIGKILL", id], t);
        let _ = self.k.ctr_timeout(&["task", "delete", "-f", id], t);
        let _ = self.k.ctr_timeout(&["container", "delete", id], t);
    }
}

/// A `ctr run` being described.
#[derive(Debug, Clone)]
pub struct Run {
    k: &'static Kiln,
    id: String,
    image: String,
    opts: Vec<String>,
    args: Vec<String>,
    timeout: Duration,
}

impl Run {
    /// `--env K=V`.
    pub fn env(mut self, kv: &str) -> Run {
        self.opts.extend(["--env".to_string(), kv.to_string()]);
        self
    }

    /// `--mount type=bind,src=SRC,dst=DST,options=rbind:rw|ro`.
    pub fn bind(mut self, src: &Path, dst: &str, read_only: bool) -> Run {
        let mode = if read_only { "ro" } else { "rw" };
        self.opts.extend([
            "--mount".to_string(),
            format!(
                "type=bind,src={},dst={dst},options=rbind:{mode}",
                src.display()
            ),
        ]);
        self
    }

    /// `--memory-limit BYTES`.
    pub fn memory_limit(mut self, bytes: u64) -> Run {
        self.opts
            .extend(["--memory-limit".to_string(), bytes.to_string()]);
        self
    }

    /// Any other `ctr run` option, e.g. `-t`.
    pub fn opt(mut self, opt: &str) -> Run {
        self.opts.push(opt.to_string());
        self
    }

    /// The process args (they replace the image's entrypoint and cmd, as `ctr run` does).
    pub fn args<I, S>(mut self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Deadline for the `ctr run` (default 30 s).
    pub fn timeout(mut self, t: Duration) -> Run {
        self.timeout = t;
        self
    }

    fn command(&self, mode: &str) -> Command {
        let mut cmd = self.k.ctr_cmd(&["run", mode, "--runtime", RUNTIME]);
        cmd.args(&self.opts)
            .arg(&self.image)
            .arg(&self.id)
            .args(&self.args);
        cmd
    }

    /// `ctr run --rm ...` in the foreground: waits for the container's exit (ctr exits with
    /// the container's status).
    pub fn output(self) -> Output {
        process::run(self.command("--rm"), self.timeout)
    }

    /// `ctr run --rm ...` with a pseudo-terminal as ctr's stdin (for `-t`).
    pub fn output_with_tty(self) -> Output {
        process::run_with_tty(self.command("--rm"), self.timeout)
    }

    /// `ctr run -d ...`: returns once the task is started. The container's stdout and stderr
    /// go to [`Kiln::container_log`] (`--log-uri file://...`), shown when a test fails.
    pub fn detach(mut self) -> Output {
        let log = self.k.container_log(&self.id);
        self.opts
            .extend(["--log-uri".to_string(), format!("file://{}", log.display())]);
        process::run(self.command("-d"), self.timeout)
    }

    /// `ctr run --rm ...` in the foreground, in the background: wait on the returned process.
    pub fn spawn(self) -> Proc {
        let mut cmd = self.command("--rm");
        cmd.stdin(std::process::Stdio::null());
        Proc::spawn(cmd).expect("spawn ctr")
    }
}

// ---- host-side inspection ----

/// A field of `/proc/PID/status` (e.g. `Threads`, `VmRSS`), trimmed; empty if unreadable.
/// The parent of process `pid`, from `/proc/PID/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// The children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| parent_of(*pid) == Some(parent))
                .collect()
        })
        .unwrap_or_default()
}

/// `out` is the failure of a Create that must be refused: it says `needle` and names the
/// container `id`, no task remains, nothing of it is left behind, and the shim still runs hello.
#[track_caller]
pub fn assert_refused(k: &'static Kiln, id: &str, out: &Output, needle: &str) {
    assert!(!out.timed_out && out.code() != 0, "must fail:\n{out}");
    assert!(out.stderr.contains(needle), "must say {needle:?}:\n{out}");
    assert!(
        out.stderr.contains(id),
        "must name the container {id}:\n{out}"
    );
    assert!(k.task(id).is_none(), "a task remains for {id}");
    assert_cleaned_up(id, Duration::from_secs(3));
    assert_hello_runs(k);
}

pub fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Pids of processes whose command line has `id` as one argument or whose cgroup path ends
/// with `/id` (the shim, its zygote and workers, anything left in the container's cgroup).
pub fn processes_of(id: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let suffix = format!("/{id}");
        let in_cgroup = cgroup.lines().any(|l| l.ends_with(&suffix));
        if args.iter().any(|a| a == id) || in_cgroup {
            found.push((pid, args.join(" ")));
        }
    }
    found
}

/// Whether the host uses the unified (v2-only) cgroup hierarchy.
pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Existing cgroup directories of `namespace/id` (ctr's default cgroups path), in every
/// hierarchy: `/sys/fs/cgroup/<controller>/ns/id` on v1, `/sys/fs/cgroup/ns/id` on v2.
pub fn cgroup_dirs(namespace: &str, id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join(namespace).join(id)];
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            candidates.push(e.path().join(namespace).join(id));
        }
    }
    candidates.sort();
    candidates.dedup();
    candidates.into_iter().filter(|p| p.is_dir()).collect()
}

/// Mount points (from /proc/self/mounts) whose path contains `needle`.
pub fn mounts_containing(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The cgroup path of `pid` for the memory controller (v1), or the unified path (v2).
pub fn memory_cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        if ctrls.split(',').any(|c| c == "memory") {
            return Some(path.to_string());
        }
        if ctrls.is_empty() {
            unified = Some(path.to_string());
        }
    }
    if cgroup_v2() { unified } else { None }
}

/// What is left on the host of container `id` (ctr's `default` namespace): its processes,
/// cgroup directories and mounts. Empty when everything is gone.
pub fn leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    for (pid, cmd) in processes_of(id) {
        left.push(format!("process {pid}: {cmd}"));
    }
    for d in cgroup_dirs("default", id) {
        left.push(format!("cgroup directory {}", d.display()));
    }
    for m in mounts_containing(id) {
        left.push(format!("mount {m}"));
    }
    left
}

/// Waits up to `timeout` for every trace of container `id` to be gone; panics listing what
/// remains.
#[track_caller]
pub fn assert_cleaned_up(id: &str, timeout: Duration) {
    let mut last = Vec::new();
    let clean = wait_until(timeout, || {
        last = leftovers(id);
        last.is_empty().then_some(())
    });
    assert!(
        clean.is_some(),
        "container {id}: still present {:?} after it ended:\n  {}",
        process::deadline(timeout),
        last.join("\n  ")
    );
}

/// Runs the hello image once more and checks its output: the shim and containerd still serve.
#[track_caller]
pub fn assert_hello_runs(k: &'static Kiln) {
    let c = k.container("hello-after");
    let out = c.run(&image("hello")).output();
    assert!(
        out.success() && out.stdout == "Hello from Kiln!\n",
        "a hello container no longer runs:\n{out}"
    );
}

/// The containerd log lines (at `log`) mentioning any of `ids`, then the log's last lines: the
/// end of every failure report.
pub(crate) fn containerd_log_report(log: &Path, ids: &[String]) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    if !ids.is_empty() {
        let about: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
            .collect();
        out += &format!(
            "---- containerd log: lines about {} ({} lines, last 60) ----\n",
            ids.join(", "),
            about.len()
        );
        for l in &about[about.len().saturating_sub(60)..] {
            out += l;
            out.push('\n');
        }
    }
    out += &format!(
        "---- containerd log {}: last 40 lines ----\n",
        log.display()
    );
    for l in &lines[lines.len().saturating_sub(40)..] {
        out += l;
        out.push('\n');
    }
    out += "---- end of containerd log ----";
    out
}

/// The version of the containerd under test (`containerd --version`), as (major, minor).
pub fn containerd_version() -> (u32, u32) {
    static V: OnceLock<(u32, u32)> = OnceLock::new();
    *V.get_or_init(|| {
        let out = Command::new(tool("containerd"))
            .arg("--version")
            .output()
            .expect("containerd --version");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "containerd github.com/containerd/containerd[/v2] 1.7.24~ds1 ..."
        let v = text.split_whitespace().nth(2).unwrap_or_default();
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next().and_then(|p| p.parse().ok());
        let minor = parts.next().and_then(|p| p.parse().ok());
        match (major, minor) {
            (Some(a), Some(b)) => (a, b),
            _ => panic!("cannot read a version from `containerd --version`: {text:?}"),
        }
    })
}
