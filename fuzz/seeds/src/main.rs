//! Writes the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) and libFuzzer dictionaries
//! (`fuzz/dict/<target>.dict`), so that the committed seeds are reproducible rather than
//! hand-typed blobs: `cargo run --manifest-path fuzz/Cargo.toml -p kiln-fuzz-seeds`.
//!
//! The image seeds are tarballs written by `kiln_image::build`, the function behind
//! `kiln image build`, in every `--format`, for a core module and for a component; the
//! manifest seeds are the documents inside them. The plan seeds are config.json files of the
//! shapes `ctr` and the CRI write, over the names of the fuzz tree.

#[path = "../../src/fixture.rs"]
#[allow(dead_code)]
mod fixture;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use fixture::{GUEST_PATHS, NAMES, OUTSIDE_PREFIX, SOURCES};
use kiln_image::{BuildOptions, Entry, Format, ModuleSource};
use serde_json::{Value, json};

/// A core module exporting an empty `_start`.
const MODULE: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // preamble
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type section: () -> ()
    0x03, 0x02, 0x01, 0x00, // function section
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export _start
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code section: empty body
];

/// The empty component.
const COMPONENT: &[u8] = fixture::COMPONENT;

/// Separates the documents of a `manifest` input.
const SEPARATOR: &[u8] = b"\0--\0";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = fuzz.join("corpus");
    let images = images()?;
    let mut manifests = Vec::new();
    for (name, tar) in &images {
        manifests.push((name.clone(), documents(tar)?));
    }
    write_dir(&corpus.join("image_layout"), &images)?;
    write_dir(&corpus.join("manifest"), &manifests)?;
    write_dir(&corpus.join("resolve"), &guest_paths())?;
    write_dir(&corpus.join("plan"), &specs()?)?;

    let dict = fuzz.join("dict");
    std::fs::create_dir_all(&dict)?;
    std::fs::write(dict.join("plan.dict"), dictionary(&plan_words()))?;
    std::fs::write(dict.join("resolve.dict"), dictionary(&resolve_words()))?;
    std::fs::write(dict.join("image.dict"), dictionary(&image_words()))?;
    Ok(())
}

/// Replaces the files of `dir` with `files`.
fn write_dir(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    for (name, data) in files {
        std::fs::write(dir.join(name), data)?;
    }
    Ok(())
}

fn images() -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for format in Format::ALL {
        for (kind, data, file) in [
            ("module", MODULE, "app.wasm"),
            ("component", COMPONENT, "comp.wasm"),
        ] {
            let mut opts = BuildOptions {
                module: ModuleSource::Bytes {
                    name: file.to_string(),
                    data: data.to_vec(),
                },
                path_in_image: None,
                reference: format!("kiln-fuzz/{kind}:1"),
                platform: None,
                args: Vec::new(),
                env: Vec::new(),
                format,
                files: Vec::new(),
            };
            out.push((format!("{format}-{kind}"), build(&opts)?));
            if matches!(format, Format::Compat | Format::Layer) {
                // Other files next to the module, a path below a directory, Cmd and Env: what
                // find_module must look past.
                opts.path_in_image = Some(format!("/app/bin/{file}"));
                opts.args = vec!["--flag".into(), "x".into()];
                opts.env = vec!["PATH=/app/bin".into(), "K=v".into()];
                opts.files = vec![
                    Entry::Dir {
                        path: "/etc".into(),
                        mode: 0o755,
                    },
                    Entry::file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n".to_vec()),
                    Entry::file("/other.wasm", 0o644, b"not this one".to_vec()),
                    Entry::Symlink {
                        path: "/app.wasm".into(),
                        target: format!("/app/bin/{file}"),
                    },
                ];
                out.push((format!("{format}-{kind}-files"), build(&opts)?));
            }
        }
    }
    Ok(out)
}

fn build(opts: &BuildOptions) -> Result<Vec<u8>> {
    let mut tar = Vec::new();
    kiln_image::build(opts, &mut tar)?;
    Ok(tar)
}

/// The index, manifest, config and layers of an image tarball, joined for the `manifest`
/// target.
fn documents(tar: &[u8]) -> Result<Vec<u8>> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for entry in tar::Archive::new(tar).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(path, data);
    }
    let blob = |digest: &Value| -> Result<Vec<u8>> {
        let digest = digest.as_str().ok_or("digest is not a string")?;
        let hex = digest.strip_prefix("sha256:").ok_or("not sha256")?;
        Ok(files
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or("missing blob")?
            .clone())
    };
    let index = files.get("index.json").ok_or("no index.json")?.clone();
    let index_v: Value = serde_json::from_slice(&index)?;
    let manifest = blob(&index_v["manifests"][0]["digest"])?;
    let manifest_v: Value = serde_json::from_slice(&manifest)?;
    let mut parts = vec![index, manifest, blob(&manifest_v["config"]["digest"])?];
    for layer in manifest_v["layers"].as_array().ok_or("no layers")? {
        parts.push(blob(&layer["digest"])?);
    }
    Ok(parts.join(SEPARATOR))
}

fn guest_paths() -> Vec<(String, Vec<u8>)> {
    let mut paths: Vec<String> = GUEST_PATHS.iter().map(|s| s.to_string()).collect();
    paths.extend([
        "/dir-link/../dotdot-dir/dir-link/local.wasm".into(),
        "/bin/../usr/./bin//tool.wasm".into(),
        "/chain0/x".into(),
        "/loop-a/x".into(),
        "/nonutf-dir/../nonutf".into(),
        "/escape-rel/../../outside".into(),
        "app/sub/../../../../rel-link".into(),
    ]);
    paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| (format!("path-{i:02}"), p.into_bytes()))
        .collect()
}

fn outside(name: &str) -> String {
    format!("{OUTSIDE_PREFIX}/{name}")
}

/// A config.json as `ctr run` writes it (containerd's default spec), for `args`.
fn ctr_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "cgroupsPath": "/default/fuzz",
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A config.json as the CRI writes one for a pod's container: bind mounts (the pod's
/// `/etc/hosts` is a file), the sandbox's namespaces joined by path, sysctls, a hostname.
fn cri_spec(args: &[&str]) -> Value {
    let mut s = ctr_spec(args);
    let mounts = s["mounts"].as_array_mut().expect("mounts");
    mounts.push(json!({"destination": "/etc/hosts", "type": "bind",
                       "source": outside("bindfile"), "options": ["rbind", "rprivate", "rw"]}));
    mounts.push(json!({"destination": "/data", "type": "bind",
                       "source": outside("bind1"), "options": ["rbind", "rprivate", "ro"]}));
    mounts.push(json!({"destination": "/app/sub", "type": "bind",
                       "source": outside("bindlink"), "options": ["rbind", "noexec"]}));
    s["hostname"] = json!("pod-1");
    s["process"]["cwd"] = json!("/data/sub");
    s["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"}, {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "cgroup"}
    ]);
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0",
                                  "net.ipv4.ping_group_range": "0 2147483647"});
    s["linux"]["cgroupsPath"] = json!("kubepods-besteffort.slice:cri-containerd:abc");
    s["linux"]["resources"] = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "memory": {"limit": 134217728, "swap": 134217728},
        "cpu": {"shares": 2, "quota": 50000, "period": 100000},
        "pids": {"limit": 100},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 0}]
    });
    s["annotations"] = json!({"io.kubernetes.cri.container-type": "container"});
    s
}

fn specs() -> Result<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for (i, p) in GUEST_PATHS.iter().enumerate() {
        out.push((format!("entry-{i:02}"), ctr_spec(&[p, "arg1"])));
    }
    out.push(("cri".into(), cri_spec(&["/hello.wasm#run"])));
    let mut s = cri_spec(&["tool.wasm"]);
    s["process"]["env"] = json!(["PATH=/nonexistent:/bin:/usr/bin", "HOME=/"]);
    s["process"]["cwd"] = json!("/app/sub/../..");
    out.push(("cri-path".into(), s));

    let mut s = ctr_spec(&["local.wasm"]);
    s["process"]["cwd"] = json!("/dir-link");
    s["root"]["readonly"] = json!(true);
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["namespaces"] = json!([{"type": "user"}, {"type": "ipc"}, {"type": "uts"},
                                      {"type": "network"}, {"type": "cgroup"}]);
    s["linux"]["sysctl"] = json!({"kernel.shmmax": "1000", "fs.mqueue.msg_max": "20",
                                  "kernel.domainname": "x", "net.core.somaxconn": "64"});
    s["domainname"] = json!("example");
    out.push(("userns".into(), s));

    let mut s = ctr_spec(&["/comp.wasm"]);
    s["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]);
    s["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512},
        {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}
    ]);
    s["process"]["ioPriority"] = json!({"class": "IOPRIO_CLASS_BE", "priority": 4});
    s["process"]["oomScoreAdj"] = json!(500);
    s["process"]["umask"] = json!(18);
    s["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
    s["linux"]["devices"] = json!([
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438},
        {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "uid": 0, "gid": 0}
    ]);
    s["linux"]["resources"] = json!({
        "devices": [{"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
                    {"allow": true, "type": "b", "access": "r"}],
        "unified": {"memory.high": "100000000", "pids.max": "10"}
    });
    out.push(("devices".into(), s));

    let mut s = ctr_spec(&["/hello.wasm"]);
    s["mounts"] = json!([
        {"destination": "/dev", "type": "bind", "source": outside("bind2"), "options": ["rbind"]},
        {"destination": "/mnt", "source": outside("bind1"), "options": ["bind", "ro", "rw"]},
        {"destination": "/rel", "type": "bind", "source": "."},
        {"destination": "/x", "type": "bind", "source": outside("missing")},
        {"destination": "/y", "type": "overlay", "source": "overlay"}
    ]);
    s["process"]["cwd"] = json!("/mnt/sub");
    out.push(("binds".into(), s));

    let mut s = ctr_spec(&["/hello.wasm"]);
    s["linux"]["resources"] = json!({"devices": [{"allow": true, "access": "rwm"}]});
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]});
    s["linux"]["personality"] = json!({"domain": "LINUX"});
    out.push(("privileged".into(), s));

    out.into_iter()
        .map(|(name, v)| Ok((format!("{name}.json"), serde_json::to_vec(&v)?)))
        .collect()
}

fn plan_words() -> Vec<String> {
    let mut w: Vec<String> = GUEST_PATHS.iter().map(|s| format!("\"{s}\"")).collect();
    w.extend(NAMES.iter().map(|s| s.to_string()));
    w.extend(SOURCES.iter().map(|s| format!("\"{}\"", outside(s))));
    w.extend(
        [
            "args",
            "env",
            "cwd",
            "mounts",
            "destination",
            "source",
            "type",
            "options",
            "namespaces",
            "path",
            "sysctl",
            "devices",
            "resources",
            "unified",
            "capabilities",
            "rlimits",
            "uidMappings",
            "gidMappings",
            "hostname",
            "domainname",
            "readonly",
            "terminal",
            "ioPriority",
            "apparmorProfile",
            "seccomp",
            "personality",
            "hooks",
        ]
        .iter()
        .map(|k| format!("\"{k}\":")),
    );
    w.extend(
        [
            "bind",
            "rbind",
            "ro",
            "rw",
            "noexec",
            "idmap",
            "proc",
            "tmpfs",
            "overlay",
            "pid",
            "network",
            "mount",
            "ipc",
            "uts",
            "user",
            "cgroup",
            "time",
            "CAP_SYS_ADMIN",
            "CAP_NET_ADMIN",
            "net.ipv4.ip_forward",
            "kernel.shmmax",
            "fs.mqueue.msg_max",
            "kernel.hostname",
            "vm.swappiness",
            "memory.high",
            "cgroup.procs",
            "/dev/fuse",
            "/dev/../x",
            "RLIMIT_NOFILE",
            "PATH=",
            "#",
            "..",
            "/..",
            "//",
        ]
        .iter()
        .map(|s| format!("\"{s}\"")),
    );
    w
}

fn resolve_words() -> Vec<String> {
    let mut w: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    w.extend(
        ["/", "..", "../", "/..", "./", "//"]
            .iter()
            .map(|s| s.to_string()),
    );
    w
}

fn image_words() -> Vec<String> {
    let mut w: Vec<String> = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        kiln_image::MEDIA_TYPE_WASM_COMPONENT_LAYER,
        kiln_image::MEDIA_TYPE_WASM_ARTIFACT_LAYER,
        kiln_image::MEDIA_TYPE_WASM_ARTIFACT_CONFIG,
        kiln_image::MEDIA_TYPE_WASM_TO_OCI_LAYER,
        kiln_image::MEDIA_TYPE_WASM_TO_OCI_CONFIG,
        kiln_image::ANNOTATION_TITLE,
        kiln_image::ANNOTATION_CONTAINERD_NAME,
        "mediaType",
        "digest",
        "manifests",
        "layers",
        "config",
        "platform",
        "architecture",
        "annotations",
        "Entrypoint",
        "Cmd",
        "wasm",
        "blobs/sha256/",
        "index.json",
        "oci-layout",
        "sha256:",
    ]
    .iter()
    .map(|s| format!("\"{s}\""))
    .collect();
    w.push("\0asm\x01\0\0\0".into());
    w.push("\0asm\x0d\0\x01\0".into());
    w.push(String::from_utf8_lossy(SEPARATOR).into_owned());
    w.push("ustar".into());
    w
}

/// A libFuzzer dictionary: one quoted word a line, bytes outside printable ASCII escaped.
fn dictionary(words: &[String]) -> String {
    let mut out = String::from("# Written by fuzz/seeds (kiln-fuzz-seeds); do not edit.\n");
    for word in words {
        out.push('"');
        for b in word.bytes() {
            match b {
                b'"' | b'\\' => {
                    out.push('\\');
                    out.push(b as char);
                }
                0x20..=0x7e => out.push(b as char),
                _ => out.push_str(&format!("\\x{b:02X}")),
            }
        }
        out.push_str("\"\n");
    }
    out
}
