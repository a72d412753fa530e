//! Images whose module is a Wasm layer of its own rather than a file in a tar layer (runwasi's
//! component layer through `ctr`; the artifact forms, which `ctr run` refuses, are run
//! through the CRI in cri_forms.rs): the shim reads the layer from containerd's content store,
//! the compile cache is keyed by the layer's digest (the same entry as the same module as a
//! file), a layer image hit never fetches the bytes, and bad layers are clear errors.
//! containerd 1.6 refuses such images at import; that is asserted too.

use std::time::Duration;

use kiln_e2e::{Kiln, Output, assert_refused, kiln_with_env, wait_until};
use kiln_image::{
    BuildOptions, ExecConfig, Format, Image, ImageConfig, Layer, MEDIA_TYPE_WASM_COMPONENT_LAYER,
    ModuleSource, Platform, Reference,
};
use sha2::Digest as _;

/// containerd at debug level: the tests read the shim's debug lines (cache outcome, fetches).
fn k() -> &'static Kiln {
    kiln_with_env(&[("CONTAINERD_LOG_LEVEL", "debug")])
}

fn layers_supported(k: &Kiln) -> bool {
    k.containerd_version() >= (1, 7)
}

/// `bytes` with a custom section unique to this test run and `tag`: a new cache key.
fn unique(bytes: &[u8], tag: &str) -> Vec<u8> {
    let payload = format!(
        "{tag}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let name = b"kiln-test";
    let size = 1 + name.len() + payload.len();
    assert!(size < 128);
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0, size as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.extend_from_slice(payload.as_bytes());
    out
}

fn build(k: &Kiln, reference: &str, format: Format, name: &str, data: Vec<u8>) -> Output {
    let mut opts = BuildOptions::new("unused", reference);
    opts.module = ModuleSource::Bytes {
        name: name.to_string(),
        data,
    };
    opts.format = format;
    let mut tar = Vec::new();
    kiln_image::build(&opts, &mut tar).expect("build the image");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img.tar");
    std::fs::write(&path, tar).expect("write");
    k.import(&path)
}

/// An image of Wasm layers only, with an OCI config whose entrypoint is `entrypoint`.
fn layered(reference: &str, entrypoint: &str, layers: Vec<Layer>) -> Image {
    Image {
        reference: Reference::parse(reference).expect("reference"),
        platform: Platform::parse("wasip1/wasm").expect("platform"),
        config: ImageConfig::Oci(ExecConfig {
            entrypoint: vec![entrypoint.to_string()],
            ..ExecConfig::default()
        }),
        layers,
    }
}

#[test]
fn a_layer_image_runs_through_ctr_or_is_refused_by_1_6() {
    let k = k();
    let hello = std::fs::read(k.wasm("hello")).expect("hello.wasm");
    let reference = "docker.io/kiln-test/hello-layer:1";
    let out = build(k, reference, Format::Layer, "hello.wasm", hello);
    if !layers_supported(k) {
        assert!(!out.success(), "1.6 must refuse a layer image:\n{out}");
        assert!(
            out.stderr
                .contains("mismatched image rootfs and manifest layers"),
            "{out}"
        );
        return;
    }
    assert!(out.success(), "import:\n{out}");
    let c = k.container("layer-hello");
    let out = c.run(reference).output();
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout, "Hello from Kiln!\n");
}

/// The same module as a layer and as a file is one cache entry, named by its sha256; a
/// start from the cache never asks for the layer's bytes.
#[test]
fn a_layer_and_the_same_module_as_a_file_share_one_cache_entry() {
    let k = k();
    if !layers_supported(k) {
        return;
    }
    let hello = std::fs::read(k.wasm("hello")).expect("hello.wasm");
    let wasm = unique(&hello, "shared-entry");
    let key = hex::encode(sha2::Sha256::digest(&wasm));
    let layer_ref = "docker.io/kiln-test/shared-layer:1";
    let file_ref = "docker.io/kiln-test/shared-file:1";
    let out = build(k, layer_ref, Format::Layer, "hello.wasm", wasm.clone());
    assert!(out.success(), "{out}");
    let out = build(k, file_ref, Format::Compat, "hello.wasm", wasm);
    assert!(out.success(), "{out}");

    // First start: a miss, so the worker asks for the layer.
    let first = k.container("shared-1");
    let out = first.run(layer_ref).output();
    assert!(out.success(), "{out}");
    let lines = k.containerd_log_lines(&first.id);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("sent layer sha256:{key}"))),
        "the first start must fetch the layer:\n{}",
        lines.join("\n")
    );
    // The cache fill stores the optimized artifact under the module's sha256.
    let stored = wait_until(Duration::from_secs(60), || k.cached_artifact(&key));
    assert!(stored.is_some(), "no cache entry named {key}");

    // The file form of the same bytes hits that entry...
    let second = k.container("shared-2");
    let out = second.run(file_ref).output();
    assert!(out.success(), "{out}");
    let hit = |id: &str| {
        k.containerd_log_lines(id)
            .iter()
            .any(|l| l.contains("cache: \\\"hit\\\"") || l.contains("cache: \"hit\""))
    };
    assert!(
        hit(&second.id),
        "the file form must hit the layer's entry:\n{}",
        k.containerd_log_lines(&second.id).join("\n")
    );
    // ...and so does the layer form, without fetching the layer.
    let third = k.container("shared-3");
    let out = third.run(layer_ref).output();
    assert!(out.success(), "{out}");
    let lines = k.containerd_log_lines(&third.id);
    assert!(hit(&third.id), "{}", lines.join("\n"));
    assert!(
        !lines.iter().any(|l| l.contains("sent layer")),
        "a hit must not fetch the layer:\n{}",
        lines.join("\n")
    );
}

#[test]
fn a_layer_whose_bytes_are_not_wasm_is_refused() {
    let k = k();
    if !layers_supported(k) {
        return;
    }
    let img = layered(
        "docker.io/kiln-test/notwasm-layer:1",
        "app.wasm",
        vec![
            Layer::blob(
                MEDIA_TYPE_WASM_COMPONENT_LAYER,
                b"#!/bin/sh\necho hi\n".to_vec(),
            )
            .with_title("app.wasm"),
        ],
    );
    let out = k.import_image(&img);
    assert!(out.success(), "{out}");
    let c = k.container("layer-notwasm");
    let out = c.run("docker.io/kiln-test/notwasm-layer:1").output();
    assert_refused(k, &c.id, &out, "is not a WebAssembly module");
    assert!(out.stderr.contains("layer sha256:"), "{out}");
}

#[test]
fn of_several_wasm_layers_args0_picks_one_by_title_or_it_is_an_error() {
    let k = k();
    if !layers_supported(k) {
        return;
    }
    let hello = std::fs::read(k.wasm("hello")).expect("hello");
    let printargs = std::fs::read(k.wasm("printargs")).expect("printargs");
    let layers = || {
        vec![
            Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, hello.clone()).with_title("hello.wasm"),
            Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, printargs.clone())
                .with_title("printargs.wasm"),
        ]
    };
    let img = layered("docker.io/kiln-test/two-layers:1", "hello.wasm", layers());
    let out = k.import_image(&img);
    assert!(out.success(), "{out}");

    let c = k.container("two-hello");
    let out = c.run("docker.io/kiln-test/two-layers:1").output();
    assert!(out.success(), "{out}");
    assert_eq!(out.stdout, "Hello from Kiln!\n");

    let c = k.container("two-printargs");
    let out = c
        .run("docker.io/kiln-test/two-layers:1")
        .args(["/printargs.wasm", "picked"])
        .output();
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("picked"), "{out}");

    let c = k.container("two-neither");
    let out = c
        .run("docker.io/kiln-test/two-layers:1")
        .args(["other.wasm"])
        .output();
    assert_refused(k, &c.id, &out, "has 2 Wasm layers");
    assert!(
        out.stderr.contains("hello.wasm") && out.stderr.contains("printargs.wasm"),
        "{out}"
    );
}
