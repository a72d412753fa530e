//! CRI test harness: drives a private containerd through the CRI (`runtime.v1`), the API kubelet
//! uses, so that pods and containers go through the same code paths in containerd (sandbox,
//! pause container, CNI, log files, stats) as on a Kubernetes node. Debian has neither a
//! kubelet nor `critest`; the `k8s-cri` crate gives the generated client.
//!
//! [`cri()`] starts (once per test binary) a containerd of its own with the CRI plugin, in a
//! network namespace the harness creates (`scripts/containerd-private.sh --cri --netns`): pod
//! networks (a CNI bridge) and host-network pods then live in that namespace and nothing on
//! the host's network changes. The sandbox image is a local pause image (no internet), and the
//! busybox image (`scripts/make-busybox-image.py`) is imported for runc containers. containerd
//! is stopped, the namespace deleted and the directory removed when the test binary exits.
//!
//! The API is synchronous, like the rest of the harness: every call runs on a small tokio
//! runtime inside [`Cri`] with a deadline ([`CALL_TIMEOUT`]), so a hung call fails its test.
//! [`Pod`] stops and removes its sandbox (and so its containers) when dropped, then removes the
//! pod's cgroup parent and log directory, which on a node belong to kubelet. When a test
//! fails, the panic hook prints the test's container log files and the containerd log lines
//! about its pods and containers.
//!
//! The containerd under test is the one on PATH, or the one in `KILN_E2E_CONTAINERD_BIN` (as
//! for the ctr tests). When the Kiln shim has been built, its directory is first on
//! containerd's PATH, so the `kiln` runtime handler works too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use containerd_client::tonic;
use containerd_client::tonic::transport::Channel;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

use crate::process::{self, Output};

/// The sandbox image containerd-private.sh builds and configures.
pub const SANDBOX_IMAGE: &str = "localhost/kiln/pause:1";
/// The static busybox image (Linux, for runc).
pub const BUSYBOX: &str = "docker.io/kiln-test/busybox:latest";
/// The Kubernetes namespace the harness's pods claim.
pub const POD_NAMESPACE: &str = "kiln-cri";
/// The containerd namespace the CRI plugin works in.
pub const CONTAINERD_NAMESPACE: &str = "k8s.io";
/// The pod annotation containerd's CRI reads the runtime handler of an image pull from
/// (kubelet copies pod annotations into the sandbox config it sends with PullImage).
pub const RUNTIME_HANDLER_ANNOTATION: &str = "io.containerd.cri.runtime-handler";
/// Deadline of one CRI call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

// ---- errors -----------------------------------------------------------------------------------

/// A CRI call that failed: its name and the gRPC status, or a harness-side failure (deadline,
/// wait) with no status code.
#[derive(Debug, Clone)]
pub struct CriError {
    /// The call, e.g. `RunPodSandbox`.
    pub call: String,
    /// The gRPC status code; `None` when the harness gave up (deadline, timeout of a wait).
    pub code: Option<tonic::Code>,
    /// The status message, or what the harness saw.
    pub message: String,
}

impl CriError {
    fn harness(call: &str, message: String) -> CriError {
        CriError {
            call: call.to_string(),
            code: None,
            message,
        }
    }

    /// Whether containerd answered NotFound.
    pub fn is_not_found(&self) -> bool {
        self.code == Some(tonic::Code::NotFound)
    }
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "{}: {:?}: {}", self.call, code, self.message),
            None => write!(f, "{}: {}", self.call, self.message),
        }
    }
}

impl std::error::Error for CriError {}

/// What the harness calls return.
pub type Result<T, E = CriError> = std::result::Result<T, E>;

// ---- the private containerd -------------------------------------------------------------------

/// The private containerd with its CRI plugin, and the client talking to it.
pub struct Cri {
    /// The repository root.
    pub repo: PathBuf,
    /// containerd's directory (config, root, state, log, socket, CNI, pod logs).
    pub dir: PathBuf,
    /// containerd's socket.
    pub sock: PathBuf,
    /// The network namespace containerd (and every pod network) lives in, under /run/netns.
    pub netns: String,
    /// The `ctr` matching the containerd under test.
    pub ctr: PathBuf,
    /// The directory holding containerd-shim-kiln-v1, when it has been built.
    pub kiln_bin_dir: Option<PathBuf>,
    /// The runtime's name and version as the CRI's Version call reports them.
    pub runtime_version: String,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cri")
            .field("dir", &self.dir)
            .field("netns", &self.netns)
            .field("runtime_version", &self.runtime_version)
            .finish_non_exhaustive()
    }
}

static CRI: OnceLock<Result<Cri, String>> = OnceLock::new();
/// (stop script, containerd dir) for the atexit handler.
static TEARDOWN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Pod and container ids the current test created, for the failure report.
    static TEST_IDS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// Log files of the current test's containers, for the failure report.
    static TEST_LOGS: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// The shared private CRI containerd, started on first use; panics (failing the calling test)
/// saying what is missing when it cannot start.
pub fn cri() -> &'static Cri {
    match CRI.get_or_init(setup) {
        Ok(c) => c,
        Err(e) => panic!("the CRI environment could not be set up:\n{e}"),
    }
}

/// The prefix of every cgroup parent this test binary's pods get (one directory per pod, at
/// the top of each hierarchy, as kubelet's cgroupfs driver makes `/kubepods/...`).
fn cgroup_prefix() -> String {
    format!("kiln-cri-{}-", std::process::id())
}

fn setup() -> Result<Cri, String> {
    install_panic_hook();
    let repo = crate::repo_root();
    let kiln_bin_dir = crate::find_bin_dir(&repo).ok();
    for name in ["containerd", "ctr"] {
        let t = crate::tool(name);
        if Command::new(&t).arg("--version").output().is_err() {
            return Err(format!("`{}` is not installed or not on PATH", t.display()));
        }
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("cc", "gcc libc6-dev"),
        ("python3", "python3"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("`{tool}` is missing (apt-get install {package})"));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        return Err(
            "the CNI plugins are missing (apt-get install containernetworking-plugins, \
             or run scripts/setup.sh)"
                .into(),
        );
    }

    let dir = tempfile::Builder::new()
        .prefix("kiln-cri-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("create a temporary directory in /tmp: {e}"))?
        .keep();
    let script = repo.join("scripts/containerd-private.sh");
    let _ = TEARDOWN.set((script.clone(), dir.clone()));
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(teardown) };

    let netns = format!("kiln-cri-{}", std::process::id());
    let system_path =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let path = match &kiln_bin_dir {
        Some(b) => format!("{}:{system_path}", b.display()),
        None => system_path,
    };
    let mut cmd = Command::new(&script);
    cmd.arg("start")
        .arg(&dir)
        .args(["--cri", "--netns", &netns]);
    if let Some(bin) = crate::containerd_bin_dir() {
        cmd.arg("--bin-dir").arg(bin);
    }
    cmd.env("PATH", path)
        .env("KILN_CACHE_DIR", dir.join("cache"));
    let out = process::run(cmd, Duration::from_secs(120));
    if !out.success() {
        return Err(format!("starting containerd with the CRI failed:\n{out}"));
    }
    let sock = PathBuf::from(out.stdout.trim());
    if sock.as_os_str().is_empty() {
        return Err(format!("containerd-private.sh printed no socket:\n{out}"));
    }
    let ctr = crate::tool("ctr");

    let busybox = dir.join("busybox.tar");
    let mut mk = Command::new("python3");
    mk.arg(repo.join("scripts/make-busybox-image.py"))
        .arg(&busybox)
        .args(["--ref", BUSYBOX]);
    let out = process::run(mk, Duration::from_secs(60));
    if !out.success() {
        return Err(format!("building the busybox image failed:\n{out}"));
    }
    let out = ctr_import(&ctr, &sock, &busybox, false);
    if !out.success() {
        return Err(format!("importing the busybox image failed:\n{out}"));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kiln-cri-client")
        .enable_all()
        .build()
        .map_err(|e| format!("start the CRI client's runtime: {e}"))?;
    let channel = rt
        .block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(&sock)).await
        })
        .map_err(|_| format!("connecting to {} timed out", sock.display()))?
        .map_err(|e| format!("connect to {}: {e}", sock.display()))?;
    let mut c = Cri {
        repo,
        dir,
        sock,
        netns,
        ctr,
        kiln_bin_dir,
        runtime_version: String::new(),
        rt,
        runtime: RuntimeServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
    };
    let v = c.version().map_err(|e| e.to_string())?;
    c.runtime_version = format!("{} {}", v.runtime_name, v.runtime_version);
    if v.runtime_api_version != "v1" {
        return Err(format!(
            "containerd speaks CRI {}, not v1",
            v.runtime_api_version
        ));
    }
    Ok(c)
}

extern "C" fn teardown() {
    let Some((script, dir)) = TEARDOWN.get() else {
        return;
    };
    crate::stop_private_containerd(script, dir);
    // The cgroup parents of pods whose guard never ran (a test aborted inside the harness).
    for d in cgroup_roots() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&cgroup_prefix())
            {
                let _ = remove_cgroup_tree(&e.path());
            }
        }
    }
}

fn ctr_import(ctr: &Path, sock: &Path, tar: &Path, all_platforms: bool) -> Output {
    let mut cmd = Command::new(ctr);
    cmd.arg("-a")
        .arg(sock)
        .args(["-n", CONTAINERD_NAMESPACE, "images", "import"]);
    if all_platforms {
        cmd.arg("--all-platforms");
    }
    cmd.arg(tar);
    process::run(cmd, Duration::from_secs(120))
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(Ok(c)) = CRI.get() {
            let ids = TEST_IDS.with(|ids| ids.borrow().clone());
            let logs = TEST_LOGS.with(|l| l.borrow().clone());
            eprintln!("{}", c.log_report(&ids, &logs));
        }
    }));
}

impl Cri {
    /// containerd's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// The tail of each of `logs` (container log files), then the containerd log lines about
    /// `ids` and the log's last lines.
    pub fn log_report(&self, ids: &[String], logs: &[PathBuf]) -> String {
        let mut out = String::new();
        for l in logs {
            if let Ok(text) = std::fs::read_to_string(l) {
                let lines: Vec<&str> = text.lines().collect();
                out += &format!("---- container log {} (last 20 lines) ----\n", l.display());
                for line in &lines[lines.len().saturating_sub(20)..] {
                    out += line;
                    out.push('\n');
                }
            }
        }
        out += &crate::containerd_log_report(&self.log_path(), ids);
        out
    }

    fn call<C, T, F, Fut>(&self, name: &str, client: C, f: F) -> Result<T>
    where
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(CriError {
                    call: name.to_string(),
                    code: Some(s.code()),
                    message: s.message().to_string(),
                }),
                Err(_) => Err(CriError::harness(
                    name,
                    format!("no answer within {CALL_TIMEOUT:?}"),
                )),
            }
        })
    }

    fn rpc<T, F, Fut>(&self, name: &str, f: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(name, self.runtime.clone(), f)
    }

    fn image_rpc<T, F, Fut>(&self, name: &str, f: F) -> Result<T>
    where
        F: FnOnce(ImageServiceClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(name, self.images.clone(), f)
    }

    /// `Version`.
    pub fn version(&self) -> Result<api::VersionResponse> {
        self.rpc("Version", |mut c| async move {
            c.version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
        })
    }

    /// `Status` (runtime and network conditions), verbose.
    pub fn status(&self) -> Result<api::StatusResponse> {
        self.rpc("Status", |mut c| async move {
            c.status(api::StatusRequest { verbose: true }).await
        })
    }

    /// Runs a pod sandbox as kubelet would (metadata, labels, log directory, cgroup parent,
    /// namespace options). The returned guard stops and removes it when dropped.
    pub fn run_pod(&'static self, spec: PodSpec) -> Result<Pod> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{}-{pid}-{n}", spec.name);
        let uid = format!("{pid}-{n}-{}", spec.name);
        let cgroup_parent = format!("/{}{n}", cgroup_prefix());
        let log_dir = self
            .dir
            .join("pods")
            .join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            CriError::harness(
                "RunPodSandbox",
                format!("create {}: {e}", log_dir.display()),
            )
        })?;
        let network = if spec.host_network {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        };
        let namespaces = api::NamespaceOption {
            network: network as i32,
            pid: api::NamespaceMode::Container as i32,
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.clone()),
            ("io.kubernetes.pod.namespace".into(), POD_NAMESPACE.into()),
            ("io.kubernetes.pod.uid".into(), uid.clone()),
        ]);
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: POD_NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: if spec.host_network {
                String::new()
            } else {
                name.clone()
            },
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels,
            annotations: spec.annotations.clone(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut pod = Pod {
            cri: self,
            id: String::new(),
            name,
            uid,
            handler: spec.handler.clone(),
            log_dir,
            cgroup_parent,
            config: config.clone(),
            namespaces,
            removed: false,
        };
        let handler = spec.handler;
        let resp = self.rpc("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: handler,
            })
            .await
        })?;
        pod.id = resp.pod_sandbox_id;
        TEST_IDS.with(|ids| ids.borrow_mut().push(pod.id.clone()));
        Ok(pod)
    }

    /// `ListPodSandbox`, of this harness's pods (by namespace label) or all.
    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>> {
        self.rpc("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
                .await
        })
        .map(|r| r.items)
    }

    /// `ListContainers`, optionally of one pod.
    pub fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<api::Container>> {
        let filter = pod_id.map(|p| api::ContainerFilter {
            pod_sandbox_id: p.to_string(),
            ..Default::default()
        });
        self.rpc("ListContainers", |mut c| async move {
            c.list_containers(api::ListContainersRequest { filter })
                .await
        })
        .map(|r| r.containers)
    }

    /// `ListContainerStats`, optionally of one pod.
    pub fn list_container_stats(&self, pod_id: Option<&str>) -> Result<Vec<api::ContainerStats>> {
        let filter = pod_id.map(|p| api::ContainerStatsFilter {
            pod_sandbox_id: p.to_string(),
            ..Default::default()
        });
        self.rpc("ListContainerStats", |mut c| async move {
            c.list_container_stats(api::ListContainerStatsRequest { filter })
                .await
        })
        .map(|r| r.stats)
    }

    /// `ListPodSandboxStats` of every pod.
    pub fn list_pod_stats(&self) -> Result<Vec<api::PodSandboxStats>> {
        self.rpc("ListPodSandboxStats", |mut c| async move {
            c.list_pod_sandbox_stats(api::ListPodSandboxStatsRequest { filter: None })
                .await
        })
        .map(|r| r.stats)
    }

    /// `ListImages`.
    pub fn list_images(&self) -> Result<Vec<api::Image>> {
        self.image_rpc("ListImages", |mut c| async move {
            c.list_images(api::ListImagesRequest { filter: None }).await
        })
        .map(|r| r.images)
    }

    /// `ImageStatus` of `reference`: `None` when the image is not there.
    pub fn image_status(&self, reference: &str) -> Result<Option<api::Image>> {
        let image = image_spec(reference);
        self.image_rpc("ImageStatus", |mut c| async move {
            c.image_status(api::ImageStatusRequest {
                image: Some(image),
                verbose: false,
            })
            .await
        })
        .map(|r| r.image)
    }

    /// `PullImage`: returns the image reference containerd resolved (its id).
    pub fn pull_image(&self, reference: &str) -> Result<String> {
        let image = image_spec(reference);
        self.image_rpc("PullImage", |mut c| async move {
            c.pull_image(api::PullImageRequest {
                image: Some(image),
                auth: None,
                sandbox_config: None,
            })
            .await
        })
        .map(|r| r.image_ref)
    }

    /// `ImageStatus` of `reference`, verbose: the image (`None` when it is not there) and the
    /// `info` map (containerd puts its view of the image, config included, under `info`).
    pub fn image_status_verbose(
        &self,
        reference: &str,
    ) -> Result<(Option<api::Image>, HashMap<String, String>)> {
        let image = image_spec(reference);
        self.image_rpc("ImageStatus", |mut c| async move {
            c.image_status(api::ImageStatusRequest {
                image: Some(image),
                verbose: true,
            })
            .await
        })
        .map(|r| (r.image, r.info))
    }

    /// `PullImage` as kubelet sends it for a pod: the image spec, and the pod's sandbox config
    /// (kubelet always sends it; containerd reads the runtime handler of an image pull from the
    /// pod annotation `io.containerd.cri.runtime-handler`, which `handler` sets, along with
    /// the image spec's `runtime_handler` that kubelet fills in with the
    /// RuntimeClassInImageCriApi feature gate).
    pub fn pull_image_for(&self, reference: &str, handler: Option<&str>) -> Result<String> {
        let mut image = image_spec(reference);
        let mut annotations = HashMap::new();
        if let Some(h) = handler {
            image.runtime_handler = h.to_string();
            annotations.insert(RUNTIME_HANDLER_ANNOTATION.to_string(), h.to_string());
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let sandbox = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: format!("pull-{}-{n}", std::process::id()),
                uid: format!("pull-{}-{n}", std::process::id()),
                namespace: POD_NAMESPACE.into(),
                attempt: 0,
            }),
            annotations,
            ..Default::default()
        };
        self.image_rpc("PullImage", |mut c| async move {
            c.pull_image(api::PullImageRequest {
                image: Some(image),
                auth: None,
                sandbox_config: Some(sandbox),
            })
            .await
        })
        .map(|r| r.image_ref)
    }

    /// `ctr -n k8s.io ARGS` against this containerd (what it stored: images, content,
    /// snapshots).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("-a")
            .arg(&self.sock)
            .args(["-n", CONTAINERD_NAMESPACE])
            .args(args);
        process::run(cmd, Duration::from_secs(60))
    }

    /// `RemoveImage`.
    pub fn remove_image(&self, reference: &str) -> Result<()> {
        let image = image_spec(reference);
        self.image_rpc("RemoveImage", |mut c| async move {
            c.remove_image(api::RemoveImageRequest { image: Some(image) })
                .await
        })
        .map(|_| ())
    }

    /// Imports an image tarball into the CRI's containerd namespace (`ctr -n k8s.io images
    /// import`); `all_platforms` for images that are not linux/amd64 (Wasm).
    pub fn import(&self, tar: &Path, all_platforms: bool) -> Output {
        ctr_import(&self.ctr, &self.sock, tar, all_platforms)
    }

    /// The path of the network namespace containerd lives in.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Runs `f` on a thread that has entered containerd's network namespace: sockets it opens
    /// reach the pod network (and that namespace's loopback), and only those.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        let ns = std::fs::File::open(self.netns_path())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open namespace fd; it changes only this thread, which
                // exists for `f` alone and ends with it.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `GET path` over HTTP/1.0 at `ip:port` from inside containerd's network namespace;
    /// returns the whole response (status line, headers, body).
    pub fn http_get(&self, ip: &str, port: u16, path: &str) -> std::io::Result<String> {
        let addr: std::net::SocketAddr = format!("{ip}:{port}")
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.in_netns(|| {
            let t = Duration::from_secs(5);
            let mut s = std::net::TcpStream::connect_timeout(&addr, t)?;
            s.set_read_timeout(Some(t))?;
            s.set_write_timeout(Some(t))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        })?
    }
}

impl Cri {
    /// Starts Debian's `docker-registry` inside containerd's network namespace, on
    /// 127.0.0.1 there (so containerd pulls from it over plain HTTP, as it does for any
    /// localhost registry) with its storage under containerd's directory. Stopped on drop.
    pub fn start_registry(&'static self) -> std::result::Result<Registry, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let port = 5000 + (n % 1000) as u16;
        let dir = self.dir.join(format!("registry-{n}"));
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: kiln-cri-test\n",
                dir.join("data").display()
            ),
        )
        .map_err(|e| format!("write {}: {e}", config.display()))?;
        let mut cmd = self.in_netns_cmd("docker-registry");
        cmd.arg("serve").arg(&config);
        cmd.stdin(std::process::Stdio::null());
        let mut proc = process::Proc::spawn(cmd)
            .map_err(|e| format!("{e} (apt-get install docker-registry)"))?;
        let up = process::wait_until(Duration::from_secs(20), || {
            if proc.has_exited() {
                return Some(false);
            }
            self.http_get("127.0.0.1", port, "/v2/")
                .ok()
                .filter(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
                .map(|_| true)
        });
        if up != Some(true) {
            // Ends it if it still runs, and collects what it said.
            let out = proc.wait(Duration::ZERO);
            return Err(format!(
                "docker-registry did not answer on 127.0.0.1:{port}:\n{out}"
            ));
        }
        Ok(Registry {
            cri: self,
            addr: format!("127.0.0.1:{port}"),
            _proc: proc,
        })
    }

    /// `nsenter --net=<containerd's namespace> -- program`: a command that runs in
    /// containerd's network namespace (and only that namespace).
    pub fn in_netns_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        cmd
    }
}

/// A registry in containerd's network namespace, from [`Cri::start_registry`].
pub struct Registry {
    cri: &'static Cri,
    /// `127.0.0.1:PORT` (inside containerd's network namespace).
    pub addr: String,
    /// The registry process; its drop kills and reaps it.
    _proc: process::Proc,
}

impl Registry {
    /// The full reference of `name:tag` in this registry.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.addr)
    }

    /// Pushes the OCI image-layout tarball `tar` as `name_tag` with skopeo (from inside the
    /// namespace); returns the reference. The blobs and manifests go as written
    /// (`--preserve-digests`: skopeo would otherwise gzip uncompressed tar layers), and an
    /// image index goes with every image it names (`--all`: skopeo would otherwise copy only
    /// the index's entry for the host's platform, which an index of Wasm images lacks).
    pub fn push(&self, tar: &Path, name_tag: &str) -> std::result::Result<String, Output> {
        let reference = self.reference(name_tag);
        let mut cmd = self.cri.in_netns_cmd("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci-archive:{}", tar.display()))
        .arg(format!("docker://{reference}"));
        let out = process::run(cmd, Duration::from_secs(120));
        if out.success() {
            Ok(reference)
        } else {
            Err(out)
        }
    }
}

fn image_spec(reference: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: reference.to_string(),
        ..Default::default()
    }
}

// ---- pods -------------------------------------------------------------------------------------

/// What [`Cri::run_pod`] runs.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// The pod's name (made unique per test binary run).
    pub name: String,
    /// The runtime handler: `runc` or `kiln`.
    pub handler: String,
    /// Host network (the default) or a pod network of its own.
    pub host_network: bool,
    /// Pod annotations.
    pub annotations: HashMap<String, String>,
}

impl PodSpec {
    /// A host-network pod `name` run with runtime handler `handler`.
    pub fn new(name: &str, handler: &str) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            handler: handler.to_string(),
            host_network: true,
            annotations: HashMap::new(),
        }
    }

    /// A pod network of its own (CNI bridge in containerd's network namespace).
    pub fn pod_network(mut self) -> PodSpec {
        self.host_network = false;
        self
    }

    /// A pod annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> PodSpec {
        self.annotations.insert(key.into(), value.into());
        self
    }
}

/// A running pod sandbox; dropping it stops and removes it with its containers.
pub struct Pod {
    cri: &'static Cri,
    /// The sandbox id.
    pub id: String,
    /// The pod's (unique) name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The runtime handler.
    pub handler: String,
    /// The pod's log directory (container logs go to `<name>/0.log` under it).
    pub log_dir: PathBuf,
    /// The pod's cgroup parent (cgroupfs syntax), one per pod.
    pub cgroup_parent: String,
    config: api::PodSandboxConfig,
    namespaces: api::NamespaceOption,
    removed: bool,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

impl Pod {
    /// `PodSandboxStatus`, verbose: the status and the runtime's extra information.
    pub fn status(&self) -> Result<(api::PodSandboxStatus, HashMap<String, String>)> {
        let id = self.id.clone();
        let r = self.cri.rpc("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })?;
        let status = r.status.ok_or_else(|| {
            CriError::harness("PodSandboxStatus", "the answer has no status".into())
        })?;
        Ok((status, r.info))
    }

    /// Whether the sandbox is SANDBOX_READY.
    pub fn ready(&self) -> Result<bool> {
        Ok(self.status()?.0.state == api::PodSandboxState::SandboxReady as i32)
    }

    /// The pod IP the CRI reports (`None` for host-network pods).
    pub fn ip(&self) -> Result<Option<String>> {
        Ok(self
            .status()?
            .0
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty()))
    }

    /// The pod's network namespace path, from the verbose status's runtime spec (`None` for a
    /// host-network pod, or when the runtime does not say).
    pub fn netns_path(&self) -> Result<Option<String>> {
        let (_, info) = self.status()?;
        let Some(info) = info.get("info") else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(info).map_err(|e| {
            CriError::harness("PodSandboxStatus", format!("verbose info is not JSON: {e}"))
        })?;
        let path = v["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        Ok(path)
    }

    /// `PodSandboxStats`.
    pub fn stats(&self) -> Result<api::PodSandboxStats> {
        let id = self.id.clone();
        self.cri
            .rpc("PodSandboxStats", |mut c| async move {
                c.pod_sandbox_stats(api::PodSandboxStatsRequest { pod_sandbox_id: id })
                    .await
            })?
            .stats
            .ok_or_else(|| CriError::harness("PodSandboxStats", "the answer has no stats".into()))
    }

    /// `ListContainerStats` of this pod's containers.
    pub fn container_stats(&self) -> Result<Vec<api::ContainerStats>> {
        self.cri.list_container_stats(Some(&self.id))
    }

    /// `CreateContainer` in this pod, as kubelet would (log path, namespaces, resources).
    pub fn create(&self, spec: &ContainerSpec) -> Result<Container> {
        let log_rel = format!("{}/0.log", spec.name);
        let log_path = self.log_dir.join(&log_rel);
        if let Some(d) = log_path.parent() {
            std::fs::create_dir_all(d).map_err(|e| {
                CriError::harness("CreateContainer", format!("create {}: {e}", d.display()))
            })?;
        }
        TEST_LOGS.with(|l| l.borrow_mut().push(log_path.clone()));
        let mut labels = spec.labels.clone();
        labels.insert("io.kubernetes.container.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.name".into(), self.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), POD_NAMESPACE.into());
        labels.insert("io.kubernetes.pod.uid".into(), self.uid.clone());
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(image_spec(&spec.image)),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec.working_dir.clone(),
            envs: spec
                .envs
                .iter()
                .map(|(k, v)| api::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            labels,
            annotations: spec.annotations.clone(),
            log_path: log_rel,
            linux: Some(api::LinuxContainerConfig {
                resources: Some(api::LinuxContainerResources {
                    memory_limit_in_bytes: spec.memory_limit.unwrap_or(0),
                    cpu_shares: spec.cpu_shares.unwrap_or(0),
                    cpu_period: spec.cpu_quota.map_or(0, |_| 100_000),
                    cpu_quota: spec.cpu_quota.unwrap_or(0),
                    ..Default::default()
                }),
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(self.namespaces.clone()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let pod_id = self.id.clone();
        let sandbox = self.config.clone();
        let r = self.cri.rpc("CreateContainer", |mut c| async move {
            c.create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod_id,
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await
        })?;
        TEST_IDS.with(|ids| ids.borrow_mut().push(r.container_id.clone()));
        Ok(Container {
            cri: self.cri,
            id: r.container_id,
            name: spec.name.clone(),
            pod_id: self.id.clone(),
            log_path,
        })
    }

    /// `CreateContainer`, then `StartContainer`.
    pub fn run(&self, spec: &ContainerSpec) -> Result<Container> {
        let c = self.create(spec)?;
        c.start()?;
        Ok(c)
    }

    /// `StopPodSandbox`.
    pub fn stop(&self) -> Result<()> {
        let id = self.id.clone();
        self.cri
            .rpc("StopPodSandbox", |mut c| async move {
                c.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: id })
                    .await
            })
            .map(|_| ())
    }

    /// What of this pod could remain on the host, to check after [`Pod::remove`].
    pub fn traces(&self) -> Result<Traces> {
        let containers = self
            .cri
            .list_containers(Some(&self.id))?
            .into_iter()
            .map(|c| c.id)
            .collect();
        Ok(Traces {
            cri: self.cri,
            pod_id: self.id.clone(),
            containers,
            cgroup_parent: self.cgroup_parent.clone(),
            netns: self.netns_path()?,
            log_dir: self.log_dir.clone(),
        })
    }

    /// `StopPodSandbox` and `RemovePodSandbox` (which removes the pod's containers), then the
    /// pod's cgroup parent and log directory: what kubelet does when a pod is deleted.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.remove_inner()
    }

    fn remove_inner(&self) -> Result<()> {
        self.stop()?;
        let id = self.id.clone();
        self.cri.rpc("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })?;
        let mut problems = Vec::new();
        for d in cgroup_dirs(&self.cgroup_parent) {
            if let Err(e) = remove_cgroup_tree(&d) {
                problems.push(format!("rmdir {}: {e}", d.display()));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.log_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {e}", self.log_dir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CriError::harness("remove pod", problems.join("; ")))
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.removed || self.id.is_empty() {
            // Removed already, or RunPodSandbox failed: only what the harness made may be left.
            for d in cgroup_dirs(&self.cgroup_parent) {
                let _ = remove_cgroup_tree(&d);
            }
            let _ = std::fs::remove_dir_all(&self.log_dir);
            return;
        }
        if let Err(e) = self.remove_inner() {
            eprintln!("kiln-cri: cleaning up pod {} ({}): {e}", self.name, self.id);
        }
    }
}

/// What a removed pod may have left: its sandbox and container ids, cgroup parent, network
/// namespace and log directory.
#[derive(Debug, Clone)]
pub struct Traces {
    cri: &'static Cri,
    /// The sandbox id.
    pub pod_id: String,
    /// The pod's container ids.
    pub containers: Vec<String>,
    /// The pod's cgroup parent.
    pub cgroup_parent: String,
    /// The pod's network namespace mount (pod-network pods).
    pub netns: Option<String>,
    /// The pod's log directory.
    pub log_dir: PathBuf,
}

impl Traces {
    /// What is left: sandbox or containers the CRI still lists, processes (the shim, the pause
    /// and container processes), mounts, cgroup directories, the network namespace mount and
    /// the log directory. Empty when everything is gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        match self.cri.list_pods() {
            Ok(pods) => {
                if pods.iter().any(|p| p.id == self.pod_id) {
                    left.push(format!("sandbox {} (ListPodSandbox)", self.pod_id));
                }
            }
            Err(e) => left.push(format!("ListPodSandbox failed: {e}")),
        }
        match self.cri.list_containers(None) {
            Ok(cs) => {
                for c in cs.iter().filter(|c| c.pod_sandbox_id == self.pod_id) {
                    left.push(format!("container {} (ListContainers)", c.id));
                }
            }
            Err(e) => left.push(format!("ListContainers failed: {e}")),
        }
        let parent = self.cgroup_parent.trim_start_matches('/');
        for id in std::iter::once(&self.pod_id).chain(&self.containers) {
            for (pid, cmd) in crate::processes_of(id) {
                left.push(format!("process {pid}: {cmd}"));
            }
            for m in crate::mounts_containing(id) {
                left.push(format!("mount {m}"));
            }
        }
        for (pid, cmd) in processes_in_cgroup(parent) {
            left.push(format!("process {pid} in the pod's cgroup: {cmd}"));
        }
        for d in cgroup_dirs(&self.cgroup_parent) {
            left.push(format!("cgroup directory {}", d.display()));
        }
        if let Some(ns) = &self.netns {
            for m in crate::mounts_containing(ns) {
                left.push(format!("network namespace mount {m}"));
            }
        }
        if self.log_dir.exists() {
            left.push(format!("log directory {}", self.log_dir.display()));
        }
        left.sort();
        left.dedup();
        left
    }

    /// Waits up to `timeout` for every trace to be gone; panics listing what remains.
    #[track_caller]
    pub fn assert_gone(&self, timeout: Duration) {
        let mut last = Vec::new();
        let clean = process::wait_until(timeout, || {
            last = self.leftovers();
            last.is_empty().then_some(())
        });
        assert!(
            clean.is_some(),
            "pod {}: still present {timeout:?} after it was removed:\n  {}",
            self.pod_id,
            last.join("\n  ")
        );
    }
}

/// The cgroup hierarchies' roots: every mounted hierarchy under /sys/fs/cgroup (v1, and the
/// hybrid layout's unified one), or /sys/fs/cgroup itself on a v2-only host.
fn cgroup_roots() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = Vec::new();
    if root.join("cgroup.controllers").exists() {
        roots.push(root.to_path_buf());
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("cgroup.procs").exists() {
                roots.push(p);
            }
        }
    }
    roots
}

/// Existing directories of cgroup `path` (cgroupfs syntax) in every hierarchy.
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(rel))
        .filter(|d| d.is_dir())
        .collect()
}

/// Removes a cgroup directory and its (empty) children, deepest first; retries for a while,
/// as a cgroup stays busy for a moment after its last process exits.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Processes whose cgroup (in any hierarchy) is `parent` or below it.
fn processes_in_cgroup(parent: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let needle = format!("/{parent}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let inside = cgroup.lines().any(|l| {
            l.splitn(3, ':')
                .nth(2)
                .is_some_and(|p| p == needle || p.starts_with(&format!("{needle}/")))
        });
        if inside {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            found.push((pid, cmd.trim().to_string()));
        }
    }
    found
}

// ---- containers -------------------------------------------------------------------------------

/// What [`Pod::create`] creates.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The container's name in the pod.
    pub name: String,
    /// The image reference.
    pub image: String,
    /// The entrypoint (replaces the image's, as a pod spec's `command` does).
    pub command: Vec<String>,
    /// The arguments (a pod spec's `args`).
    pub args: Vec<String>,
    /// The working directory.
    pub working_dir: String,
    /// Environment variables.
    pub envs: Vec<(String, String)>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// CPU shares.
    pub cpu_shares: Option<i64>,
    /// CPU quota per 100 ms period, in microseconds.
    pub cpu_quota: Option<i64>,
    /// Container labels.
    pub labels: HashMap<String, String>,
    /// Container annotations.
    pub annotations: HashMap<String, String>,
}

impl ContainerSpec {
    /// Container `name` of `image` with the image's entrypoint.
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_string(),
            image: image.to_string(),
            ..Default::default()
        }
    }

    /// A busybox container running `sh -c SCRIPT`.
    pub fn busybox_sh(name: &str, script: &str) -> ContainerSpec {
        ContainerSpec::new(name, BUSYBOX).command(["/bin/sh", "-c", script])
    }

    /// The command.
    pub fn command<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, cmd: I) -> ContainerSpec {
        self.command = cmd.into_iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// The arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, args: I) -> ContainerSpec {
        self.args = args.into_iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// One environment variable.
    pub fn env(mut self, key: &str, value: &str) -> ContainerSpec {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The memory limit.
    pub fn memory_limit(mut self, bytes: i64) -> ContainerSpec {
        self.memory_limit = Some(bytes);
        self
    }
}

/// A container's state in the CRI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// CONTAINER_CREATED.
    Created,
    /// CONTAINER_RUNNING.
    Running,
    /// CONTAINER_EXITED.
    Exited,
    /// CONTAINER_UNKNOWN (or a value this client does not know).
    Unknown,
}

impl State {
    fn from_api(v: i32) -> State {
        match api::ContainerState::try_from(v) {
            Ok(api::ContainerState::ContainerCreated) => State::Created,
            Ok(api::ContainerState::ContainerRunning) => State::Running,
            Ok(api::ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        }
    }
}

/// The parts of `ContainerStatus` the tests look at, and the whole answer.
#[derive(Debug, Clone)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The exit code (meaningful once EXITED).
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, ...
    pub reason: String,
    /// The runtime's message.
    pub message: String,
    /// Unix nanoseconds.
    pub started_at: i64,
    /// Unix nanoseconds.
    pub finished_at: i64,
    /// The whole status.
    pub raw: api::ContainerStatus,
}

/// The result of `ExecSync`.
#[derive(Debug, Clone)]
pub struct ExecResult {
    /// The command's exit code.
    pub exit_code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// A container created through the CRI. It has no guard of its own: its pod's removes it.
#[derive(Debug, Clone)]
pub struct Container {
    cri: &'static Cri,
    /// The container id.
    pub id: String,
    /// Its name in the pod.
    pub name: String,
    /// The sandbox id.
    pub pod_id: String,
    /// The CRI log file.
    pub log_path: PathBuf,
}

impl Container {
    /// `StartContainer`.
    pub fn start(&self) -> Result<()> {
        let id = self.id.clone();
        self.cri
            .rpc("StartContainer", |mut c| async move {
                c.start_container(api::StartContainerRequest { container_id: id })
                    .await
            })
            .map(|_| ())
    }

    /// `StopContainer` with a grace period of `timeout_secs` (then SIGKILL).
    pub fn stop(&self, timeout_secs: i64) -> Result<()> {
        let id = self.id.clone();
        self.cri
            .rpc("StopContainer", |mut c| async move {
                c.stop_container(api::StopContainerRequest {
                    container_id: id,
                    timeout: timeout_secs,
                })
                .await
            })
            .map(|_| ())
    }

    /// `RemoveContainer`.
    pub fn remove(&self) -> Result<()> {
        let id = self.id.clone();
        self.cri
            .rpc("RemoveContainer", |mut c| async move {
                c.remove_container(api::RemoveContainerRequest { container_id: id })
                    .await
            })
            .map(|_| ())
    }

    /// `ContainerStatus`.
    pub fn status(&self) -> Result<Status> {
        let id = self.id.clone();
        let r = self.cri.rpc("ContainerStatus", |mut c| async move {
            c.container_status(api::ContainerStatusRequest {
                container_id: id,
                verbose: false,
            })
            .await
        })?;
        let s = r.status.ok_or_else(|| {
            CriError::harness("ContainerStatus", "the answer has no status".into())
        })?;
        Ok(Status {
            state: State::from_api(s.state),
            exit_code: s.exit_code,
            reason: s.reason.clone(),
            message: s.message.clone(),
            started_at: s.started_at,
            finished_at: s.finished_at,
            raw: s,
        })
    }

    /// The verbose `ContainerStatus`'s extra information (`info`: JSON with the runtime spec,
    /// pid, ...).
    pub fn status_info(&self) -> Result<serde_json::Value> {
        let id = self.id.clone();
        let r = self.cri.rpc("ContainerStatus", |mut c| async move {
            c.container_status(api::ContainerStatusRequest {
                container_id: id,
                verbose: true,
            })
            .await
        })?;
        let info = r.info.get("info").cloned().unwrap_or_default();
        serde_json::from_str(&info).map_err(|e| {
            CriError::harness("ContainerStatus", format!("verbose info is not JSON: {e}"))
        })
    }

    /// Polls `ContainerStatus` (every 2 ms) until the state is `state`; the last status is in
    /// the error when `timeout` passes first.
    pub fn wait_state(&self, state: State, timeout: Duration) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if s.state == state {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(CriError::harness(
                    "wait for container state",
                    format!(
                        "container {} not {state:?} after {timeout:?}; last status: {:?} exit \
                         {} reason {:?} message {:?}",
                        self.id, s.state, s.exit_code, s.reason, s.message
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for CONTAINER_EXITED.
    pub fn wait_exited(&self, timeout: Duration) -> Result<Status> {
        self.wait_state(State::Exited, timeout)
    }

    /// The container's CRI log file, parsed.
    pub fn logs(&self) -> std::result::Result<Vec<LogLine>, String> {
        let text = std::fs::read_to_string(&self.log_path)
            .map_err(|e| format!("read {}: {e}", self.log_path.display()))?;
        parse_log(&text)
    }

    /// `ContainerStats`.
    pub fn stats(&self) -> Result<api::ContainerStats> {
        let id = self.id.clone();
        self.cri
            .rpc("ContainerStats", |mut c| async move {
                c.container_stats(api::ContainerStatsRequest { container_id: id })
                    .await
            })?
            .stats
            .ok_or_else(|| CriError::harness("ContainerStats", "the answer has no stats".into()))
    }

    /// `ExecSync` of `cmd` with a timeout (whole seconds, at least 1).
    pub fn exec_sync(&self, cmd: &[&str], timeout: Duration) -> Result<ExecResult> {
        let id = self.id.clone();
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let secs = timeout.as_secs().max(1) as i64;
        let r = self.cri.rpc("ExecSync", |mut c| async move {
            c.exec_sync(api::ExecSyncRequest {
                container_id: id,
                cmd,
                timeout: secs,
            })
            .await
        })?;
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }
}

// ---- the CRI log format -----------------------------------------------------------------------

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// One line of a CRI log file: `TIMESTAMP STREAM TAGS CONTENT`, TAGS being `F` (the content
/// ends a line) or `P` (a part of a line: too long, or the stream ended without a newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 timestamp with nanoseconds, as written.
    pub time: String,
    /// The stream.
    pub stream: Stream,
    /// `P`: the content does not end a line.
    pub partial: bool,
    /// The content, without the newline.
    pub content: String,
}

/// Parses a CRI log file; an error names the first malformed line.
pub fn parse_log(text: &str) -> std::result::Result<Vec<LogLine>, String> {
    let mut out = Vec::new();
    for (n, line) in text.split_terminator('\n').enumerate() {
        let bad = |why: &str| format!("log line {}: {why}: {line:?}", n + 1);
        let mut parts = line.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tags), Some(content)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not `TIMESTAMP STREAM TAGS CONTENT`"));
        };
        if !is_rfc3339_nano(time) {
            return Err(bad("the timestamp is not RFC 3339"));
        }
        let stream = match stream {
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            _ => return Err(bad("the stream is neither stdout nor stderr")),
        };
        let partial = match tags.split(':').next() {
            Some("F") => false,
            Some("P") => true,
            _ => return Err(bad("the tag is neither F nor P")),
        };
        out.push(LogLine {
            time: time.to_string(),
            stream,
            partial,
            content: content.to_string(),
        });
    }
    Ok(out)
}

/// The text of one stream put back together: contents in order, a newline after each full line.
pub fn stream_text(lines: &[LogLine], stream: Stream) -> String {
    let mut s = String::new();
    for l in lines.iter().filter(|l| l.stream == stream) {
        s += &l.content;
        if !l.partial {
            s.push('\n');
        }
    }
    s
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn is_rfc3339_nano(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || b[10] != b'T'
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return false;
        }
    }
    match &b[i..] {
        [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

// ---- figures ----------------------------------------------------------------------------------

/// What [`compare`] runs for one runtime handler.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The runtime handler (`runc`, `kiln`).
    pub handler: String,
    /// A short-lived container, timed from CreateContainer to EXITED; it must exit 0.
    pub echo: ContainerSpec,
    /// A long-lived container, started after the echo, whose pod is then measured.
    pub idle: ContainerSpec,
}

/// One process of a measured pod: the shim or one of its descendants.
#[derive(Debug, Clone)]
pub struct PodProcess {
    /// The pid.
    pub pid: u32,
    /// `shim`, `sandbox` (the pod's sandbox process: pause, or Kiln's sandbox worker),
    /// `container` (the idle container's process) or `other` (Kiln's zygote, any helper).
    pub role: &'static str,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// The file name of `/proc/PID/exe` (`containerd-shim-kiln-v1`, `pause`, ...).
    pub exe: String,
    /// The process's memory, from `/proc/PID/smaps_rollup`.
    pub mem: Smaps,
}

/// The fields of `/proc/PID/smaps_rollup` that tell a pod's own memory from what it shares
/// with the rest of the node, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Smaps {
    /// `Pss`: each page divided by the number of processes mapping it.
    pub pss: u64,
    /// `Pss_Anon`: of that, anonymous memory (heap, stacks, pages copied on write).
    pub pss_anon: u64,
    /// `Pss_File`: of that, pages of files (binaries, libraries, mapped compiled code), which
    /// every process on the node that maps the same file shares.
    pub pss_file: u64,
    /// `Private_Clean` + `Private_Dirty`: pages no other process maps, what the process alone
    /// costs the node (its USS).
    pub uss: u64,
    /// `Rss`.
    pub rss: u64,
}

/// One round of one runtime handler, from [`compare`].
#[derive(Debug, Clone)]
pub struct Round {
    /// The order of the handler in its round (0: first).
    pub position: usize,
    /// RunPodSandbox.
    pub run_pod: Duration,
    /// CreateContainer of the echo container.
    pub create: Duration,
    /// StartContainer until ContainerStatus says EXITED (polled every 2 ms).
    pub start_exited: Duration,
    /// The pod's working set (PodSandboxStats) with the idle container running, bytes.
    pub pod_working_set: u64,
    /// The idle container's working set (ContainerStats), bytes.
    pub container_working_set: u64,
    /// The shim that runs the pod and all its descendants, with the idle container running.
    pub processes: Vec<PodProcess>,
    /// Processes outside the pod running the shim's binary at that moment (other pods' shims,
    /// a shim still idling after its pod, their children): they share the binary's file pages
    /// with the pod, and so lower its PSS.
    pub peers: usize,
}

impl Round {
    /// CreateContainer + StartContainer until EXITED.
    pub fn create_start_exited(&self) -> Duration {
        self.create + self.start_exited
    }

    /// The pod's memory: its shim and every descendant, summed.
    pub fn pod_mem(&self) -> Smaps {
        self.mem_of(|_| true)
    }

    /// The memory of the pod's processes of `role`, summed.
    pub fn role_mem(&self, role: &str) -> Smaps {
        self.mem_of(|p| p.role == role)
    }

    fn mem_of(&self, keep: impl Fn(&PodProcess) -> bool) -> Smaps {
        self.processes
            .iter()
            .filter(|p| keep(p))
            .fold(Smaps::default(), |a, p| Smaps {
                pss: a.pss + p.mem.pss,
                pss_anon: a.pss_anon + p.mem.pss_anon,
                pss_file: a.pss_file + p.mem.pss_file,
                uss: a.uss + p.mem.uss,
                rss: a.rss + p.mem.rss,
            })
    }
}

/// Every measured round of one runtime handler.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The runtime handler.
    pub handler: String,
    /// The echo container's image and command.
    pub echo: String,
    /// The idle container's image and command.
    pub idle: String,
    /// The rounds, in order.
    pub rounds: Vec<Round>,
}

fn describe(spec: &ContainerSpec) -> String {
    std::iter::once(spec.image.as_str())
        .chain(spec.command.iter().map(String::as_str))
        .chain(spec.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn smaps_json(m: &Smaps) -> serde_json::Value {
    serde_json::json!({
        "pss_kib": m.pss, "pss_anon_kib": m.pss_anon, "pss_file_kib": m.pss_file,
        "uss_kib": m.uss, "rss_kib": m.rss,
    })
}

impl Figures {
    /// The rounds as JSON: times in ms, working sets in bytes, process memory in KiB.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let rounds: Vec<serde_json::Value> = self
            .rounds
            .iter()
            .map(|r| {
                serde_json::json!({
                    "position": r.position,
                    "run_pod_ms": ms(r.run_pod),
                    "create_ms": ms(r.create),
                    "start_exited_ms": ms(r.start_exited),
                    "create_start_exited_ms": ms(r.create_start_exited()),
                    "pod_working_set_bytes": r.pod_working_set,
                    "container_working_set_bytes": r.container_working_set,
                    "pod": smaps_json(&r.pod_mem()),
                    "peers": r.peers,
                    "processes": r.processes.iter().map(|p| {
                        let mut j = smaps_json(&p.mem);
                        j["pid"] = p.pid.into();
                        j["role"] = p.role.into();
                        j["comm"] = p.comm.as_str().into();
                        j["exe"] = p.exe.as_str().into();
                        j
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "handler": self.handler,
            "echo": self.echo,
            "idle": self.idle,
            "rounds": rounds,
        })
    }
}

/// Measures `subjects` against each other: one untimed warm-up round each (it fills Kiln's
/// compile cache), then `rounds` rounds, each running every subject once, in turn, in an order
/// that alternates from one round to the next, so that a drift of the machine touches all
/// alike. Each subject's round: a host-network pod, the echo container timed from create to
/// EXITED (it must exit 0), the idle container started in the same pod and, after `settle`,
/// the pod's working set (PodSandboxStats), the idle container's (ContainerStats) and the PSS
/// of the pod's shim and all its descendants; then the pod is removed. Timing is reported,
/// never judged.
pub fn compare(
    cri: &'static Cri,
    subjects: &[Subject],
    rounds: usize,
    settle: Duration,
) -> Result<Vec<Figures>> {
    for s in subjects {
        measure_round(cri, s, 0, settle)?;
    }
    let mut figures: Vec<Figures> = subjects
        .iter()
        .map(|s| Figures {
            handler: s.handler.clone(),
            echo: describe(&s.echo),
            idle: describe(&s.idle),
            rounds: Vec::with_capacity(rounds),
        })
        .collect();
    for i in 0..rounds {
        let mut order: Vec<usize> = (0..subjects.len()).collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for (position, &k) in order.iter().enumerate() {
            let r = measure_round(cri, &subjects[k], position, settle)?;
            figures[k].rounds.push(r);
        }
    }
    Ok(figures)
}

fn measure_round(
    cri: &'static Cri,
    subject: &Subject,
    position: usize,
    settle: Duration,
) -> Result<Round> {
    let t0 = Instant::now();
    let pod = cri.run_pod(PodSpec::new(
        &format!("figures-{}", subject.handler),
        &subject.handler,
    ))?;
    let run_pod = t0.elapsed();

    let t1 = Instant::now();
    let c = pod.create(&subject.echo)?;
    let create = t1.elapsed();
    let t2 = Instant::now();
    c.start()?;
    let s = c.wait_exited(Duration::from_secs(60))?;
    let start_exited = t2.elapsed();
    if s.exit_code != 0 {
        return Err(CriError::harness(
            "measure",
            format!(
                "{}: the echo container exited {} ({})",
                subject.handler, s.exit_code, s.reason
            ),
        ));
    }

    let idle = pod.run(&subject.idle)?;
    idle.wait_state(State::Running, Duration::from_secs(30))?;
    std::thread::sleep(settle);
    let ws = |m: Option<&api::MemoryUsage>| {
        m.and_then(|m| m.working_set_bytes.as_ref())
            .map_or(0, |v| v.value)
    };
    let ps = pod.stats()?;
    let pod_working_set = ws(ps.linux.as_ref().and_then(|l| l.memory.as_ref()));
    let cs = idle.stats()?;
    let container_working_set = ws(cs.memory.as_ref());
    let (processes, peers) = pod_processes(&pod, &idle)?;
    pod.remove()?;
    Ok(Round {
        position,
        run_pod,
        create,
        start_exited,
        pod_working_set,
        container_working_set,
        processes,
        peers,
    })
}

fn info_pid(call: &str, info: &serde_json::Value) -> Result<u32> {
    info["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| CriError::harness(call, format!("no pid in the verbose info: {info}")))
}

/// The shim that runs `pod` (the sandbox process's parent) and all its descendants, with their
/// memory, roles told apart by the pids the CRI reports for the sandbox and `idle`; and how many
/// processes outside the pod run the shim's binary.
fn pod_processes(pod: &Pod, idle: &Container) -> Result<(Vec<PodProcess>, usize)> {
    let (_, info) = pod.status()?;
    let info: serde_json::Value = serde_json::from_str(info.get("info").map_or("", |s| s))
        .map_err(|e| CriError::harness("PodSandboxStatus", format!("verbose info: {e}")))?;
    let sandbox = info_pid("PodSandboxStatus", &info)?;
    let container = info_pid("ContainerStatus", &idle.status_info()?)?;
    let parents = parent_pids();
    let shim = parents.get(&sandbox).copied().ok_or_else(|| {
        CriError::harness("measure", format!("the sandbox process {sandbox} is gone"))
    })?;
    let mut tree = vec![shim];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        let mut children: Vec<u32> = parents
            .iter()
            .filter(|&(_, &pp)| pp == p)
            .map(|(&c, _)| c)
            .collect();
        children.sort_unstable();
        tree.extend(children);
        i += 1;
    }
    let exe_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let shim_exe = exe_of(shim);
    let peers = parents
        .keys()
        .filter(|p| !tree.contains(p))
        .filter(|&&p| shim_exe.is_some() && exe_of(p) == shim_exe)
        .count();
    let mut out = Vec::new();
    for pid in tree {
        let Some(mem) = smaps_rollup(pid) else {
            continue; // gone meanwhile, or a kernel thread
        };
        let role = match pid {
            p if p == shim => "shim",
            p if p == sandbox => "sandbox",
            p if p == container => "container",
            _ => "other",
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let exe = exe_of(pid)
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        out.push(PodProcess {
            pid,
            role,
            comm: comm.trim().to_string(),
            exe,
            mem,
        });
    }
    for role in ["shim", "sandbox", "container"] {
        if !out.iter().any(|p| p.role == role) {
            return Err(CriError::harness(
                "measure",
                format!("no {role} process under shim {shim}: {out:?}"),
            ));
        }
    }
    Ok((out, peers))
}

/// pid → parent pid of every process.
fn parent_pids() -> HashMap<u32, u32> {
    let mut m = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return m;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            m.insert(pid, ppid);
        }
    }
    m
}

/// `/proc/PID/smaps_rollup`; `None` when unreadable or empty (a kernel thread, or gone).
fn smaps_rollup(pid: u32) -> Option<Smaps> {
    parse_smaps_rollup(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

fn parse_smaps_rollup(text: &str) -> Option<Smaps> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Smaps {
        pss: field("Pss")?,
        pss_anon: field("Pss_Anon")?,
        pss_file: field("Pss_File")?,
        uss: field("Private_Clean")? + field("Private_Dirty")?,
        rss: field("Rss")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_partial_and_empty_lines() {
        let text = "2026-12-01T14:00:07.747224443Z stdout F hello world\n\
                    2026-12-01T14:00:07.747224443Z stderr F oops\n\
                    2026-12-01T14:00:07.8Z stdout F \n\
                    2026-12-01T14:00:08.000000001+01:00 stdout P no newline\n";
        let lines = parse_log(text).unwrap();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].stream, Stream::Stdout);
        assert!(!lines[0].partial);
        assert_eq!(lines[0].content, "hello world");
        assert_eq!(lines[1].stream, Stream::Stderr);
        assert_eq!(lines[2].content, "");
        assert!(lines[3].partial);
        assert_eq!(
            stream_text(&lines, Stream::Stdout),
            "hello world\n\nno newline"
        );
        assert_eq!(stream_text(&lines, Stream::Stderr), "oops\n");
    }

    #[test]
    fn content_keeps_its_spaces() {
        let lines = parse_log("2026-01-01T00:00:00Z stdout F  two  spaces \n").unwrap();
        assert_eq!(lines[0].content, " two  spaces ");
    }

    #[test]
    fn partial_pieces_join_into_one_line() {
        let text = "2026-01-01T00:00:00.1Z stdout P abc\n\
                    2026-01-01T00:00:00.2Z stdout F def\n";
        let lines = parse_log(text).unwrap();
        assert_eq!(stream_text(&lines, Stream::Stdout), "abcdef\n");
    }

    #[test]
    fn extra_tags_after_the_first_are_accepted() {
        let lines = parse_log("2026-01-01T00:00:00Z stdout F:x y\n").unwrap();
        assert!(!lines[0].partial);
        assert_eq!(lines[0].content, "y");
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "2026-01-01T00:00:00Z stdout F",
            "2026-01-01T00:00:00Z stdin F x",
            "2026-01-01T00:00:00Z stdout X x",
            "yesterday stdout F x",
            "2026-01-01 00:00:00Z stdout F x",
            "2026-01-01T00:00:00.1234567890Z stdout F x",
            "2026-01-01T00:00:00 stdout F x",
            "2026-01-01T00:00:00.Z stdout F x",
        ] {
            let err = parse_log(&format!("{bad}\n")).unwrap_err();
            assert!(err.contains("log line 1"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn reads_the_fields_of_smaps_rollup() {
        let text = "56174382c000-7ffd90913000 ---p 00000000 00:00 0   [rollup]\n\
                    Rss:                1760 kB\n\
                    Pss:                 257 kB\n\
                    Pss_Dirty:           112 kB\n\
                    Pss_Anon:            110 kB\n\
                    Pss_File:            145 kB\n\
                    Pss_Shmem:             2 kB\n\
                    Shared_Clean:       1608 kB\n\
                    Private_Clean:        40 kB\n\
                    Private_Dirty:       112 kB\n";
        let m = parse_smaps_rollup(text).unwrap();
        assert_eq!(
            (m.pss, m.pss_anon, m.pss_file, m.uss, m.rss),
            (257, 110, 145, 152, 1760)
        );
        // A kernel thread's rollup is empty.
        assert!(parse_smaps_rollup("").is_none());
    }
}
