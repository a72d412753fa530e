//! scripts/install.sh: registers Kiln in containerd configs of both formats, copies the shim,
//! and changes nothing when run a second time. The real containerd config and /usr/local/bin
//! are never touched: every run points the script at a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Any executable stands in for the shim: the script only copies it.
fn fake_shim(dir: &Path) -> PathBuf {
    let p = dir.join("shim-build");
    std::fs::write(&p, b"#!/bin/sh\necho kiln\n").expect("write");
    let mut perms = std::fs::metadata(&p).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&p, perms).expect("chmod");
    p
}

fn install(config: &Path, bin_dir: &Path, binary: &Path) -> String {
    let out = Command::new(repo().join("scripts/install.sh"))
        .arg("--config")
        .arg(config)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--binary")
        .arg(binary)
        .output()
        .expect("run install.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install.sh failed:\n{text}");
    text
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for e in walk(dir) {
        files.push((e.clone(), std::fs::read(&e).expect("read")));
    }
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("readdir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn check(version_line: &str, section: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etc = tmp.path().join("etc");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let config = etc.join("config.toml");
    let original =
        format!("{version_line}\n# the node's own settings\n[grpc]\n  address = \"/x.sock\"\n");
    std::fs::write(&config, &original).expect("write config");
    let shim = fake_shim(tmp.path());

    install(&config, &bin, &shim);
    let text = std::fs::read_to_string(&config).expect("read config");
    assert!(text.starts_with(&original), "user content kept:\n{text}");
    assert!(text.contains(section), "{section} added:\n{text}");
    assert!(
        text.contains("runtime_type = \"io.containerd.kiln.v1\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read(bin.join("containerd-shim-kiln-v1")).expect("installed shim"),
        std::fs::read(&shim).expect("shim")
    );

    let before = (snapshot(&etc), snapshot(&bin));
    let second = install(&config, &bin, &shim);
    assert_eq!(
        before,
        (snapshot(&etc), snapshot(&bin)),
        "second run changed files"
    );
    assert!(second.contains("already installed"), "{second}");
}

#[test]
fn a_version_2_config_gets_the_cri_runtime_once() {
    check(
        "version = 2",
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kiln]",
    );
}

#[test]
fn a_version_3_config_gets_the_containerd_2_section_once() {
    check(
        "version = 3",
        "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kiln]",
    );
}

fn install_on(config_text: &str) -> (String, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    std::fs::write(&config, config_text).expect("write config");
    let shim = fake_shim(tmp.path());
    let out = install(&config, &tmp.path().join("bin"), &shim);
    (out, std::fs::read_to_string(&config).expect("read config"))
}

#[test]
fn a_version_2_config_without_runtimes_keeps_runc() {
    let (_, text) = install_on(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n",
    );
    assert!(
        text.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\""),
        "{text}"
    );
    // A config that has runc's entry, even as a subtable only, gets no second one; nor does
    // version 3, where containerd keeps its built-in runc.
    for config in [
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = true\n",
        "version = 2\n[plugins.'io.containerd.grpc.v1.cri'.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n",
        "version = 3\n",
    ] {
        let (_, text) = install_on(config);
        assert_eq!(
            text.matches("runtimes.runc").count(),
            config.matches("runtimes.runc").count(),
            "{text}"
        );
        assert!(text.contains("runtimes.kiln]"), "{text}");
    }
}

#[test]
fn a_kiln_section_counts_only_under_the_cri_plugin_of_the_configs_version() {
    // containerd 2.x writes keys in single quotes; that section is the one it reads.
    let config = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'kiln']\n  runtime_type = 'io.containerd.kiln.v1'\n";
    let (out, text) = install_on(config);
    assert_eq!(text, config, "{out}");
    assert!(out.contains("already installed"), "{out}");

    // A version 2 section in a version 3 config is ignored by containerd: the right one is added.
    let config = "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kiln]\n  runtime_type = \"io.containerd.kiln.v1\"\n";
    let (out, text) = install_on(config);
    assert!(out.contains("warning"), "{out}");
    assert!(
        text.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kiln]"),
        "{text}"
    );
}
