//! A private image registry per test binary: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 with a free port, its own storage directory and config file, and `skopeo` to push
//! image-layout tarballs into it, so that `ctr images pull` is tested against a real registry
//! rather than an import.
//!
//! [`registry()`] starts it on first use; it is stopped and its directory removed when the test
//! binary exits (through `atexit`, as the harness does for containerd). skopeo pushes with
//! `--preserve-digests`: without it, it gzips uncompressed tar layers on the way, and the
//! manifest in the registry would no longer be the one kiln-image wrote.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::process::{self, Output, wait_until};

/// The running registry.
#[derive(Debug)]
pub struct Registry {
    /// Its directory: config, storage, log, skopeo's policy and temporary files.
    pub dir: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

static REGISTRY: OnceLock<Result<Registry, String>> = OnceLock::new();
/// (the registry process, its directory) for the atexit handler.
static TEARDOWN: OnceLock<Mutex<Option<(Child, PathBuf)>>> = OnceLock::new();

/// The shared private registry, started on first use. Panics (failing the calling test) when
/// `docker-registry` or `skopeo` is missing or the registry does not come up.
pub fn registry() -> &'static Registry {
    match REGISTRY.get_or_init(start) {
        Ok(r) => r,
        Err(e) => panic!("the private registry could not be started:\n{e}"),
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local address: {e}"))
}

fn start() -> Result<Registry, String> {
    for tool in ["docker-registry", "skopeo"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "`{tool}` is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("kiln-registry-")
        .tempdir_in("/tmp")
        .map_err(|e| format!("create a temporary directory in /tmp: {e}"))?
        .keep();
    let _ = TEARDOWN.set(Mutex::new(None));
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(teardown) };
    for d in ["storage", "tmp"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| format!("create {d}: {e}"))?;
    }
    // skopeo refuses to copy without a signature policy; this one accepts anything, and only
    // skopeo runs of this harness read it.
    std::fs::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .map_err(|e| format!("write policy.json: {e}"))?;

    // The port is free when asked, but another process may take it before the registry binds
    // it: try a few.
    let mut last = String::new();
    for _ in 0..3 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dir.join("storage").display()
            ),
        )
        .map_err(|e| format!("write config.yml: {e}"))?;
        let log = std::fs::File::create(dir.join("registry.log"))
            .map_err(|e| format!("create registry.log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("registry.log: {e}"))?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawn docker-registry: {e}"))?;
        let up = wait_until(Duration::from_secs(15), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            get(&addr, "/v2/", "*/*")
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| true)
        });
        if up == Some(true) {
            if let Some(slot) = TEARDOWN.get()
                && let Ok(mut slot) = slot.lock()
            {
                *slot = Some((child, dir.clone()));
            }
            return Ok(Registry { dir, addr });
        }
        let _ = child.kill();
        let _ = child.wait();
        last = format!(
            "docker-registry did not answer on {addr}; its log:\n{}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Err(last)
}

extern "C" fn teardown() {
    let Some(slot) = TEARDOWN.get() else {
        return;
    };
    let Ok(mut slot) = slot.lock() else {
        return;
    };
    let Some((mut child, dir)) = slot.take() else {
        return;
    };
    // SIGTERM first (distribution shuts down its listener), SIGKILL if it lingers.
    // SAFETY: signalling our own child, whose pid has not been reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let gone = wait_until(Duration::from_secs(5), || {
        child.try_wait().ok().flatten().map(|_| ())
    });
    if gone.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if std::env::var_os("KILN_E2E_KEEP").is_some() {
        eprintln!("kiln-e2e: KILN_E2E_KEEP set; keeping {}", dir.display());
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// An HTTP response of the registry.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with `Accept: accept`, HTTP/1.1 with `Connection: close` (the registry's API is
/// all this harness needs to read: manifests and blobs).
pub fn get(addr: &str, path: &str, accept: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

impl Registry {
    /// `127.0.0.1:PORT/<repo_tag>`, the reference `ctr images pull` takes.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Pushes the image-layout tarball `archive` as `repo_tag` (e.g. `kiln-test/hello:v1`)
    /// with skopeo, keeping its manifest and blobs byte for byte.
    pub fn push(&self, archive: &Path, repo_tag: &str) -> Output {
        let mut cmd = Command::new("skopeo");
        cmd.arg("--policy")
            .arg(self.dir.join("policy.json"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        process::run(cmd, Duration::from_secs(60))
    }

    /// The manifest of `repo:tag` as the registry serves it to an OCI client: its
    /// `Docker-Content-Digest` and bytes.
    pub fn manifest(&self, repo: &str, tag: &str) -> Result<(String, Vec<u8>), String> {
        let r = get(
            &self.addr,
            &format!("/v2/{repo}/manifests/{tag}"),
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )?;
        if r.status != 200 {
            return Err(format!(
                "GET manifest {repo}:{tag}: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        let digest = r
            .header("docker-content-digest")
            .ok_or("no Docker-Content-Digest header")?
            .to_string();
        Ok((digest, r.body))
    }

    /// The registry's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_chunked_bodies() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n").unwrap(),
            b"Wikipedia"
        );
        assert!(dechunk(b"4\r\nWi").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
    }
}
