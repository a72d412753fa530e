//! Reading an image-layout tarball back: what `kiln image convert` starts from, and what the
//! tests use to look inside the images they write.
//!
//! Only what converting needs is understood: the index's manifest (one level of nested index,
//! choosing the `wasm` platform), the config, and the layers. The Wasm module is found from
//! the form: the one Wasm layer (several: the one whose title names the entrypoint), or, for
//! tar layers, the entrypoint's file, later layers overriding earlier ones.

use std::collections::HashMap;
use std::io::Read;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use crate::Error;
use crate::layout::{
    MEDIA_TYPE_WASM_ARTIFACT_CONFIG, MEDIA_TYPE_WASM_ARTIFACT_LAYER,
    MEDIA_TYPE_WASM_COMPONENT_LAYER, MEDIA_TYPE_WASM_TO_OCI_LAYER, WasmArtifactConfig, digest,
    digest_hex, relative_components,
};
use crate::{ANNOTATION_CONTAINERD_NAME, ANNOTATION_TITLE};

/// The layer media types that hold a Wasm binary as it is.
pub const WASM_LAYER_MEDIA_TYPES: &[&str] = &[
    MEDIA_TYPE_WASM_COMPONENT_LAYER,
    MEDIA_TYPE_WASM_ARTIFACT_LAYER,
    MEDIA_TYPE_WASM_TO_OCI_LAYER,
];

/// An image read from an image-layout tarball.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// The `io.containerd.image.name` annotation of the manifest's descriptor, if any.
    pub reference: Option<String>,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config blob.
    pub config: Vec<u8>,
    /// The layer blobs, in manifest order.
    pub layers: Vec<Vec<u8>>,
}

/// A Wasm module found in an image, with what a rebuilt image needs to run it the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModule {
    /// The module's bytes.
    pub data: Vec<u8>,
    /// Its absolute path in the image (the entrypoint's, or `/<title>`).
    pub path: Option<String>,
    /// The OCI config's `Cmd`.
    pub cmd: Vec<String>,
    /// The OCI config's `Env`.
    pub env: Vec<String>,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidLayout {
        reason: reason.into(),
    }
}

/// Reads an image-layout tarball.
pub fn read_layout(input: impl Read) -> Result<LoadedImage, Error> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(path, data);
    }
    let blob = |d: &str| -> Result<&Vec<u8>, Error> {
        let data = files
            .get(&format!("blobs/sha256/{}", digest_hex(d)))
            .ok_or_else(|| invalid(format!("blob {d} is missing")))?;
        if digest(data) != d {
            return Err(invalid(format!("blob {d} does not match its digest")));
        }
        Ok(data)
    };
    let index: ImageIndex = serde_json::from_slice(
        files
            .get("index.json")
            .ok_or_else(|| invalid("no index.json (not an OCI image layout)"))?,
    )?;
    let mut desc = index
        .manifests()
        .first()
        .ok_or_else(|| invalid("index.json lists no manifest"))?
        .clone();
    let reference = desc
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CONTAINERD_NAME).cloned());
    if *desc.media_type() == MediaType::ImageIndex {
        let nested: ImageIndex = serde_json::from_slice(blob(desc.digest().as_ref())?)?;
        desc = nested
            .manifests()
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| p.architecture().to_string() == "wasm")
            })
            .or_else(|| nested.manifests().first())
            .ok_or_else(|| invalid("the nested index lists no manifest"))?
            .clone();
    }
    let manifest: ImageManifest = serde_json::from_slice(blob(desc.digest().as_ref())?)?;
    let config = blob(manifest.config().digest().as_ref())?.clone();
    let layers = manifest
        .layers()
        .iter()
        .map(|l| blob(l.digest().as_ref()).cloned())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoadedImage {
        reference,
        manifest,
        config,
        layers,
    })
}

impl LoadedImage {
    /// The OCI image config, when the config is one.
    pub fn oci_config(&self) -> Result<Option<ImageConfiguration>, Error> {
        match self.manifest.config().media_type() {
            MediaType::ImageConfig => Ok(Some(serde_json::from_slice(&self.config)?)),
            _ => Ok(None),
        }
    }

    /// The Wasm artifact config, when the config is one.
    pub fn wasm_config(&self) -> Result<Option<WasmArtifactConfig>, Error> {
        match self.manifest.config().media_type() {
            MediaType::Other(t) if t == MEDIA_TYPE_WASM_ARTIFACT_CONFIG => {
                Ok(Some(serde_json::from_slice(&self.config)?))
            }
            _ => Ok(None),
        }
    }

    /// Finds the Wasm module: the Wasm layer (the one whose title is the entrypoint's file
    /// name, when there are several), else the entrypoint's file in the tar layers.
    pub fn find_module(&self) -> Result<FoundModule, Error> {
        let oci = self.oci_config()?;
        let exec = oci.as_ref().and_then(|c| c.config().clone());
        let entrypoint = exec
            .as_ref()
            .and_then(|c| c.entrypoint().clone())
            .and_then(|e| e.first().cloned())
            .or_else(|| {
                exec.as_ref()
                    .and_then(|c| c.cmd().clone())
                    .and_then(|c| c.first().cloned())
            })
            // `path#func` names an export to call; the file is `path`.
            .map(|e| e.split_once('#').map_or(e.clone(), |(p, _)| p.to_string()));
        let cmd = exec
            .as_ref()
            .and_then(|c| {
                // With no Entrypoint, Cmd's first element was the module.
                if c.entrypoint().as_ref().is_some_and(|e| !e.is_empty()) {
                    c.cmd().clone()
                } else {
                    c.cmd().clone().map(|c| c.into_iter().skip(1).collect())
                }
            })
            .unwrap_or_default();
        let env = exec
            .as_ref()
            .and_then(|c| c.env().clone())
            .unwrap_or_default();

        let wasm_layers: Vec<(usize, Option<&str>)> = self
            .manifest
            .layers()
            .iter()
            .enumerate()
            .filter(|(_, l)| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type().as_ref()))
            .map(|(i, l)| {
                let title = l
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_TITLE).map(String::as_str));
                (i, title)
            })
            .collect();
        let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
        if !wasm_layers.is_empty() {
            let chosen = match wasm_layers.as_slice() {
                [one] => *one,
                many => {
                    let want = entrypoint.as_deref().map(file_name).ok_or_else(|| {
                        invalid("several Wasm layers and no entrypoint to choose one")
                    })?;
                    *many
                        .iter()
                        .find(|(_, t)| t.map(file_name).as_deref() == Some(want.as_str()))
                        .ok_or_else(|| {
                            invalid(format!("several Wasm layers and none is titled {want}"))
                        })?
                }
            };
            let path = entrypoint
                .clone()
                .or_else(|| chosen.1.map(|t| format!("/{}", file_name(t))))
                .map(|p| {
                    if p.starts_with('/') {
                        p
                    } else {
                        format!("/{p}")
                    }
                });
            return Ok(FoundModule {
                data: self.layers[chosen.0].clone(),
                path,
                cmd,
                env,
            });
        }

        let entrypoint = entrypoint
            .ok_or_else(|| invalid("no Wasm layer and no entrypoint in the image config"))?;
        let want = relative_components(&entrypoint)
            .map_err(|r| invalid(format!("entrypoint {entrypoint:?}: {r}")))?
            .join("/");
        let mut found = None;
        for (desc, data) in self.manifest.layers().iter().zip(&self.layers) {
            if *desc.media_type() != MediaType::ImageLayer {
                return Err(invalid(format!(
                    "layer media type {} is not supported (uncompressed tar or a Wasm layer)",
                    desc.media_type()
                )));
            }
            let mut archive = tar::Archive::new(&data[..]);
            for entry in archive.entries()? {
                let mut entry = entry?;
                let path = entry.path()?.to_string_lossy().into_owned();
                let path = path.trim_start_matches("./").trim_start_matches('/');
                if path.trim_end_matches('/') != want {
                    continue;
                }
                if entry.header().entry_type() != tar::EntryType::Regular {
                    return Err(invalid(format!(
                        "the entrypoint {entrypoint} is not a regular file in the layer"
                    )));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                found = Some(bytes);
            }
        }
        let data = found.ok_or_else(|| {
            invalid(format!(
                "the entrypoint {entrypoint} is in none of the layers"
            ))
        })?;
        Ok(FoundModule {
            data,
            path: Some(format!("/{want}")),
            cmd,
            env,
        })
    }
}
