//! Images reach containerd through a registry too, not only `ctr images import`: an image
//! kiln-image writes, pushed with skopeo to a private Debian `docker-registry`, pulled with
//! `ctr images pull --plain-http`, runs with Kiln.

use std::time::Duration;

use kiln_e2e::registry::registry;
use kiln_e2e::{Kiln, kiln};

/// Pushes `tar` as `repo:tag`, checks the registry serves the manifest kiln-image wrote, pulls
/// it into the private containerd, and returns the pulled reference.
fn push_and_pull(
    k: &'static Kiln,
    tar: &std::path::Path,
    repo: &str,
    tag: &str,
    digest: &str,
) -> String {
    let reg = registry();
    let pushed = reg.push(tar, &format!("{repo}:{tag}"));
    assert!(
        pushed.success(),
        "skopeo push failed:\n{pushed}\nregistry log:\n{}",
        reg.log()
    );
    let (served, _) = reg
        .manifest(repo, tag)
        .expect("the registry serves the manifest");
    assert_eq!(
        served, digest,
        "the registry holds another manifest than the one written"
    );

    let reference = reg.reference(&format!("{repo}:{tag}"));
    let pulled = k.ctr_timeout(
        &[
            "images",
            "pull",
            "--plain-http",
            "--all-platforms",
            &reference,
        ],
        Duration::from_secs(60),
    );
    assert!(pulled.success(), "ctr images pull failed:\n{pulled}");
    let ls = k.ctr(&["images", "ls"]);
    let line = ls
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{reference} ")))
        .unwrap_or_else(|| panic!("the pulled image is not listed:\n{ls}"));
    assert!(line.contains(digest), "pulled under another digest: {line}");
    reference
}

fn assert_runs_hello(k: &'static Kiln, reference: &str, name: &str) {
    let c = k.container(name);
    let out = c.run(reference).output();
    let _ = k.ctr(&["images", "rm", reference]);
    assert!(
        out.success() && out.stdout == "Hello from Kiln!\n",
        "the pulled image did not run:\n{out}"
    );
}

#[test]
fn a_compat_image_pulled_from_a_registry_runs() {
    let k = kiln();
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("hello.tar");
    let opts = kiln_image::BuildOptions::new(k.wasm("hello"), "kiln-test/pulled:v1");
    let file = std::fs::File::create(&tar).expect("create tarball");
    let summary = kiln_image::build(&opts, file).expect("build the compat image");

    let reference = push_and_pull(k, &tar, "kiln-test/pulled", "v1", &summary.manifest_digest);
    assert_runs_hello(k, &reference, "pulled");
}

#[test]
fn an_artifact_converted_by_the_cli_runs_after_a_pull() {
    // ctr refuses to run a Wasm OCI artifact (its config is not an OCI image config); `kiln
    // image convert` is how a user turns one into an image it runs.
    let k = kiln();
    let dir = tempfile::tempdir().expect("tempdir");
    let artifact = dir.path().join("artifact.tar");
    let compat = dir.path().join("compat.tar");
    let run_cli = |args: &[&std::ffi::OsStr]| {
        let mut cmd = std::process::Command::new(k.kiln_cli());
        cmd.args(args);
        let out = kiln_e2e::process::run(cmd, Duration::from_secs(60));
        assert!(out.success(), "kiln failed:\n{out}");
        out
    };
    let wasm = k.wasm("hello");
    run_cli(&[
        "image".as_ref(),
        "build".as_ref(),
        wasm.as_os_str(),
        "-t".as_ref(),
        "kiln-test/converted:v1".as_ref(),
        "--path".as_ref(),
        "/hello.wasm".as_ref(),
        "--format".as_ref(),
        "artifact".as_ref(),
        "-o".as_ref(),
        artifact.as_os_str(),
    ]);
    let out = run_cli(&[
        "image".as_ref(),
        "convert".as_ref(),
        artifact.as_os_str(),
        "--format".as_ref(),
        "compat".as_ref(),
        "-o".as_ref(),
        compat.as_os_str(),
    ]);
    let digest = out
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("kiln image convert printed no digest:\n{out}"))
        .to_string();
    let loaded = kiln_image::read_layout(std::fs::File::open(&compat).expect("open"))
        .expect("read the converted image");
    assert_eq!(
        loaded.manifest.config().media_type().to_string(),
        kiln_image::MEDIA_TYPE_CONFIG
    );

    let reference = push_and_pull(k, &compat, "kiln-test/converted", "v1", &digest);
    assert_runs_hello(k, &reference, "converted");
}
