use super::*;
use crate::wasm::tests::{EMPTY_MODULE, component};
use serde_json::{Value, json};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::Read;

fn bytes_opts(reference: &str, format: Format) -> BuildOptions {
    BuildOptions {
        module: ModuleSource::Bytes {
            name: "hello.wasm".to_string(),
            data: EMPTY_MODULE.to_vec(),
        },
        path_in_image: None,
        reference: reference.to_string(),
        platform: None,
        args: Vec::new(),
        env: Vec::new(),
        format,
        files: Vec::new(),
    }
}

fn build_vec(opts: &BuildOptions) -> (ImageSummary, Vec<u8>) {
    let mut out = Vec::new();
    let summary = build(opts, &mut out).expect("build");
    (summary, out)
}

/// Unpacks a tar into (path, header, content).
fn untar(data: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
    let mut archive = tar::Archive::new(data);
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let header = entry.header().clone();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        entries.push((path, header, content));
    }
    entries
}

fn files(data: &[u8]) -> HashMap<String, Vec<u8>> {
    untar(data)
        .into_iter()
        .filter(|(_, h, _)| h.entry_type() == tar::EntryType::Regular)
        .map(|(p, _, c)| (p, c))
        .collect()
}

fn json_of(data: &[u8]) -> Value {
    serde_json::from_slice(data).unwrap()
}

fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let data = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("blob {digest} missing"));
    assert_eq!(
        super::digest(data),
        digest,
        "blob content does not match its name"
    );
    data
}

/// index.json, the manifest and the config of a layout, checked against each other.
struct Docs {
    files: HashMap<String, Vec<u8>>,
    index: Value,
    manifest: Value,
    config: Value,
    config_bytes: Vec<u8>,
}

fn docs(out: &[u8], summary: &ImageSummary) -> Docs {
    let files = files(out);
    assert_eq!(
        json_of(&files["oci-layout"]),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = json_of(&files["index.json"]);
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], MEDIA_TYPE_INDEX);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let desc = &index["manifests"][0];
    assert_eq!(desc["mediaType"], MEDIA_TYPE_MANIFEST);
    assert_eq!(desc["digest"], summary.manifest_digest.as_str());
    let manifest_bytes = blob(&files, &summary.manifest_digest);
    assert_eq!(desc["size"], manifest_bytes.len() as u64);
    let manifest = json_of(manifest_bytes);
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], MEDIA_TYPE_MANIFEST);
    assert_eq!(manifest["config"]["digest"], summary.config_digest.as_str());
    let config_bytes = blob(&files, &summary.config_digest).to_vec();
    assert_eq!(manifest["config"]["size"], config_bytes.len() as u64);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), summary.layer_digests.len());
    for (l, d) in layers.iter().zip(&summary.layer_digests) {
        assert_eq!(l["digest"], d.as_str());
        assert_eq!(l["size"], blob(&files, d).len() as u64);
    }
    let config = if config_bytes == b"{}" {
        json!({})
    } else {
        json_of(&config_bytes)
    };
    Docs {
        files,
        index,
        manifest,
        config,
        config_bytes,
    }
}

#[test]
fn media_types_are_the_published_ones() {
    assert_eq!(
        MEDIA_TYPE_WASM_COMPONENT_LAYER,
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
    );
    assert_eq!(
        MEDIA_TYPE_WASM_ARTIFACT_CONFIG,
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(MEDIA_TYPE_WASM_ARTIFACT_LAYER, "application/wasm");
    assert_eq!(
        MEDIA_TYPE_WASM_TO_OCI_CONFIG,
        "application/vnd.wasm.config.v1+json"
    );
    assert_eq!(
        MEDIA_TYPE_WASM_TO_OCI_LAYER,
        "application/vnd.wasm.content.layer.v1+wasm"
    );
    // oci-spec spells the OCI ones the same way.
    assert_eq!(MediaType::ImageIndex.to_string(), MEDIA_TYPE_INDEX);
    assert_eq!(MediaType::ImageManifest.to_string(), MEDIA_TYPE_MANIFEST);
    assert_eq!(MediaType::ImageConfig.to_string(), MEDIA_TYPE_CONFIG);
    assert_eq!(MediaType::ImageLayer.to_string(), MEDIA_TYPE_LAYER);
    for f in Format::ALL {
        assert_eq!(f.name().parse::<Format>(), Ok(f));
    }
    assert!("zip".parse::<Format>().unwrap_err().contains("wasm-to-oci"));
}

#[test]
fn compat_form_shape() {
    let mut opts = bytes_opts("hello:latest", Format::Compat);
    opts.args = vec!["a".into(), "b c".into()];
    opts.env = vec!["K=V".into(), "EMPTY=".into()];
    let (summary, out) = build_vec(&opts);
    let d = docs(&out, &summary);
    let desc = &d.index["manifests"][0];
    assert_eq!(
        desc["platform"],
        json!({"os": "wasi", "architecture": "wasm"})
    );
    assert_eq!(
        desc["annotations"],
        json!({
            ANNOTATION_CONTAINERD_NAME: "docker.io/library/hello:latest",
            ANNOTATION_REF_NAME: "latest",
        })
    );
    assert_eq!(d.manifest["config"]["mediaType"], MEDIA_TYPE_CONFIG);
    assert_eq!(d.manifest["layers"][0]["mediaType"], MEDIA_TYPE_LAYER);
    assert!(d.manifest["layers"][0].get("annotations").is_none());
    assert_eq!(summary.layer_digests.len(), 1);
    assert_eq!(summary.kind, WasmKind::Module);

    let c = &d.config;
    assert_eq!(
        (c["os"].as_str(), c["architecture"].as_str()),
        (Some("wasi"), Some("wasm"))
    );
    assert_eq!(c["config"]["Entrypoint"], json!(["/hello.wasm"]));
    assert_eq!(c["config"]["Cmd"], json!(["a", "b c"]));
    assert_eq!(c["config"]["Env"], json!(["K=V", "EMPTY="]));
    assert!(c["config"].get("Labels").is_none());
    assert_eq!(
        c["rootfs"],
        json!({"type": "layers", "diff_ids": summary.layer_digests})
    );
    assert!(c.get("created").is_none());

    let layer = untar(blob(&d.files, &summary.layer_digests[0]));
    assert_eq!(layer.len(), 1);
    let (path, header, content) = &layer[0];
    assert_eq!(path, "hello.wasm");
    assert_eq!(content, EMPTY_MODULE);
    assert_eq!(header.mode().unwrap(), 0o755);
    assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
    assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
    assert_eq!(summary.module_digest, super::digest(EMPTY_MODULE));

    let hex = |d: &str| d.strip_prefix("sha256:").unwrap().to_string();
    assert_eq!(
        json_of(&d.files["manifest.json"]),
        json!([{
            "Config": format!("blobs/sha256/{}", hex(&summary.config_digest)),
            "RepoTags": ["hello:latest"],
            "Layers": [format!("blobs/sha256/{}", hex(&summary.layer_digests[0]))],
        }])
    );
    // oci-layout, index.json, manifest.json and three blobs.
    assert_eq!(d.files.len(), 6);
}

#[test]
fn layer_form_shape() {
    let (summary, out) = build_vec(&bytes_opts("hello", Format::Layer));
    let d = docs(&out, &summary);
    assert_eq!(
        d.index["manifests"][0]["platform"],
        json!({"os": "wasip1", "architecture": "wasm"})
    );
    assert_eq!(d.manifest["config"]["mediaType"], MEDIA_TYPE_CONFIG);
    let layer = &d.manifest["layers"][0];
    assert_eq!(layer["mediaType"], MEDIA_TYPE_WASM_COMPONENT_LAYER);
    assert_eq!(
        layer["annotations"],
        json!({ANNOTATION_TITLE: "hello.wasm"})
    );
    // The blob is the module itself.
    assert_eq!(blob(&d.files, &summary.layer_digests[0]), EMPTY_MODULE);
    let c = &d.config;
    assert_eq!(
        (c["os"].as_str(), c["architecture"].as_str()),
        (Some("wasip1"), Some("wasm"))
    );
    assert_eq!(c["config"]["Entrypoint"], json!(["/hello.wasm"]));
    assert_eq!(c["rootfs"], json!({"type": "layers", "diff_ids": []}));
    // runwasi's label: sha256 of the concatenated hex digests of the Wasm layers.
    let hexes = hex::encode(sha2::Sha256::digest(
        summary.layer_digests[0].strip_prefix("sha256:").unwrap(),
    ));
    assert_eq!(c["config"]["Labels"], json!({LABEL_RUNWASI_LAYERS: hexes}));
    // Not loadable by docker: no manifest.json.
    assert!(!d.files.contains_key("manifest.json"));

    // A component gets wasip2; extra files go in a tar layer before the Wasm layer.
    let mut opts = bytes_opts("hello", Format::Layer);
    opts.module = ModuleSource::Bytes {
        name: "c.wasm".into(),
        data: component(),
    };
    opts.files = vec![Entry::file("/etc/greeting", 0o644, b"hi".to_vec())];
    let (summary, out) = build_vec(&opts);
    let d = docs(&out, &summary);
    assert_eq!(summary.kind, WasmKind::Component);
    assert_eq!(d.config["os"], "wasip2");
    assert_eq!(d.manifest["layers"][0]["mediaType"], MEDIA_TYPE_LAYER);
    assert_eq!(
        d.manifest["layers"][1]["mediaType"],
        MEDIA_TYPE_WASM_COMPONENT_LAYER
    );
    assert_eq!(
        d.config["rootfs"]["diff_ids"],
        json!([summary.layer_digests[0]])
    );
}

#[test]
fn artifact_form_shape_for_modules_and_components() {
    let (summary, out) = build_vec(&bytes_opts("ghcr.io/o/hello:v1", Format::Artifact));
    let d = docs(&out, &summary);
    assert_eq!(
        d.manifest["config"]["mediaType"],
        MEDIA_TYPE_WASM_ARTIFACT_CONFIG
    );
    assert_eq!(
        d.manifest["layers"][0]["mediaType"],
        MEDIA_TYPE_WASM_ARTIFACT_LAYER
    );
    assert!(d.manifest["layers"][0].get("annotations").is_none());
    assert_eq!(blob(&d.files, &summary.layer_digests[0]), EMPTY_MODULE);
    assert_eq!(
        d.config,
        json!({
            "created": FIXED_CREATED,
            "author": null,
            "architecture": "wasm",
            "os": "wasip1",
            "layerDigests": [super::digest(EMPTY_MODULE)],
            "component": null,
        })
    );
    assert_eq!(
        d.index["manifests"][0]["platform"],
        json!({"os": "wasip1", "architecture": "wasm"})
    );
    assert!(!d.files.contains_key("manifest.json"));

    let mut opts = bytes_opts("ghcr.io/o/comp:v1", Format::Artifact);
    opts.module = ModuleSource::Bytes {
        name: "comp.wasm".into(),
        data: component(),
    };
    let (summary, out) = build_vec(&opts);
    let d = docs(&out, &summary);
    assert_eq!(d.config["os"], "wasip2");
    assert_eq!(
        d.config["component"],
        json!({
            "exports": ["wasi:cli/run@0.2.0"],
            "imports": ["wasi:cli/environment@0.2.0"],
            "target": null,
        })
    );
    assert_eq!(
        d.config["layerDigests"],
        json!([super::digest(&component())])
    );

    // The artifact's config has no place for Cmd, Env or files.
    let mut opts = bytes_opts("x", Format::Artifact);
    opts.args = vec!["a".into()];
    assert!(matches!(
        build(&opts, Vec::new()),
        Err(Error::Unsupported { .. })
    ));
    let mut opts = bytes_opts("x", Format::Artifact);
    opts.files = vec![Entry::file("/a", 0o644, b"".to_vec())];
    assert!(matches!(
        build(&opts, Vec::new()),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn wasm_to_oci_form_shape() {
    let (summary, out) = build_vec(&bytes_opts("hello", Format::WasmToOci));
    let d = docs(&out, &summary);
    assert_eq!(
        d.manifest["config"]["mediaType"],
        MEDIA_TYPE_WASM_TO_OCI_CONFIG
    );
    assert_eq!(d.config_bytes, b"{}");
    let layer = &d.manifest["layers"][0];
    assert_eq!(layer["mediaType"], MEDIA_TYPE_WASM_TO_OCI_LAYER);
    assert_eq!(
        layer["annotations"],
        json!({ANNOTATION_TITLE: "hello.wasm"})
    );
    assert_eq!(blob(&d.files, &summary.layer_digests[0]), EMPTY_MODULE);
}

#[test]
fn output_is_reproducible_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.wasm");
    for format in Format::ALL {
        std::fs::write(&path, EMPTY_MODULE).unwrap();
        let mut opts = BuildOptions::new(&path, "kiln-test/app:v1");
        opts.format = format;
        let (s1, out1) = build_vec(&opts);
        // Rewriting the file (new mtime) must not change the output.
        std::fs::write(&path, EMPTY_MODULE).unwrap();
        let (s2, out2) = build_vec(&opts);
        assert_eq!(s1, s2, "{format}");
        assert_eq!(out1, out2, "{format}");
        for (_, header, _) in untar(&out1) {
            assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
            assert_eq!(header.uid().unwrap(), 0);
        }
        // A different module changes the digests.
        std::fs::write(&path, b"\0asm\x01\0\0\0\0\x01\0").unwrap();
        let (s3, _) = build_vec(&opts);
        assert_ne!(s1.manifest_digest, s3.manifest_digest, "{format}");
        assert_ne!(s1.layer_digests, s3.layer_digests, "{format}");
    }
}

#[test]
fn many_labels_and_annotations_serialise_in_one_order() {
    // oci-spec keeps these in HashMaps; the written bytes must not depend on their order.
    let mut img = Image::single_file("x", "/x.wasm", EMPTY_MODULE.to_vec()).unwrap();
    let exec = img.exec_config_mut().unwrap();
    for i in 0..32 {
        exec.labels.insert(format!("label-{i}"), i.to_string());
    }
    let mut layer = Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, EMPTY_MODULE.to_vec());
    for i in 0..32 {
        layer.annotations.insert(format!("a-{i}"), i.to_string());
    }
    img.layers.push(layer);
    let first = img.to_tar().unwrap();
    for _ in 0..8 {
        assert_eq!(img.to_tar().unwrap(), first);
    }
}

#[test]
fn tar_layer_holds_files_directories_symlinks_and_devices() {
    let layer = Layer::tar(&[
        Entry::file("/bin/app.wasm", 0o755, EMPTY_MODULE.to_vec()),
        Entry::Dir {
            path: "/data".into(),
            mode: 0o700,
        },
        Entry::file("data/a.txt", 0o600, b"a".to_vec()),
        Entry::Symlink {
            path: "/app.wasm".into(),
            target: "bin/app.wasm".into(),
        },
        Entry::CharDevice {
            path: "/dev/null".into(),
            mode: 0o666,
            major: 1,
            minor: 3,
        },
        Entry::BlockDevice {
            path: "/dev/loop0".into(),
            mode: 0o660,
            major: 7,
            minor: 0,
        },
    ])
    .unwrap();
    assert!(layer.is_tar());
    let entries = untar(&layer.data);
    let summary: Vec<(&str, tar::EntryType, u32)> = entries
        .iter()
        .map(|(p, h, _)| (p.as_str(), h.entry_type(), h.mode().unwrap()))
        .collect();
    use tar::EntryType as T;
    assert_eq!(
        summary,
        [
            ("bin/", T::Directory, 0o755),
            ("bin/app.wasm", T::Regular, 0o755),
            ("data/", T::Directory, 0o700),
            ("data/a.txt", T::Regular, 0o600),
            ("app.wasm", T::Symlink, 0o777),
            ("dev/", T::Directory, 0o755),
            ("dev/null", T::Char, 0o666),
            ("dev/loop0", T::Block, 0o660),
        ]
    );
    let link = &entries[4].1;
    assert_eq!(
        link.link_name().unwrap().unwrap().to_str(),
        Some("bin/app.wasm")
    );
    let null = &entries[6].1;
    assert_eq!(
        (null.device_major().unwrap(), null.device_minor().unwrap()),
        (Some(1), Some(3))
    );
    let lp = &entries[7].1;
    assert_eq!(
        (lp.device_major().unwrap(), lp.device_minor().unwrap()),
        (Some(7), Some(0))
    );
    for bad in ["", "/", "/a//b", "/a/../b", "./a"] {
        assert!(
            matches!(
                Layer::tar(&[Entry::file(bad, 0o644, Vec::new())]),
                Err(Error::InvalidPathInImage { .. })
            ),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn two_titled_wasm_layers_and_a_non_wasm_one() {
    // What the tests write by hand: the writer takes any bytes under any media type.
    let img = Image {
        reference: Reference::parse("kiln-test/two").unwrap(),
        platform: Platform::parse("wasip1/wasm").unwrap(),
        config: ImageConfig::Oci(ExecConfig {
            entrypoint: vec!["/b.wasm".into()],
            ..ExecConfig::default()
        }),
        layers: vec![
            Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, EMPTY_MODULE.to_vec())
                .with_title("a.wasm"),
            Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, b"#!/bin/sh\n".to_vec())
                .with_title("b.wasm"),
        ],
    };
    let tarball = img.to_tar().unwrap();
    let loaded = read_layout(&tarball[..]).unwrap();
    assert_eq!(
        loaded.reference.as_deref(),
        Some("docker.io/kiln-test/two:latest")
    );
    let titles: Vec<_> = loaded
        .manifest
        .layers()
        .iter()
        .map(|l| l.annotations().as_ref().unwrap()[ANNOTATION_TITLE].clone())
        .collect();
    assert_eq!(titles, ["a.wasm", "b.wasm"]);
    // The entrypoint picks the layer by title.
    let found = loaded.find_module().unwrap();
    assert_eq!(found.data, b"#!/bin/sh\n");
    assert_eq!(found.path.as_deref(), Some("/b.wasm"));
}

#[test]
fn single_file_images_take_any_bytes_and_a_user() {
    let mut img = Image::single_file("kiln-test/t", "/app.wasm", b"\0asm\x01".to_vec()).unwrap();
    img.exec_config_mut().unwrap().user = Some("1000:1001".into());
    let tarball = img.to_tar().unwrap();
    let loaded = read_layout(&tarball[..]).unwrap();
    let config = loaded.oci_config().unwrap().unwrap();
    assert_eq!(
        config.config().as_ref().unwrap().user().as_deref(),
        Some("1000:1001")
    );
    assert_eq!(loaded.find_module().unwrap().data, b"\0asm\x01");
}

#[test]
fn convert_round_trips_between_every_pair_of_forms() {
    let mut opts = bytes_opts("kiln-test/hello:v2", Format::Compat);
    opts.path_in_image = Some("/app/hello.wasm".into());
    opts.args = vec!["x".into()];
    opts.env = vec!["A=1".into()];
    for from in Format::ALL {
        opts.format = from;
        if matches!(from, Format::Artifact | Format::WasmToOci) {
            opts.args.clear();
            opts.env.clear();
        }
        let (_, input) = build_vec(&opts);
        for to in Format::ALL {
            let mut out = Vec::new();
            let summary = convert(
                &input[..],
                &ConvertOptions {
                    format: to,
                    ..ConvertOptions::default()
                },
                &mut out,
            )
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            assert_eq!(summary.reference, "docker.io/kiln-test/hello:v2");
            assert_eq!(summary.format, to);
            assert_eq!(
                summary.module_digest,
                super::digest(EMPTY_MODULE),
                "{from} -> {to}"
            );
            // Building the target form directly gives the same image, except where the source
            // had no room for the path, Cmd or Env.
            let mut direct = opts.clone();
            direct.format = to;
            if matches!(to, Format::Artifact | Format::WasmToOci) {
                direct.args.clear();
                direct.env.clear();
            }
            if from == Format::WasmToOci || from == Format::Artifact {
                // wasm-to-oci: `/<layer title>`; artifact: `/<repository name>.wasm`.
                direct.path_in_image = Some("/hello.wasm".into());
            }
            let (expected, _) = build_vec(&direct);
            assert_eq!(
                summary.manifest_digest, expected.manifest_digest,
                "{from} -> {to}"
            );
        }
    }
}

#[test]
fn convert_refuses_what_it_cannot_read() {
    let err = convert(&b"not a tar"[..], &ConvertOptions::default(), Vec::new()).unwrap_err();
    assert!(
        matches!(err, Error::Io(_) | Error::InvalidLayout { .. }),
        "{err}"
    );
    // A compat image whose entrypoint is not in the layer.
    let mut img = Image::single_file("x", "/a.wasm", EMPTY_MODULE.to_vec()).unwrap();
    img.exec_config_mut().unwrap().entrypoint = vec!["/b.wasm".into()];
    let err = convert(
        &img.to_tar().unwrap()[..],
        &ConvertOptions::default(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/b.wasm"), "{err}");
}

#[test]
fn nested_path_in_image_gets_parent_directories() {
    let mut opts = bytes_opts("hello", Format::Compat);
    opts.path_in_image = Some("/app/bin/hello.wasm".to_string());
    let (summary, out) = build_vec(&opts);
    assert_eq!(summary.path_in_image, "/app/bin/hello.wasm");
    let d = docs(&out, &summary);
    let layer = untar(blob(&d.files, &summary.layer_digests[0]));
    let paths: Vec<_> = layer
        .iter()
        .map(|(p, h, _)| (p.as_str(), h.entry_type()))
        .collect();
    assert_eq!(
        paths,
        [
            ("app/", tar::EntryType::Directory),
            ("app/bin/", tar::EntryType::Directory),
            ("app/bin/hello.wasm", tar::EntryType::Regular),
        ]
    );
    assert_eq!(
        d.config["config"]["Entrypoint"],
        json!(["/app/bin/hello.wasm"])
    );
}

#[test]
fn bad_paths_in_image_are_rejected() {
    for bad in ["relative.wasm", "/", "/a//b", "/a/../b", "/./a", "/dir/"] {
        let mut opts = bytes_opts("hello", Format::Compat);
        opts.path_in_image = Some(bad.to_string());
        let err = build(&opts, Vec::new()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidPathInImage { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn platform_reaches_config_and_index() {
    let mut opts = bytes_opts("hello", Format::Compat);
    opts.platform = Some("wasip1/wasm".to_string());
    let (summary, out) = build_vec(&opts);
    let d = docs(&out, &summary);
    assert_eq!(
        (d.config["os"].as_str(), d.config["architecture"].as_str()),
        (Some("wasip1"), Some("wasm"))
    );
    assert_eq!(
        d.index["manifests"][0]["platform"],
        json!({"os": "wasip1", "architecture": "wasm"})
    );
    let mut opts = bytes_opts("hello", Format::Compat);
    opts.platform = Some("wasi".to_string());
    assert!(matches!(
        build(&opts, Vec::new()),
        Err(Error::InvalidPlatform { .. })
    ));
}

#[test]
fn tag_reaches_annotations_and_docker_manifest() {
    let (summary, out) = build_vec(&bytes_opts("ghcr.io/o/app:v3", Format::Compat));
    let d = docs(&out, &summary);
    let ann = &d.index["manifests"][0]["annotations"];
    assert_eq!(ann[ANNOTATION_CONTAINERD_NAME], "ghcr.io/o/app:v3");
    assert_eq!(ann[ANNOTATION_REF_NAME], "v3");
    assert_eq!(
        json_of(&d.files["manifest.json"])[0]["RepoTags"],
        json!(["ghcr.io/o/app:v3"])
    );
}

#[test]
fn non_wasm_input_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script.sh");
    std::fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
    let mut out = Vec::new();
    let err = build(&BuildOptions::new(&path, "x"), &mut out).unwrap_err();
    assert!(
        matches!(&err, Error::NotWasm { path: p, .. } if p == &path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("magic"), "{err}");
    assert!(out.is_empty(), "nothing must be written on error");
    for (bytes, needle) in [
        (&b"\0as"[..], "magic"),
        (&b"\0asm\x01"[..], "truncated"),
        (&b"\0asm\x02\0\0\0"[..], "02000000"),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = build(&BuildOptions::new(&path, "x"), Vec::new()).unwrap_err();
        assert!(matches!(err, Error::NotWasm { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn missing_module_names_the_path() {
    let err = build(&BuildOptions::new("/nonexistent/m.wasm", "x"), Vec::new()).unwrap_err();
    assert!(matches!(err, Error::ReadModule { .. }));
    assert!(err.to_string().contains("/nonexistent/m.wasm"), "{err}");
}

#[test]
fn bad_env_is_rejected() {
    for bad in ["NOEQUALS", "=value"] {
        let mut opts = bytes_opts("hello", Format::Compat);
        opts.env = vec![bad.to_string()];
        assert!(
            matches!(build(&opts, Vec::new()), Err(Error::InvalidEnv { .. })),
            "{bad}"
        );
    }
}
