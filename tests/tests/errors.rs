//! Containers Kiln must refuse: `ctr run` fails with a message naming the problem, nothing of
//! the container is left behind, and the shim and containerd keep serving.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_e2e::{Kiln, Output, assert_cleaned_up, assert_hello_runs, image, kiln};
use kiln_image::Image;

const NOT_WASM: &str = "docker.io/kiln-test/notwasm:latest";
const TRUNCATED: &str = "docker.io/kiln-test/truncated:latest";

/// Writes and imports the two broken images once per test binary.
fn broken_images(k: &'static Kiln) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let hello = std::fs::read(k.wasm("hello")).expect("read hello.wasm");
        let images = [
            Image::single_file(
                NOT_WASM,
                "/app.wasm",
                b"#!/bin/sh\necho not wasm\n".to_vec(),
            ),
            Image::single_file(TRUNCATED, "/app.wasm", hello[..100].to_vec()),
        ];
        for img in images {
            let img = img.expect("describe the image");
            let out = k.import_image(&img);
            assert!(out.success(), "import of {} failed:\n{out}", img.reference);
        }
    });
}

/// The common checks: non-zero exit, the message, no leftovers, and Kiln still works.
#[track_caller]
fn assert_refused(k: &'static Kiln, id: &str, out: &Output, any_of: &[&str]) {
    assert!(
        !out.timed_out && out.code() != 0,
        "ctr run of a broken container must fail:\n{out}"
    );
    assert!(
        any_of.iter().any(|m| out.stderr.contains(m)),
        "the error must mention one of {any_of:?}:\n{out}"
    );
    assert!(
        out.stderr.contains(id),
        "the error must name the container {id}:\n{out}"
    );
    assert!(
        k.task(id).is_none(),
        "a task remains for the refused container {id}: {:?}",
        k.task(id)
    );
    assert_cleaned_up(id, Duration::from_secs(3));
    assert_hello_runs(k);
}

#[test]
fn entrypoint_that_is_not_wasm() {
    let k = kiln();
    broken_images(k);
    let c = k.container("notwasm");
    let out = c.run(NOT_WASM).output();
    assert_refused(k, &c.id, &out, &["not a WebAssembly module"]);
}

#[test]
fn truncated_module() {
    let k = kiln();
    broken_images(k);
    let c = k.container("truncated");
    let out = c.run(TRUNCATED).output();
    assert_refused(k, &c.id, &out, &["invalid WebAssembly", "cannot load"]);
}

#[test]
fn missing_entrypoint() {
    let k = kiln();
    let c = k.container("noentry");
    let out = c.run(&image("hello")).args(["/nope.wasm"]).output();
    assert_refused(k, &c.id, &out, &["not found"]);
    assert!(out.stderr.contains("/nope.wasm"), "{out}");
}

#[test]
fn terminal_is_refused() {
    let k = kiln();
    let c = k.container("tty");
    let out = c.run(&image("hello")).opt("-t").output_with_tty();
    assert_refused(k, &c.id, &out, &["terminal"]);
}
