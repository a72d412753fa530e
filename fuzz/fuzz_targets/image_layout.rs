//! `kiln_image::read_layout` on arbitrary tar bytes, then what `kiln image convert` asks of the
//! image it read (`find_module`, `oci_config`, `wasm_config`), and `kiln_image::detect` on the
//! same bytes. The seeds are tarballs written by `kiln image build` in every form.
//!
//! Besides never panicking: what `read_layout` returns matches its manifest (one blob per
//! layer, each with the digest the manifest names, the config's too); a config is an OCI
//! config or a Wasm artifact config, never both; a module found is a Wasm binary (every seed
//! image holds exactly one, next to blobs that are not: configs, manifests, tar layers with
//! other files); `detect` agrees with the binary formats' preambles.

#![no_main]

use kiln_image::{WasmKind, detect, digest, read_layout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let expected = match data.get(..8) {
        Some(b"\0asm\x01\0\0\0") => Some(WasmKind::Module),
        Some(b"\0asm\x0d\0\x01\0") => Some(WasmKind::Component),
        _ => None,
    };
    assert_eq!(
        detect(data).ok(),
        expected,
        "detect disagrees with the preamble"
    );

    let Ok(img) = read_layout(data) else {
        return;
    };
    assert_eq!(
        img.layers.len(),
        img.manifest.layers().len(),
        "one blob per layer"
    );
    for (desc, blob) in img.manifest.layers().iter().zip(&img.layers) {
        assert_eq!(
            digest(blob),
            desc.digest().to_string(),
            "a layer blob of another digest"
        );
    }
    assert_eq!(
        digest(&img.config),
        img.manifest.config().digest().to_string(),
        "a config blob of another digest"
    );
    let oci = img.oci_config();
    let wasm = img.wasm_config();
    assert!(
        !matches!((&oci, &wasm), (Ok(Some(_)), Ok(Some(_)))),
        "a config that is both an OCI config and a Wasm artifact config"
    );
    if let Ok(found) = img.find_module() {
        assert!(
            found.data.starts_with(b"\0asm"),
            "the module found is not Wasm"
        );
        if let Some(p) = &found.path {
            assert!(p.starts_with('/'), "module path {p:?} is relative");
        }
    }
});
