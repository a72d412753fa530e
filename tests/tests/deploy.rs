//! deploy/: the node installer, the containerd snippets, the k3s templates and the manifests.
//!
//! A config is only right if the containerd it is for reads the kiln runtime out of it, so
//! every config made here goes through the real containerd of its version, `config dump`:
//! 1.6 (Debian 12's, on PATH), 1.7 and 2.x (unpacked by scripts/fetch-containerd.sh). The
//! dump must show the runtime under that version's CRI plugin, and runc still there. Nothing
//! touches the machine's own containerd, /etc or /usr/local/bin: the installer runs against a
//! temporary root, its restart command is a script that records its calls, and its API server
//! a listener on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kiln_e2e::{RUNTIME, wait_until};
use serde_json::{Value, json};

/// The RuntimeClass handler: the runtime's name in containerd's CRI config.
const HANDLER: &str = "kiln";
/// The label the installer sets and the RuntimeClass schedules by.
const NODE_LABEL: (&str, &str) = ("kiln.dev/runtime", "true");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- the containerd versions ------------------------------------------------------------------

struct Containerd {
    /// "1.6", "1.7", "2.1".
    version: &'static str,
    bin: PathBuf,
    /// The plugin whose config holds `containerd.runtimes` in a dump.
    cri_plugin: &'static str,
    /// The config version this containerd writes.
    config_version: u32,
}

/// A Debian suite's containerd, unpacked once per test binary (fetch-containerd.sh is
/// idempotent, but two tests must not unpack into one directory at once).
fn fetched(suite: &str) -> PathBuf {
    static DIRS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = dirs.get(suite) {
        return d.clone();
    }
    let dest = repo().join("target/containerd").join(suite);
    let out = Command::new(repo().join("scripts/fetch-containerd.sh"))
        .arg(suite)
        .arg(&dest)
        .output()
        .expect("run fetch-containerd.sh");
    assert!(
        out.status.success(),
        "fetch-containerd.sh {suite}:\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().expect("a bin dir").trim());
    dirs.insert(suite.to_string(), dir.clone());
    dir
}

fn checked(c: Containerd) -> Containerd {
    let out = Command::new(&c.bin)
        .arg("--version")
        .output()
        .expect("containerd --version");
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.split_whitespace().any(|w| w
            .trim_start_matches('v')
            .starts_with(&format!("{}.", c.version))),
        "{} is not containerd {}: {v}",
        c.bin.display(),
        c.version
    );
    c
}

fn containerd_1_6() -> Containerd {
    checked(Containerd {
        version: "1.6",
        bin: PathBuf::from("containerd"),
        cri_plugin: "io.containerd.grpc.v1.cri",
        config_version: 2,
    })
}

fn containerd_1_7() -> Containerd {
    checked(Containerd {
        version: "1.7",
        bin: fetched("trixie").join("containerd"),
        cri_plugin: "io.containerd.grpc.v1.cri",
        config_version: 2,
    })
}

fn containerd_2() -> Containerd {
    checked(Containerd {
        version: "2.1",
        bin: fetched("sid").join("containerd"),
        cri_plugin: "io.containerd.cri.v1.runtime",
        config_version: 3,
    })
}

// --- python: TOML and YAML as JSON --------------------------------------------------------------

/// A python3 with tomllib (3.11+) and PyYAML (Debian 12: python3-yaml, which
/// scripts/setup.sh installs).
fn python() -> &'static str {
    static PY: OnceLock<&'static str> = OnceLock::new();
    PY.get_or_init(|| {
        for p in ["python3", "/usr/bin/python3"] {
            let ok = Command::new(p)
                .args(["-c", "import tomllib, yaml"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return p;
            }
        }
        panic!("no python3 with tomllib and PyYAML (apt-get install python3-yaml)")
    })
}

fn python_json(script: &str, input: &[u8], what: &str) -> Value {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to python3");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "parsing {what}:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("python3's JSON")
}

fn toml(input: &[u8], what: &str) -> Value {
    python_json(
        "import sys, json, tomllib; json.dump(tomllib.load(sys.stdin.buffer), sys.stdout)",
        input,
        what,
    )
}

/// Every document of a YAML file (safe_load_all: plain data, no tags).
fn yaml(path: &Path) -> Vec<Value> {
    let input = std::fs::read(path).expect("read yaml");
    let v = python_json(
        "import sys, json, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        &input,
        &path.display().to_string(),
    );
    v.as_array().expect("documents").clone()
}

// --- what containerd makes of a config ------------------------------------------------------------

/// `containerd --config FILE config dump`, parsed. containerd names the keys it ignores in a
/// warning: none may be about kiln.
fn dump(c: &Containerd, config: &Path) -> Value {
    let out = Command::new(&c.bin)
        .arg("--config")
        .arg(config)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump");
    let what = format!("containerd {} with {}", c.version, config.display());
    assert!(
        out.status.success(),
        "{what} rejects it:\n{}\n--- the config:\n{}",
        text(&out),
        std::fs::read_to_string(config).unwrap_or_default()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("kiln"),
        "{what} warns about kiln:\n{stderr}"
    );
    toml(&out.stdout, &what)
}

fn runtimes<'a>(c: &Containerd, dump: &'a Value) -> &'a serde_json::Map<String, Value> {
    dump.pointer(&format!("/plugins/{}/containerd/runtimes", c.cri_plugin))
        .and_then(Value::as_object)
        .unwrap_or_else(|| {
            panic!(
                "containerd {}: no {} runtimes in the dump: {dump:#}",
                c.version, c.cri_plugin
            )
        })
}

/// The dump has kiln, with Kiln's runtime type, and runc, the default runtime, still.
fn assert_registered(c: &Containerd, dump: &Value, what: &str) {
    let rt = runtimes(c, dump);
    assert_eq!(
        rt.get(HANDLER).and_then(|r| r.get("runtime_type")),
        Some(&json!(RUNTIME)),
        "containerd {} reads no {HANDLER} runtime from {what}: {rt:#?}",
        c.version
    );
    assert_eq!(
        rt.get("runc").and_then(|r| r.get("runtime_type")),
        Some(&json!("io.containerd.runc.v2")),
        "containerd {} lost runc (the default runtime) with {what}: {rt:#?}",
        c.version
    );
    let default = dump
        .pointer(&format!(
            "/plugins/{}/containerd/default_runtime_name",
            c.cri_plugin
        ))
        .and_then(Value::as_str)
        .unwrap_or("runc");
    assert_eq!(default, "runc", "{what} changed the default runtime");
}

// --- the installer ----------------------------------------------------------------------------

/// A node's root in a temporary directory, and what the installer is run with.
struct Node {
    tmp: tempfile::TempDir,
    containerd_cmd: String,
}

impl Node {
    fn new(c: &Containerd) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = Node {
            tmp,
            containerd_cmd: c.bin.display().to_string(),
        };
        std::fs::create_dir_all(node.root().join("usr/local/bin")).expect("mkdir");
        std::fs::create_dir_all(node.root().join("etc/containerd")).expect("mkdir");
        std::fs::create_dir_all(node.image()).expect("mkdir");
        node.write_shim(b"#!/bin/sh\necho kiln shim 1\n");
        node.write_script("restart-ok", 0);
        node.write_script("restart-fails", 1);
        node
    }

    /// The host's filesystem, as the DaemonSet mounts it under /host.
    fn root(&self) -> PathBuf {
        self.tmp.path().join("host")
    }
    /// The installer image's files (and the test's own).
    fn image(&self) -> PathBuf {
        self.tmp.path().join("image")
    }
    fn config(&self) -> PathBuf {
        self.root().join("etc/containerd/config.toml")
    }
    fn host_shim(&self) -> PathBuf {
        self.root().join("usr/local/bin/containerd-shim-kiln-v1")
    }
    fn shim(&self) -> PathBuf {
        self.image().join("containerd-shim-kiln-v1")
    }
    fn restarts_log(&self) -> PathBuf {
        self.image().join("restarts")
    }
    fn ready_file(&self) -> PathBuf {
        self.image().join("ready")
    }

    /// Any executable stands in for the shim: the installer only copies it.
    fn write_shim(&self, content: &[u8]) {
        std::fs::write(self.shim(), content).expect("write shim");
        chmod_x(&self.shim());
    }

    /// A restart command that records each call and exits with `status`.
    fn write_script(&self, name: &str, status: i32) {
        let p = self.image().join(name);
        let log = self.restarts_log();
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >>'{}'\nexit {status}\n",
                log.display()
            ),
        )
        .expect("write stub");
        chmod_x(&p);
    }

    fn restarts(&self) -> Vec<String> {
        std::fs::read_to_string(self.restarts_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn command(&self, restart: &str) -> Command {
        let mut cmd = Command::new(repo().join("deploy/installer/install-node.sh"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KILN_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KILN_SHIM", self.shim())
            .env("KILN_HOST_BIN_DIR", self.root().join("usr/local/bin"))
            .env("KILN_HOST_CONFIG", self.config())
            .env("KILN_CONTAINERD_CMD", &self.containerd_cmd)
            .env("KILN_RESTART_CMD", self.image().join(restart))
            .env("KILN_READY_FILE", self.ready_file())
            .env("KILN_NODE_LABEL", "")
            .env("KILN_ONCE", "1")
            .env_remove("KUBERNETES_SERVICE_HOST");
        cmd
    }

    fn install_with(&self, restart: &str) -> Output {
        self.command(restart).output().expect("run install-node.sh")
    }

    fn install(&self) -> String {
        let out = self.install_with("restart-ok");
        assert!(
            out.status.success(),
            "install-node.sh failed:\n{}",
            text(&out)
        );
        assert!(self.ready_file().exists(), "not ready:\n{}", text(&out));
        text(&out)
    }

    /// Every file under the node's root: path, mode, content.
    fn snapshot(&self) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut files = Vec::new();
        walk(&self.root(), &mut files);
        files.sort();
        files
    }
}

fn chmod_x(p: &Path) {
    let mut perms = std::fs::metadata(p).expect("meta").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(p, perms).expect("chmod");
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("readdir").flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).expect("meta");
        if meta.is_dir() {
            walk(&p, out);
        } else {
            let content = std::fs::read(&p).expect("read");
            out.push((p, meta.permissions().mode(), content));
        }
    }
}

/// The configs a node may have before Kiln: what this containerd writes with `config
/// default` (kubeadm's guides, most distributions), a short one that lists no runtime at all
/// (Debian's packaged config is one), and none.
fn starting_configs(c: &Containerd) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let default = Command::new(&c.bin)
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(default.status.success(), "{}", text(&default));
    let short = format!(
        "version = {}\n\n[plugins.\"{}\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"/etc/cni/net.d\"\n",
        c.config_version,
        if c.config_version == 3 {
            "io.containerd.cri.v1.runtime"
        } else {
            "io.containerd.grpc.v1.cri"
        }
    );
    vec![
        ("`config default`", Some(default.stdout)),
        ("a config without runtimes", Some(short.into_bytes())),
        ("no config", None),
    ]
}

/// The installer on every starting config: kiln registered for this containerd, one restart;
/// a second run changes no file and restarts nothing.
fn installs_once_on(c: Containerd) {
    for (what, config) in starting_configs(&c) {
        let node = Node::new(&c);
        if let Some(config) = &config {
            std::fs::write(node.config(), config).expect("write config");
        }
        let first = node.install();
        let ctx = format!("containerd {}, {what}", c.version);
        assert_eq!(node.restarts().len(), 1, "{ctx}: one restart:\n{first}");
        assert_eq!(
            std::fs::read(node.host_shim()).expect("installed shim"),
            std::fs::read(node.shim()).expect("shim"),
            "{ctx}"
        );
        let after = std::fs::read(node.config()).expect("config");
        if let Some(config) = &config {
            assert!(
                after.starts_with(config),
                "{ctx}: the node's config was rewritten"
            );
        } else {
            let version = format!("version = {}\n", c.config_version);
            assert!(
                after.starts_with(version.as_bytes()),
                "{ctx}: a new config for this containerd's version:\n{}",
                String::from_utf8_lossy(&after)
            );
        }
        assert_registered(&c, &dump(&c, &node.config()), &ctx);

        let before = node.snapshot();
        let second = node.install();
        assert_eq!(
            before,
            node.snapshot(),
            "{ctx}: the second run changed files"
        );
        assert_eq!(
            node.restarts().len(),
            1,
            "{ctx}: the second run restarted containerd:\n{second}"
        );
        assert!(second.contains("not restarted"), "{ctx}: {second}");
        assert!(second.contains("already installed"), "{ctx}: {second}");
    }
}

#[test]
fn the_installer_registers_kiln_once_with_containerd_1_6() {
    installs_once_on(containerd_1_6());
}

#[test]
fn the_installer_registers_kiln_once_with_containerd_1_7() {
    installs_once_on(containerd_1_7());
}

#[test]
fn the_installer_registers_kiln_once_with_containerd_2() {
    installs_once_on(containerd_2());
}

#[test]
fn a_failed_restart_is_retried_by_the_next_run_and_only_then() {
    let c = containerd_1_6();
    let node = Node::new(&c);
    let first = node.install_with("restart-fails");
    assert!(
        !first.status.success(),
        "a failed restart must fail the pod"
    );
    assert!(
        !node.ready_file().exists(),
        "not ready after a failed restart"
    );
    assert_eq!(node.restarts(), ["restart-fails "]);

    // The config is in place now, so nothing changes; the restart is still owed.
    let second = node.install();
    assert_eq!(
        node.restarts(),
        ["restart-fails ", "restart-ok "],
        "{second}"
    );
    assert_registered(&c, &dump(&c, &node.config()), "the installed config");

    let third = node.install();
    assert_eq!(node.restarts().len(), 2, "paid once:\n{third}");
}

#[test]
fn a_new_shim_is_copied_without_restarting_containerd() {
    let c = containerd_1_6();
    let node = Node::new(&c);
    node.install();
    let config = std::fs::read(node.config()).expect("config");
    node.write_shim(b"#!/bin/sh\necho kiln shim 2\n");
    let out = node.install();
    assert_eq!(
        std::fs::read(node.host_shim()).expect("installed shim"),
        b"#!/bin/sh\necho kiln shim 2\n",
        "{out}"
    );
    assert_eq!(
        std::fs::metadata(node.host_shim())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(std::fs::read(node.config()).expect("config"), config);
    assert_eq!(node.restarts().len(), 1, "{out}");
}

/// One HTTP request as the test's API server saw it.
#[derive(Debug)]
struct Request {
    head: String,
    body: Vec<u8>,
}

/// An API server on 127.0.0.1 that answers every request 200 and keeps it, until stopped.
struct ApiServer {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).expect("blocking");
                        conn.set_read_timeout(Some(Duration::from_secs(30)))
                            .expect("timeout");
                        if let Some(req) = read_request(&mut conn) {
                            let _ = conn.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                            );
                            r.lock().unwrap_or_else(|e| e.into_inner()).push(req);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        ApiServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Request> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
        std::mem::take(&mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request { head, body })
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

#[test]
fn the_installer_labels_its_node_after_the_restart() {
    let c = containerd_1_6();
    let node = Node::new(&c);
    let sa = node.image().join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), "test-token\n").expect("token");
    // The label as the DaemonSet gives it.
    let label = daemonset_env("KILN_NODE_LABEL");
    assert_eq!(label, format!("{}={}", NODE_LABEL.0, NODE_LABEL.1));

    let server = ApiServer::start();
    let out = node
        .command("restart-ok")
        .env("KILN_NODE_LABEL", &label)
        .env("NODE_NAME", "node-a")
        .env("KILN_KUBE_API", &server.url)
        .env("KILN_SA_DIR", &sa)
        .output()
        .expect("run install-node.sh");
    let requests = server.stop();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(requests.len(), 1, "{requests:?}\n{}", text(&out));
    let req = &requests[0];
    let request_line = req.head.lines().next().unwrap_or_default();
    assert!(
        request_line.starts_with("PATCH /api/v1/nodes/node-a HTTP/1."),
        "{request_line}"
    );
    assert_eq!(header(req, "authorization"), Some("Bearer test-token"));
    assert_eq!(
        header(req, "content-type"),
        Some("application/merge-patch+json")
    );
    let body: Value = serde_json::from_slice(&req.body).expect("JSON body");
    assert_eq!(
        body,
        json!({"metadata": {"labels": {NODE_LABEL.0: NODE_LABEL.1}}})
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let restarted = stdout.find("containerd restarted").expect("restarted");
    let labelled = stdout.find("labelled node node-a").expect("labelled");
    assert!(restarted < labelled, "label after the restart:\n{stdout}");

    // A label that is not one is refused before anything is sent.
    let server = ApiServer::start();
    let out = node
        .command("restart-ok")
        .env("KILN_NODE_LABEL", "kiln.dev/runtime=\"},\"x\":{\"y")
        .env("NODE_NAME", "node-a")
        .env("KILN_KUBE_API", &server.url)
        .env("KILN_SA_DIR", &sa)
        .output()
        .expect("run install-node.sh");
    let requests = server.stop();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("invalid label value"), "{}", text(&out));
    assert!(requests.is_empty(), "{requests:?}");
}

#[test]
fn the_installer_stays_up_until_sigterm_and_leaves_no_process() {
    let c = containerd_1_6();
    let node = Node::new(&c);
    let mut child = node
        .command("restart-ok")
        .env("KILN_ONCE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn install-node.sh");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("sleeping until the pod stops") {
                    break;
                }
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("install-node.sh ended before sleeping:\n{seen}");
            }
        }
    }
    assert!(node.ready_file().exists());
    // Its sleep, to check that it goes too.
    let children = wait_until(Duration::from_secs(10), || {
        let c = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        let pids: Vec<i32> = c
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        (!pids.is_empty()).then_some(pids)
    })
    .expect("the installer's sleep");
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGTERM ends it with 0: {status:?}");
    for c in children {
        let gone = wait_until(Duration::from_secs(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).ok();
            // Gone, or a zombie waiting for whoever reaps orphans here.
            match stat {
                None => Some(()),
                Some(s) => s
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .then_some(()),
            }
        });
        if gone.is_none() {
            unsafe { libc::kill(c, libc::SIGKILL) };
            panic!("process {c} outlived the installer");
        }
    }
}

// --- deploy/containerd ------------------------------------------------------------------------

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The snippet with its optional lines (`#[table]`, `#  key = ...`) uncommented.
fn with_optional_lines(snippet: &str) -> String {
    snippet
        .lines()
        .map(|l| {
            if l.starts_with("#[") || l.starts_with("#  ") {
                &l[1..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn write_config(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write config");
    p
}

/// A snippet of deploy/containerd appended to what this containerd writes by default, and to
/// a bare `version = N` line with its optional lines on.
fn snippet_on(c: &Containerd, rel: &str) {
    let snippet = read(rel);
    assert!(
        !snippet
            .lines()
            .any(|l| l.trim_start().starts_with("version")),
        "{rel} is appended to a config that has its version line"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let default = Command::new(&c.bin)
        .args(["config", "default"])
        .output()
        .expect("config default");
    let merged = format!("{}\n{snippet}", String::from_utf8_lossy(&default.stdout));
    let p = write_config(tmp.path(), "default.toml", &merged);
    assert_registered(c, &dump(c, &p), &format!("{rel} on `config default`"));

    let bare = format!(
        "version = {}\n{}",
        c.config_version,
        with_optional_lines(&snippet)
    );
    let p = write_config(tmp.path(), "bare.toml", &bare);
    let d = dump(c, &p);
    assert_registered(c, &d, &format!("{rel} with its optional lines"));
    assert_eq!(
        runtimes(c, &d)[HANDLER].get("runtime_path"),
        Some(&json!("/opt/kiln/bin/containerd-shim-kiln-v1")),
        "{rel}: runtime_path"
    );
}

#[test]
fn the_containerd_snippets_register_kiln_with_their_versions() {
    for c in [containerd_1_6(), containerd_1_7()] {
        snippet_on(&c, "deploy/containerd/config-v2.toml");
    }
    snippet_on(&containerd_2(), "deploy/containerd/config-v3.toml");
}

/// What config-v2.toml's note (and install.sh's runc entry) is for: containerd 1.x, given a
/// config that lists kiln and not runc, has no runc; 2.x keeps it.
#[test]
fn containerd_1_drops_runc_from_a_config_that_lists_only_kiln() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for c in [containerd_1_6(), containerd_1_7(), containerd_2()] {
        let only_kiln = format!(
            "version = {}\n[plugins.\"{}\".containerd.runtimes.kiln]\n  runtime_type = \"{RUNTIME}\"\n",
            c.config_version, c.cri_plugin
        );
        let p = write_config(tmp.path(), &format!("{}.toml", c.version), &only_kiln);
        let d = dump(&c, &p);
        let rt = runtimes(&c, &d);
        assert!(rt.contains_key(HANDLER));
        assert_eq!(
            rt.contains_key("runc"),
            c.config_version == 3,
            "containerd {}: {rt:#?}",
            c.version
        );
    }
}

#[test]
fn kiln_conf_sets_what_kiln_reads_from_containerds_environment() {
    // The KILN_ variables the crates read (string literals in their sources).
    let mut read_by_kiln = BTreeSet::new();
    let mut stack = vec![repo().join("crates")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("readdir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let src = std::fs::read_to_string(&p).expect("read");
                for part in src.split("\"KILN_").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                        .collect();
                    if part[name.len()..].starts_with('"') {
                        read_by_kiln.insert(format!("KILN_{name}"));
                    }
                }
            }
        }
    }
    assert!(
        read_by_kiln.contains("KILN_SHIM_GROUPING"),
        "{read_by_kiln:?}"
    );
    // Read from elsewhere than containerd's environment: a container's own environment
    // (the HTTP server's address) and a unit test's.
    for not_containerds in ["KILN_HTTP_ADDR", "KILN_CLONE_TEST_DIR"] {
        assert!(
            read_by_kiln.remove(not_containerds),
            "{not_containerds} is gone"
        );
    }

    let conf = read("deploy/containerd/kiln.conf");
    let mut section = None;
    let mut in_conf = BTreeSet::new();
    for line in conf.lines() {
        let setting = line.strip_prefix('#').unwrap_or(line);
        if let Some(kv) = setting.strip_prefix("Environment=") {
            assert_eq!(section, Some("[Service]"), "{line}: outside [Service]");
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{line}"));
            assert!(
                !v.is_empty() && !v.contains(char::is_whitespace),
                "{line}: unquoted values have no spaces"
            );
            if k.starts_with("KILN_") {
                in_conf.insert(k.to_string());
            }
        } else if line.starts_with('[') {
            section = Some(line);
        } else {
            assert!(
                line.is_empty() || line.starts_with("# "),
                "{line}: neither a comment nor a setting"
            );
        }
    }
    assert_eq!(section, Some("[Service]"));
    assert_eq!(
        in_conf, read_by_kiln,
        "deploy/containerd/kiln.conf vs the crates"
    );
}

// --- deploy/k3s -------------------------------------------------------------------------------

/// A k3s template with k3s's part ("base") replaced by a small config of the same version
/// that, like k3s's, lists runc.
fn render_k3s(rel: &str) -> String {
    let template = read(rel);
    let action = "{{ template \"base\" . }}";
    assert!(template.starts_with(action), "{rel} starts from k3s's base");
    assert_eq!(
        template.matches("{{").count(),
        1,
        "{rel}: the only template action is the base"
    );
    let base = format!(
        "version = {}\n[plugins.\"{}\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
        if rel.ends_with("config-v3.toml.tmpl") {
            3
        } else {
            2
        },
        if rel.ends_with("config-v3.toml.tmpl") {
            "io.containerd.cri.v1.runtime"
        } else {
            "io.containerd.grpc.v1.cri"
        }
    );
    template.replacen(action, &base, 1)
}

#[test]
fn the_k3s_templates_render_to_configs_containerd_reads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // k3s with containerd 1.7 reads config.toml.tmpl; k3s with 2.x config-v3.toml.tmpl first,
    // config.toml.tmpl (a version 2 config, which containerd 2.x converts) otherwise.
    for (rel, c) in [
        ("deploy/k3s/config.toml.tmpl", containerd_1_6()),
        ("deploy/k3s/config.toml.tmpl", containerd_1_7()),
        ("deploy/k3s/config.toml.tmpl", containerd_2()),
        ("deploy/k3s/config-v3.toml.tmpl", containerd_2()),
    ] {
        let rendered = render_k3s(rel);
        let p = write_config(tmp.path(), "rendered.toml", &rendered);
        assert_registered(&c, &dump(&c, &p), rel);
    }
}

// --- the manifests ----------------------------------------------------------------------------

fn field<'a>(v: &'a Value, pointer: &str, what: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("{what}: no {pointer} in {v:#}"))
}

fn check_runtime_class(rel: &str) {
    let docs = yaml(&repo().join(rel));
    assert_eq!(docs.len(), 1, "{rel}: one document");
    let rc = &docs[0];
    assert_eq!(field(rc, "/apiVersion", rel), "node.k8s.io/v1");
    assert_eq!(field(rc, "/kind", rel), "RuntimeClass");
    assert_eq!(field(rc, "/metadata/name", rel), HANDLER);
    assert_eq!(field(rc, "/handler", rel), HANDLER);
    // A string, not YAML's boolean: node selectors are map[string]string.
    assert_eq!(
        field(rc, "/scheduling/nodeSelector", rel),
        &json!({NODE_LABEL.0: NODE_LABEL.1}),
        "{rel}"
    );
    let known = [
        "apiVersion",
        "kind",
        "metadata",
        "handler",
        "scheduling",
        "overhead",
    ];
    for k in rc.as_object().expect("a mapping").keys() {
        assert!(known.contains(&k.as_str()), "{rel}: unknown field {k}");
    }
}

#[test]
fn the_runtime_classes_name_the_kiln_handler() {
    check_runtime_class("deploy/runtimeclass.yaml");
    check_runtime_class("deploy/k3s/runtimeclass.yaml");
}

fn daemonset_docs() -> Vec<Value> {
    yaml(&repo().join("deploy/installer/daemonset.yaml"))
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let d = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in daemonset.yaml"));
    assert!(found.next().is_none(), "one {kind}");
    d
}

fn installer_container(docs: &[Value]) -> &Value {
    let ds = doc(docs, "DaemonSet");
    let containers = field(ds, "/spec/template/spec/containers", "DaemonSet")
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn daemonset_env(name: &str) -> String {
    let docs = daemonset_docs();
    let env = field(installer_container(&docs), "/env", "installer")
        .as_array()
        .expect("env");
    env.iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no {name} in the DaemonSet's env"))
        .to_string()
}

#[test]
fn the_daemonset_gives_the_installer_what_it_needs() {
    let docs = daemonset_docs();
    let ns = field(doc(&docs, "Namespace"), "/metadata/name", "Namespace");
    let sa = doc(&docs, "ServiceAccount");
    assert_eq!(field(sa, "/metadata/namespace", "ServiceAccount"), ns);
    let role = doc(&docs, "ClusterRole");
    assert_eq!(
        field(role, "/rules", "ClusterRole"),
        &json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}])
    );
    let binding = doc(&docs, "ClusterRoleBinding");
    assert_eq!(
        field(binding, "/roleRef/name", "binding"),
        field(role, "/metadata/name", "role")
    );
    assert_eq!(
        field(binding, "/subjects", "binding"),
        &json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}])
    );

    let ds = doc(&docs, "DaemonSet");
    assert_eq!(field(ds, "/apiVersion", "DaemonSet"), "apps/v1");
    assert_eq!(field(ds, "/metadata/namespace", "DaemonSet"), ns);
    let pod = field(ds, "/spec/template/spec", "DaemonSet");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        pod["hostPID"], true,
        "nsenter into PID 1 needs the host's PIDs"
    );
    let selector = field(ds, "/spec/selector/matchLabels", "DaemonSet")
        .as_object()
        .expect("matchLabels");
    let labels = field(ds, "/spec/template/metadata/labels", "DaemonSet");
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "the selector matches the pods");
    }

    let c = installer_container(&docs);
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("spec.nodeName"))
    );
    // The readiness probe looks where the script writes (its default).
    let script = read("deploy/installer/install-node.sh");
    let ready = field(c, "/readinessProbe/exec/command", "probe");
    let ready_path = ready[2].as_str().expect("path");
    assert_eq!(ready, &json!(["test", "-e", ready_path]));
    assert!(
        script.contains(&format!("ready_file=${{KILN_READY_FILE:-{ready_path}}}")),
        "the probe's {ready_path} is install-node.sh's default"
    );

    // The host paths the script is told about are the host directories mounted there.
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name"),
                m["mountPath"].as_str().expect("path"),
            )
        })
        .collect();
    let volumes: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name"),
                v["hostPath"]["path"].as_str().expect("hostPath"),
            )
        })
        .collect();
    let host_path_of = |in_pod: &str| -> String {
        let (name, mount) = mounts
            .iter()
            .find(|(_, m)| in_pod == **m || in_pod.starts_with(&format!("{m}/")))
            .unwrap_or_else(|| panic!("{in_pod} is on no mount"));
        format!("{}{}", volumes[name], &in_pod[mount.len()..])
    };
    assert_eq!(
        host_path_of(&daemonset_env("KILN_HOST_BIN_DIR")),
        "/usr/local/bin"
    );
    assert_eq!(
        host_path_of(&daemonset_env("KILN_HOST_CONFIG")),
        "/etc/containerd/config.toml"
    );
    assert!(daemonset_env("KILN_RESTART_CMD").starts_with("nsenter --target 1 --mount -- "));
}
