//! Finding the Wasm layer a container runs, from its image's index and manifest as containerd
//! holds them: for the image forms whose module is a layer of its own rather than a file in a
//! tar layer (runwasi's component layer, the CNCF Wasm artifact, wasm-to-oci).

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::ANNOTATION_TITLE;
use crate::read::WASM_LAYER_MEDIA_TYPES;

/// A layer that holds a Wasm binary as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmLayer {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its `org.opencontainers.image.title` annotation, if any.
    pub title: Option<String>,
}

/// Why no layer could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// Several Wasm layers, and `process.args[0]` names none of them.
    #[error(
        "the image has {count} Wasm layers ({titles}) and process.args[0] ({arg0:?}) names none \
         of them by its org.opencontainers.image.title"
    )]
    Ambiguous {
        /// How many.
        count: usize,
        /// Their titles, for the message.
        titles: String,
        /// What the spec asked for.
        arg0: String,
    },
}

/// The layers of `manifest` that are Wasm binaries.
pub fn wasm_layers(manifest: &ImageManifest) -> Vec<WasmLayer> {
    manifest
        .layers()
        .iter()
        .filter(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type().to_string().as_str()))
        .map(|l| WasmLayer {
            digest: l.digest().to_string(),
            media_type: l.media_type().to_string(),
            size: l.size(),
            title: l
                .annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_TITLE))
                .cloned(),
        })
        .collect()
}

/// Whether `os`/`arch` is a platform Wasm images are pushed for.
pub fn is_wasm_platform(os: &str, arch: &str) -> bool {
    arch == "wasm" && matches!(os, "wasi" | "wasip1" | "wasip2")
}

/// The manifest of `index` to run: the one for a Wasm platform, else the only one.
pub fn wasm_manifest(index: &ImageIndex) -> Option<&Descriptor> {
    let manifests = index.manifests();
    manifests
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                is_wasm_platform(&p.os().to_string(), &p.architecture().to_string())
            })
        })
        .or_else(|| (manifests.len() == 1).then(|| &manifests[0]))
}

/// The layer the container runs: the only Wasm layer, or the one whose title is the file name
/// of `arg0` (`process.args[0]`, e.g. `/hello.wasm` or `hello.wasm`). `Ok(None)`: the image
/// has no Wasm layer (its module, if any, is a file in its rootfs).
pub fn select_layer(layers: &[WasmLayer], arg0: &str) -> Result<Option<WasmLayer>, SelectError> {
    match layers {
        [] => Ok(None),
        [only] => Ok(Some(only.clone())),
        many => {
            let name = arg0.rsplit('/').next().unwrap_or(arg0);
            let chosen = many
                .iter()
                .find(|l| l.title.as_deref().is_some_and(|t| t == name || t == arg0));
            match chosen {
                Some(l) => Ok(Some(l.clone())),
                None => Err(SelectError::Ambiguous {
                    count: many.len(),
                    titles: many
                        .iter()
                        .map(|l| l.title.as_deref().unwrap_or("untitled"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    arg0: arg0.to_string(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(title: Option<&str>) -> WasmLayer {
        WasmLayer {
            digest: format!("sha256:{}", "b".repeat(64)),
            media_type: "application/wasm".into(),
            size: 10,
            title: title.map(str::to_string),
        }
    }

    #[test]
    fn one_layer_is_chosen_whatever_args0_says() {
        let l = [layer(None)];
        assert_eq!(select_layer(&l, "/whatever.wasm"), Ok(Some(layer(None))));
        assert_eq!(select_layer(&[], "/x.wasm"), Ok(None));
    }

    #[test]
    fn of_several_layers_args0_picks_one_by_title_or_it_is_an_error() {
        let l = [layer(Some("a.wasm")), layer(Some("b.wasm"))];
        assert_eq!(
            select_layer(&l, "/b.wasm").unwrap(),
            Some(layer(Some("b.wasm")))
        );
        assert_eq!(
            select_layer(&l, "a.wasm").unwrap(),
            Some(layer(Some("a.wasm")))
        );
        let e = select_layer(&l, "/c.wasm").unwrap_err();
        assert!(e.to_string().contains("a.wasm, b.wasm"), "{e}");
    }

    #[test]
    fn wasm_layers_are_found_by_media_type() {
        let manifest: ImageManifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                       "digest": format!("sha256:{}", "c".repeat(64)), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                 "digest": format!("sha256:{}", "d".repeat(64)), "size": 5},
                {"mediaType": "application/wasm",
                 "digest": format!("sha256:{}", "e".repeat(64)), "size": 7,
                 "annotations": {"org.opencontainers.image.title": "app.wasm"}}
            ]
        }))
        .expect("manifest");
        let found = wasm_layers(&manifest);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].title.as_deref(), Some("app.wasm"));
        assert_eq!(found[0].size, 7);
    }
}
