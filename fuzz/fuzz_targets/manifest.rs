//! The OCI documents of an image as a runtime reads them from containerd's content store (the
//! index, a manifest, its config, its layer blobs), without the digests that a layout tarball
//! checks, so that every shape of manifest reaches Kiln's choice of the Wasm layer
//! (`LoadedImage::find_module`) and its media-type rules (`WASM_LAYER_MEDIA_TYPES`).
//!
//! The input is the documents one after another, split at `\0--\0`: index, manifest,
//! config, then the layers (missing layers are empty, extra ones are dropped). The seeds are
//! the documents of images written by `kiln image build` in every form.
//!
//! Besides never panicking: each document that parses reads back the same after being written
//! (Kiln writes layouts with these types and reads them back); a media type reads back as the
//! same one; a config is at most one of an OCI config and a Wasm artifact config; a module
//! found in a Wasm layer is that layer's blob, and one found in tar layers is a regular file
//! named by the entrypoint at an absolute, plain path.

#![no_main]

use kiln_image::{LoadedImage, MediaType, WASM_LAYER_MEDIA_TYPES, WasmArtifactConfig};
use libfuzzer_sys::fuzz_target;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Serialize;
use serde::de::DeserializeOwned;

const SEPARATOR: &[u8] = b"\0--\0";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// Parses `bytes` as a `T` and checks that writing and reading it again changes nothing.
fn parse<T>(bytes: &[u8], what: &str) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let v: T = serde_json::from_slice(bytes).ok()?;
    let written = serde_json::to_vec(&v).unwrap_or_else(|e| panic!("{what}: cannot write: {e}"));
    let back: T = serde_json::from_slice(&written)
        .unwrap_or_else(|e| panic!("{what}: cannot read what was written: {e}"));
    assert_eq!(back, v, "{what} changed on the way through JSON");
    Some(v)
}

fn media_type_round_trips(mt: &MediaType) {
    let s = mt.to_string();
    assert_eq!(&MediaType::from(s.as_str()), mt, "media type {s:?}");
}

fuzz_target!(|data: &[u8]| {
    let parts = split(data);
    let part = |i: usize| parts.get(i).copied().unwrap_or(b"");

    if let Some(index) = parse::<ImageIndex>(part(0), "index") {
        for d in index.manifests() {
            media_type_round_trips(d.media_type());
        }
    }
    let config = part(2);
    let _ = parse::<ImageConfiguration>(config, "image config");
    let _ = parse::<WasmArtifactConfig>(config, "Wasm artifact config");
    let Some(manifest) = parse::<ImageManifest>(part(1), "manifest") else {
        return;
    };
    media_type_round_trips(manifest.config().media_type());
    for l in manifest.layers() {
        media_type_round_trips(l.media_type());
    }

    let layers: Vec<Vec<u8>> = (0..manifest.layers().len())
        .map(|i| part(3 + i).to_vec())
        .collect();
    let img = LoadedImage {
        reference: None,
        manifest,
        config: config.to_vec(),
        layers,
    };
    let oci = img.oci_config();
    let wasm = img.wasm_config();
    assert!(
        !matches!((&oci, &wasm), (Ok(Some(_)), Ok(Some(_)))),
        "a config that is both an OCI config and a Wasm artifact config"
    );
    let Ok(found) = img.find_module() else {
        return;
    };
    let wasm_layers: Vec<&Vec<u8>> = img
        .manifest
        .layers()
        .iter()
        .zip(&img.layers)
        .filter(|(d, _)| WASM_LAYER_MEDIA_TYPES.contains(&d.media_type().as_ref()))
        .map(|(_, blob)| blob)
        .collect();
    if wasm_layers.is_empty() {
        let path = found
            .path
            .as_deref()
            .expect("a module from a tar layer has a path");
        assert!(path.starts_with('/'), "module path {path:?} is relative");
        assert!(
            path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "module path {path:?} is not a plain path"
        );
        assert!(
            img.manifest
                .layers()
                .iter()
                .all(|d| *d.media_type() == MediaType::ImageLayer),
            "a module found among layers that are not all tar"
        );
    } else {
        assert!(
            wasm_layers.contains(&&found.data),
            "the module found is none of the Wasm layers"
        );
    }
});
