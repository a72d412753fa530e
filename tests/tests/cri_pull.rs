//! What the CRI's `PullImage` does with each Wasm image form, on the containerd under test, as
//! kubelet calls it: images kiln-image writes are pushed to a registry in the CRI's network
//! namespace and pulled for the node's platform (linux/amd64); `ImageStatus`, containerd's
//! content store and its snapshots tell what was stored and unpacked. Every behaviour is
//! asserted, refusals included, so that a containerd that changes any of them fails here.
//! Each test's comments say what it found, and why.
//!
//! Why a Wasm platform pulls at all: the CRI pulls for linux/amd64 and never for another
//! platform (1.7 and 2.x have per-runtime *snapshotter* settings; 2.x's `runtime_platforms`
//! also takes a `platform`, which no version up to 2.3 uses for pulling). A tag that names an
//! image *manifest* skips platform matching (only an index's entries are matched), and the
//! unpacker of 1.6, 1.7 and 2.1 takes a config of any platform. So a `wasi/wasm` image pushed
//! as a bare manifest (what `skopeo copy oci-archive:` pushes from `kiln image build`'s
//! layout) pulls and unpacks with no setting, and the same image behind an index is refused
//! ("no match for platform in manifest").
//!
//! containerd 2.x pulls through the Transfer Service unless `use_local_image_pull = true`.
//! With containerd's defaults (2.1) its unpacker takes every platform; with
//! `check_platform_supported = true` (the host platform only), which for a non-Linux image
//! does what containerd 2.3's default does (`platforms.OnlyOS` of the host), it fetches a
//! `wasi/wasm` image without unpacking it: PullImage succeeds and no snapshot exists, and 2.3's CreateContainer, whose
//! fallback unpack matches the host platform too, then fails with "parent snapshot … does not
//! exist". `use_local_image_pull = true` pulls in process, whose unpacker takes any platform.
//! scripts/containerd-private.sh's `KILN_CRI_STRICT_UNPACK=1` and `KILN_CRI_LOCAL_PULL=1`
//! (2.x only) set those two, and the tests below expect what each combination does.

use std::io::Read;
use std::time::Duration;

use containerd_client::tonic::Code;
use k8s_cri::v1 as cri_api;
use kiln_e2e::cri::{self, ContainerSpec, Cri, PodSpec, cri};
use kiln_image::{BuildOptions, Format, ModuleSource};

/// How the containerd under test pulls for the CRI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Puller {
    /// 1.6: client.Pull; non-tar layers are refused at unpack.
    V16,
    /// 1.7: client.Pull with the unpacker that skips non-layer blobs.
    V17,
    /// 2.x through the Transfer Service; `strict`: it unpacks the host platform only.
    Transfer { strict: bool },
    /// 2.x with `use_local_image_pull = true`.
    Local,
}

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn puller(cri: &Cri) -> Puller {
    // "containerd 1.6.20~ds1", "containerd 2.1.9+unknown"
    let version = cri
        .runtime_version
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {:?}", cri.runtime_version));
    let mut parts = version.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    match (major, minor) {
        (1, 6) => Puller::V16,
        (1, 7) => Puller::V17,
        (2, _) if env_on("KILN_CRI_LOCAL_PULL") => Puller::Local,
        (2, _) => Puller::Transfer {
            strict: env_on("KILN_CRI_STRICT_UNPACK"),
        },
        _ => panic!("no expectations for containerd {version}"),
    }
}

/// A core module of its own for each image (a custom section naming it), so that no two
/// images share a layer, a chain ID or a snapshot.
fn module(name: &str) -> Vec<u8> {
    let mut payload = vec![b"kiln-test".len() as u8];
    payload.extend_from_slice(b"kiln-test");
    payload.extend_from_slice(name.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 section size");
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0);
    m.push(payload.len() as u8);
    m.extend(payload);
    m
}

/// An image in the registry.
#[derive(Debug)]
struct Pushed {
    reference: String,
    /// The manifest's digest (the tag names it, or an index naming it).
    manifest: String,
    /// The config's digest: the image id the CRI reports.
    config: String,
    /// The Wasm module's layer (compat: the tar layer holding it).
    layer: String,
    /// Sum of the manifest's, the config's and the layers' sizes.
    size: u64,
    /// The index's digest, when the tag names an index.
    index: Option<String>,
}

/// Builds `name` in `format` (platform: the form's default unless given), in an image index
/// when `index`, and pushes it as `kiln-test/NAME:1`.
fn push(
    registry: &cri::Registry,
    dir: &std::path::Path,
    name: &str,
    format: Format,
    platform: Option<&str>,
    index: bool,
) -> Pushed {
    let mut opts = BuildOptions::new("unused", format!("kiln-test/{name}:1"));
    opts.module = ModuleSource::Bytes {
        name: "hello.wasm".into(),
        data: module(name),
    };
    opts.path_in_image = Some("/hello.wasm".into());
    opts.format = format;
    opts.platform = platform.map(String::from);
    let mut layout = Vec::new();
    let summary = kiln_image::build(&opts, &mut layout).expect("build the image");
    let files = untar(&layout);
    let blob_size = |d: &str| {
        let path = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        files
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, data)| data.len() as u64)
            .unwrap_or_else(|| panic!("no blob {d} in the layout"))
    };
    let size = blob_size(&summary.manifest_digest)
        + blob_size(&summary.config_digest)
        + summary
            .layer_digests
            .iter()
            .map(|d| blob_size(d))
            .sum::<u64>();
    let (layout, index) = if index {
        let (l, d) = in_index(files);
        (l, Some(d))
    } else {
        (layout, None)
    };
    let tar = dir.join(format!("{name}.tar"));
    std::fs::write(&tar, layout).expect("write the layout");
    let reference = registry
        .push(&tar, &format!("kiln-test/{name}:1"))
        .unwrap_or_else(|out| panic!("skopeo could not push {name}:\n{out}"));
    Pushed {
        reference,
        manifest: summary.manifest_digest,
        config: summary.config_digest,
        layer: summary.layer_digests.last().cloned().expect("a layer"),
        size,
        index,
    }
}

fn untar(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut ar = tar::Archive::new(tar);
    for entry in ar.entries().expect("read the layout") {
        let mut entry = entry.expect("a layout entry");
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let path = entry
            .path()
            .expect("an entry path")
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).expect("read an entry");
        files.push((path, data));
    }
    files
}

/// The layout rewritten so that `index.json` names an image index (blob) that names the
/// manifest with its platform: what a multi-platform push (`docker buildx`, `skopeo --all`
/// of an index) puts behind a tag. Returns the layout and the index's digest.
fn in_index(mut files: Vec<(String, Vec<u8>)>) -> (Vec<u8>, String) {
    let pos = files
        .iter()
        .position(|(p, _)| p == "index.json")
        .expect("index.json");
    let top: serde_json::Value = serde_json::from_slice(&files[pos].1).expect("index.json");
    let mut manifest = top["manifests"][0].clone();
    let annotations = manifest
        .as_object_mut()
        .and_then(|m| m.remove("annotations"))
        .expect("the manifest descriptor's annotations");
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": kiln_image::MEDIA_TYPE_INDEX,
        "manifests": [manifest],
    }))
    .expect("index JSON");
    let digest = kiln_image::digest(&inner);
    files[pos].1 = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": kiln_image::MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": kiln_image::MEDIA_TYPE_INDEX,
            "digest": digest,
            "size": inner.len(),
            "annotations": annotations,
        }],
    }))
    .expect("index.json");
    // Docker's manifest.json describes a single image; an index has no place in it.
    files.retain(|(p, _)| p != "manifest.json");
    files.push((
        format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
        inner,
    ));
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &path, &data[..])
            .expect("append to the layout");
    }
    (b.into_inner().expect("finish the layout"), digest)
}

/// `ctr snapshots info KEY` of the CRI's snapshotter: `Some((kind, parent))` when it exists.
fn snapshot(cri: &Cri, key: &str) -> Option<(String, String)> {
    let out = cri.ctr(&["snapshots", "info", key]);
    if !out.success() {
        assert!(
            out.stderr.contains("not found"),
            "ctr snapshots info {key}:\n{out}"
        );
        return None;
    }
    let info: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let field = |f: &str| info[f].as_str().unwrap_or("").to_string();
    Some((field("Kind"), field("Parent")))
}

/// The line of `ctr images ls` for `reference`, if containerd has an image of that name.
fn containerd_image(cri: &Cri, reference: &str) -> Option<String> {
    let out = cri.ctr(&["images", "ls"]);
    assert!(out.success(), "{out}");
    out.stdout
        .lines()
        .find(|l| l.starts_with(&format!("{reference} ")))
        .map(str::to_string)
}

/// The digests in containerd's content store.
fn content(cri: &Cri) -> Vec<String> {
    let out = cri.ctr(&["content", "ls", "-q"]);
    assert!(out.success(), "{out}");
    out.stdout.lines().map(str::to_string).collect()
}

/// `ImageStatus` (verbose) once it reports the image: the CRI's image store follows
/// containerd's image events, which may come a moment after the call that caused them.
fn status_when_present(cri: &Cri, reference: &str) -> (cri_api::Image, serde_json::Value) {
    let mut last = String::new();
    kiln_e2e::wait_until(Duration::from_secs(10), || {
        match cri.image_status_verbose(reference) {
            Ok((Some(img), info)) => {
                let info = info.get("info").cloned().unwrap_or_default();
                let info = serde_json::from_str(&info).unwrap_or(serde_json::Value::Null);
                Some((img, info))
            }
            Ok((None, _)) => {
                last = "not present".into();
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    })
    .unwrap_or_else(|| panic!("ImageStatus of {reference}: {last}"))
}

/// A pulled image that the CRI lists as kubelet expects it: id = the config's digest, the tag
/// and the manifest's digest as repo tag and repo digest, and the stored size.
fn assert_listed(cri: &Cri, p: &Pushed, id: &str) -> serde_json::Value {
    assert_eq!(id, p.config, "PullImage's image ref is the config digest");
    let (img, info) = status_when_present(cri, &p.reference);
    assert_eq!(img.id, p.config, "{img:?}");
    assert_eq!(img.repo_tags, std::slice::from_ref(&p.reference), "{img:?}");
    let repo = p.reference.rsplit_once(':').map_or("", |(r, _)| r);
    assert_eq!(
        img.repo_digests,
        [format!("{repo}@{}", p.manifest)],
        "{img:?}"
    );
    assert_eq!(img.size, p.size, "{img:?}");
    assert!(
        cri.list_images().unwrap().iter().any(|i| i.id == p.config),
        "ListImages lacks {}",
        p.reference
    );
    let listed = containerd_image(cri, &p.reference)
        .unwrap_or_else(|| panic!("containerd has no image {}", p.reference));
    assert!(listed.contains(&p.manifest), "{listed}");
    let stored = content(cri);
    for d in [&p.manifest, &p.config, &p.layer] {
        assert!(stored.contains(d), "{d} is not in the content store");
    }
    info
}

/// `CreateContainer` of `image` in a runc pod (never started: this is about the rootfs the
/// CRI prepares from the image); returns the container's snapshot, or the CRI's error.
fn create_in_a_pod(
    cri: &'static Cri,
    name: &str,
    image: &str,
) -> Result<Option<(String, String)>, cri::CriError> {
    let pod = cri.run_pod(PodSpec::new(name, "runc")).unwrap();
    let c = pod.create(&ContainerSpec::new("wasm", image))?;
    Ok(snapshot(cri, &c.id))
}

#[test]
fn the_compat_form_pulls_and_unpacks_for_either_wasm_platform() {
    let cri = cri();
    let registry = cri.start_registry().unwrap();
    let puller = puller(cri);
    for (name, platform, os) in [
        ("compat-wasi", None, "wasi"),
        ("compat-wasip1", Some("wasip1/wasm"), "wasip1"),
    ] {
        let p = push(&registry, &cri.dir, name, Format::Compat, platform, false);
        let id = cri.pull_image_for(&p.reference, None).unwrap();
        let info = assert_listed(cri, &p, &id);
        assert_eq!(info["imageSpec"]["os"], os, "{info}");
        assert_eq!(info["imageSpec"]["architecture"], "wasm", "{info}");
        // One uncompressed layer: its diff ID, and so the chain ID, is its digest.
        assert_eq!(info["chainID"], p.layer.as_str(), "{info}");
        let listed = containerd_image(cri, &p.reference).unwrap();
        assert!(listed.contains(&format!(" {os}/wasm ")), "{listed}");

        let unpacked = snapshot(cri, &p.layer);
        match puller {
            // The Transfer Service's unpacker only fetched the layers: "unpacker does not
            // support platform, only fetching layers" (containerd's debug log).
            Puller::Transfer { strict: true } => {
                assert_eq!(unpacked, None, "{name} was unpacked at pull time")
            }
            _ => assert_eq!(
                unpacked,
                Some(("Committed".to_string(), String::new())),
                "{name} was not unpacked by PullImage"
            ),
        }

        // The container's rootfs is a snapshot on the image's. Where the pull did not
        // unpack, 2.1's CreateContainer unpacks then (containerd's image.Unpack takes a
        // tag's manifest whatever its platform); that of 2.2.7 and 2.3 matches the host
        // platform instead: the "parent snapshot ... does not exist" failure.
        let rootfs = create_in_a_pod(cri, name, &p.reference).unwrap();
        assert_eq!(
            rootfs,
            Some(("Active".to_string(), p.layer.clone())),
            "{name}'s container snapshot"
        );
        assert_eq!(
            snapshot(cri, &p.layer),
            Some(("Committed".to_string(), String::new()))
        );
    }
}

#[test]
fn an_index_of_wasm_platforms_is_refused_for_the_node_platform() {
    let cri = cri();
    let registry = cri.start_registry().unwrap();
    let puller = puller(cri);
    for (name, format, platform) in [
        ("index-compat-wasi", Format::Compat, None),
        ("index-compat-wasip1", Format::Compat, Some("wasip1/wasm")),
        ("index-layer", Format::Layer, None),
        ("index-artifact", Format::Artifact, None),
        ("index-wasm-to-oci", Format::WasmToOci, None),
    ] {
        let p = push(&registry, &cri.dir, name, format, platform, true);
        let index = p.index.clone().expect("an index");
        // As kubelet sends it, and with the pod's runtime handler (the pod annotation
        // containerd reads, and the image spec's field of the RuntimeClassInImageCriApi
        // gate): a handler changes the snapshotter at most, never the platform.
        for handler in [None, Some("kiln")] {
            let err = cri.pull_image_for(&p.reference, handler).unwrap_err();
            assert_eq!(err.code, Some(Code::NotFound), "{name}: {err}");
            let want = match puller {
                // The Transfer Service stores the index without a manifest of the node's
                // platform; the CRI then finds no config.
                Puller::Transfer { .. } => format!(
                    "get image config descriptor: no match for platform in manifest {index}: not found"
                ),
                _ => format!(
                    "failed to pull and unpack image \"{}\": no match for platform in manifest: not found",
                    p.reference
                ),
            };
            assert_eq!(err.message, want, "{name} ({handler:?})");
            assert_eq!(
                cri.image_status(&p.reference).unwrap().map(|i| i.id),
                None,
                "{name}: the CRI lists a refused image"
            );
        }
        // The manifest matched no platform, so it was never fetched.
        let stored = content(cri);
        assert!(
            !stored.contains(&p.manifest),
            "{name}: the manifest was fetched"
        );
        // The Transfer Service leaves containerd an image record of the index (which keeps
        // the index blob from the garbage collector); the CRI does not list it. Elsewhere
        // nothing refers to the fetched index, and the collector may take it at any time.
        let record = containerd_image(cri, &p.reference);
        match puller {
            Puller::Transfer { .. } => {
                assert!(
                    record
                        .as_deref()
                        .is_some_and(|l| l.contains(kiln_image::MEDIA_TYPE_INDEX)),
                    "{name}: {record:?}"
                );
                assert!(stored.contains(&index), "{name}: the index is not stored");
            }
            _ => assert_eq!(record, None, "{name}"),
        }
    }
}

/// The Wasm-layer forms: `layer` (runwasi), `artifact` (CNCF), `wasm-to-oci`. No tar layer,
/// so nothing to unpack; 1.6 refuses them, later versions store them without a snapshot.
#[test]
fn wasm_layer_forms_are_stored_without_a_snapshot_or_refused_by_1_6() {
    let cri = cri();
    let registry = cri.start_registry().unwrap();
    let puller = puller(cri);
    for (name, format, os) in [
        ("layer", Format::Layer, "wasip1"),
        ("artifact", Format::Artifact, "wasip1"),
        // `{}`: no platform at all.
        ("wasm-to-oci", Format::WasmToOci, ""),
    ] {
        let p = push(&registry, &cri.dir, name, format, None, false);
        let pulled = cri.pull_image_for(&p.reference, None);
        let info = if puller == Puller::V16 {
            let err = pulled.unwrap_err();
            assert_eq!(err.code, Some(Code::Unknown), "{name}: {err}");
            assert_eq!(
                err.message,
                format!(
                    "failed to pull and unpack image \"{}\": failed to unpack image on \
                     snapshotter overlayfs: mismatched image rootfs and manifest layers",
                    p.reference
                ),
                "{name}"
            );
            // Yet the image record was created before the unpack failed, and the CRI's
            // image store (fed by containerd's events) lists it, without a repo digest: a
            // kubelet with imagePullPolicy IfNotPresent takes it as present on its next try.
            let (img, info) = status_when_present(cri, &p.reference);
            assert_eq!(img.id, p.config, "{img:?}");
            assert_eq!(img.repo_tags, std::slice::from_ref(&p.reference), "{img:?}");
            assert!(img.repo_digests.is_empty(), "{img:?}");
            assert_eq!(img.size, p.size, "{img:?}");
            info
        } else {
            assert_listed(cri, &p, &pulled.unwrap())
        };
        assert_eq!(info["chainID"], "", "{name}: {info}");
        assert_eq!(info["imageSpec"]["os"], os, "{name}: {info}");
        // The module is in the content store, as its own blob.
        assert!(content(cri).contains(&p.layer), "{name}");
        assert_eq!(
            p.layer,
            kiln_image::digest(&module(name)),
            "{name}: the Wasm layer is the module"
        );

        // CreateContainer: the layer form's OCI config has an Entrypoint and no diff IDs,
        // so the rootfs is an empty snapshot with no parent; the artifact configs have no
        // command, which the CRI requires when the pod gives none.
        match (format, create_in_a_pod(cri, name, &p.reference)) {
            (Format::Layer, Ok(rootfs)) => {
                assert_eq!(
                    rootfs,
                    Some(("Active".to_string(), String::new())),
                    "{name}"
                )
            }
            (Format::Layer, Err(e)) => panic!("{name}: {e}"),
            (_, Err(e)) => assert!(
                e.message
                    .ends_with("spec: failed to generate spec: no command specified"),
                "{name}: {e}"
            ),
            (_, Ok(rootfs)) => panic!("{name}: created a container without a command: {rootfs:?}"),
        }
    }
}
