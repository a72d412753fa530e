//! Packs a WebAssembly module (or component) into an OCI image-layout tarball, in each of the
//! forms Wasm images are pushed in.
//!
//! Kiln runs Wasm modules that containerd pulls or imports like any other container image, so
//! a module has to be wrapped in an image before Kiln can run it. Pushing through a registry
//! is not always possible (tests, air-gapped machines), so this crate writes a self-contained
//! tarball that `ctr images import` accepts directly, and that `skopeo copy oci-archive:`
//! pushes to a registry.
//!
//! There is one writer, [`Image::write`] (module `layout`): the CLI's `kiln image build` and the
//! end-to-end tests' hand-made images (broken modules, device nodes, several Wasm layers) go
//! through it, so what the tests import is what users build.
//!
//! # Forms ([`Format`])
//!
//! * **compat**: an OCI image config with `Entrypoint`, one uncompressed tar layer holding the
//!   module. Every containerd unpacks it into a rootfs; this is the form Kiln runs.
//! * **layer**: runwasi's oci-tar-builder form: an OCI image config with `Entrypoint`, the
//!   module as a layer of media type
//!   `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm` (runwasi uses it for
//!   modules and components alike), an empty `rootfs.diff_ids` and runwasi's
//!   `containerd.runwasi.layers` label.
//! * **artifact**: the CNCF TAG-Runtime Wasm OCI artifact (`wkg oci push`): config
//!   `application/vnd.wasm.config.v0+json` (`created`, `author`, `architecture` `wasm`, `os`
//!   `wasip1`/`wasip2`, `layerDigests`, `component` for components), one `application/wasm`
//!   layer.
//! * **wasm-to-oci**: wasm-to-oci's form: config `application/vnd.wasm.config.v1+json` holding
//!   `{}`, one `application/vnd.wasm.content.layer.v1+wasm` layer titled with the file name.
//!
//! [`convert`] turns an image of one form into another (e.g. an artifact into the compat form,
//! which `ctr run` accepts).
//!
//! # Layout of the tarball
//!
//! ```text
//! oci-layout                    {"imageLayoutVersion":"1.0.0"}
//! index.json                    image index naming the one manifest
//! manifest.json                 Docker "save" manifest (plain OCI images only), for `docker load`
//! blobs/sha256/<layer>...       the layers
//! blobs/sha256/<config>         the config
//! blobs/sha256/<manifest>       the image manifest
//! ```
//!
//! Design choices, and why:
//!
//! * **Uncompressed tar layers**: Wasm modules are small, and skipping gzip keeps the diff ID
//!   equal to the layer digest and the output independent of a compressor's version.
//! * **Reproducible output**: every tar entry has a fixed mtime and owner root, configs have a
//!   fixed (or no) `created` time, and JSON maps are written sorted. The same inputs always
//!   give the same digests, which keeps content stores and caches warm across rebuilds.
//! * **Platform `wasi/wasm` by default for the compat form**: the platform the containerd Wasm
//!   shims agree on; a host-platform containerd only unpacks it when asked (`ctr images import
//!   --all-platforms` or `--platform wasi/wasm`), so a Wasm image is never mistaken for a native
//!   one. The layer and artifact forms default to `wasip1/wasm` (modules) or `wasip2/wasm`
//!   (components), as runwasi and the artifact spec write them.
//! * **`io.containerd.image.name` annotation**: `ctr images import` names the imported image
//!   from it, so the image appears under its full normalised reference.
//!
//! # Example
//!
//! ```no_run
//! let opts = kiln_image::BuildOptions::new("hello.wasm", "hello:latest");
//! let out = std::fs::File::create("hello.tar")?;
//! let summary = kiln_image::build(&opts, out)?;
//! println!("{} {}", summary.reference, summary.manifest_digest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod layout;
mod read;
mod reference;
mod select;
mod wasm;

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub use layout::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, ANNOTATION_TITLE, Entry, ExecConfig,
    FIXED_CREATED, FIXED_MTIME, Image, ImageConfig, LABEL_RUNWASI_LAYERS, Layer,
    MEDIA_TYPE_WASM_ARTIFACT_CONFIG, MEDIA_TYPE_WASM_ARTIFACT_LAYER,
    MEDIA_TYPE_WASM_COMPONENT_LAYER, MEDIA_TYPE_WASM_TO_OCI_CONFIG, MEDIA_TYPE_WASM_TO_OCI_LAYER,
    WasmArtifactConfig, Written, digest,
};
pub use oci_spec::image::MediaType;
pub use read::{FoundModule, LoadedImage, WASM_LAYER_MEDIA_TYPES, read_layout};
pub use reference::{Platform, Reference};
pub use select::{
    SelectError, WasmLayer, is_wasm_platform, select_layer, wasm_layers, wasm_manifest,
};
pub use wasm::{ComponentInfo, NotWasm, WASM_MAGIC, WasmKind, component_info, detect};

/// Media type of the image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the image manifest blob.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the OCI image config blob.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed tar layer.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Platform of the compat form when none is given.
pub const DEFAULT_PLATFORM: &str = "wasi/wasm";

/// Errors returned while building, reading or converting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The module file could not be read.
    #[error("cannot read module {path}: {source}")]
    ReadModule {
        /// The module path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The module is not a Wasm core module or component.
    #[error("{path} is not a WebAssembly module or component: {reason}")]
    NotWasm {
        /// The module path (or name, for in-memory modules).
        path: PathBuf,
        /// What its first bytes are instead.
        reason: String,
    },
    /// A component's import and export sections could not be read.
    #[error("{path}: cannot read the component's imports and exports: {reason}")]
    BadComponent {
        /// The module path (or name).
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The image reference is not a valid `[domain/]name[:tag]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The platform is not a valid `os/arch[/variant]`.
    #[error("invalid platform {platform:?}: {reason} (expected os/arch, e.g. wasi/wasm)")]
    InvalidPlatform {
        /// The platform as given.
        platform: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path inside the image is unusable.
    #[error("invalid path in image {path:?}: {reason}")]
    InvalidPathInImage {
        /// The path as given (or derived from the module file name).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An environment entry is not of the form `KEY=VALUE`.
    #[error("invalid environment entry {entry:?}: expected KEY=VALUE")]
    InvalidEnv {
        /// The entry as given.
        entry: String,
    },
    /// The options ask for something the form has no place for.
    #[error("the {format} form {reason}")]
    Unsupported {
        /// The form.
        format: Format,
        /// What it cannot hold.
        reason: String,
    },
    /// An input tarball is not an image layout this crate can read.
    #[error("cannot read the image layout: {reason}")]
    InvalidLayout {
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a tarball failed.
    #[error("image tarball: {0}")]
    Io(#[from] io::Error),
    /// A JSON document could not be written or read.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// oci-spec refused a document (a digest, a missing required field).
    #[error("OCI document: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
}

/// The forms an image can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Tar layer holding the module, OCI config with `Entrypoint` (what Kiln runs).
    #[default]
    Compat,
    /// runwasi's form: OCI config with `Entrypoint`, the module as a
    /// `…wasm.component.layer.v0+wasm` layer.
    Layer,
    /// The CNCF Wasm OCI artifact: `application/vnd.wasm.config.v0+json` config,
    /// `application/wasm` layer.
    Artifact,
    /// wasm-to-oci's form: `application/vnd.wasm.config.v1+json` config (`{}`),
    /// `application/vnd.wasm.content.layer.v1+wasm` layer.
    WasmToOci,
}

impl Format {
    /// Every form, in the order `--format` lists them.
    pub const ALL: [Format; 4] = [
        Format::Compat,
        Format::Layer,
        Format::Artifact,
        Format::WasmToOci,
    ];

    /// The name `--format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Compat => "compat",
            Format::Layer => "layer",
            Format::Artifact => "artifact",
            Format::WasmToOci => "wasm-to-oci",
        }
    }

    /// The platform used when none is given.
    pub fn default_platform(self, kind: WasmKind) -> Platform {
        let os = match self {
            Format::Compat | Format::WasmToOci => "wasi",
            Format::Layer | Format::Artifact => kind.artifact_os(),
        };
        Platform {
            os: os.to_string(),
            architecture: "wasm".to_string(),
            variant: None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
                format!("unknown format {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Where the Wasm module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Read the module from this file.
    Path(PathBuf),
    /// Use these bytes; `name` stands in for a file name (default path in the image and error
    /// messages).
    Bytes {
        /// File name used for the default path in the image, e.g. `app.wasm`.
        name: String,
        /// The module's bytes.
        data: Vec<u8>,
    },
}

impl ModuleSource {
    /// The path (or name) shown in error messages.
    fn display_path(&self) -> PathBuf {
        match self {
            ModuleSource::Path(p) => p.clone(),
            ModuleSource::Bytes { name, .. } => PathBuf::from(name),
        }
    }

    /// The file name used for the default path in the image.
    fn file_name(&self) -> Option<String> {
        match self {
            ModuleSource::Path(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            ModuleSource::Bytes { name, .. } => Path::new(name)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
        }
    }

    /// Loads the module's bytes.
    fn load(&self) -> Result<Vec<u8>, Error> {
        match self {
            ModuleSource::Path(p) => std::fs::read(p).map_err(|source| Error::ReadModule {
                path: p.clone(),
                source,
            }),
            ModuleSource::Bytes { data, .. } => Ok(data.clone()),
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The Wasm module or component to pack.
    pub module: ModuleSource,
    /// Absolute path of the module inside the image; default `/<file name of the module>`.
    pub path_in_image: Option<String>,
    /// Image reference, e.g. `hello:latest`; normalised like Docker does.
    pub reference: String,
    /// Platform as `os/arch[/variant]`; default [`Format::default_platform`].
    pub platform: Option<String>,
    /// Extra arguments, stored as the config's `Cmd` (OCI configs only).
    pub args: Vec<String>,
    /// Environment entries (`KEY=VALUE`), stored as the config's `Env` (OCI configs only).
    pub env: Vec<String>,
    /// The form to write.
    pub format: Format,
    /// More entries for the image's filesystem (compat: in the module's layer; layer: in a tar
    /// layer before the Wasm layer). The artifact forms have no place for them.
    pub files: Vec<Entry>,
}

impl BuildOptions {
    /// Options for packing the module file at `module` as `reference` in the compat form, with
    /// the default platform, path, no extra arguments and no environment.
    pub fn new(module: impl Into<PathBuf>, reference: impl Into<String>) -> Self {
        BuildOptions {
            module: ModuleSource::Path(module.into()),
            path_in_image: None,
            reference: reference.into(),
            platform: None,
            args: Vec::new(),
            env: Vec::new(),
            format: Format::Compat,
            files: Vec::new(),
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// The fully normalised reference, e.g. `docker.io/library/hello:latest`.
    pub reference: String,
    /// Digest of the manifest (`sha256:<hex>`), i.e. the image's identity.
    pub manifest_digest: String,
    /// Digest of the config blob (`sha256:<hex>`).
    pub config_digest: String,
    /// Digests of the layers, in manifest order.
    pub layer_digests: Vec<String>,
    /// Digest of the module's bytes (`sha256:<hex>`).
    pub module_digest: String,
    /// Absolute path of the module inside the image.
    pub path_in_image: String,
    /// The platform the image was built for.
    pub platform: Platform,
    /// The form written.
    pub format: Format,
    /// Module or component.
    pub kind: WasmKind,
}

/// Builds the [`Image`] that `opts` describe, without writing it: checks the options, reads the
/// module and tells a module from a component.
pub fn image(opts: &BuildOptions) -> Result<(Image, ImageSummary), Error> {
    // Validate everything before reading the module.
    let reference = Reference::parse(&opts.reference)?;
    let explicit_platform = opts.platform.as_deref().map(Platform::parse).transpose()?;
    for entry in &opts.env {
        match entry.split_once('=') {
            Some((key, _)) if !key.is_empty() => {}
            _ => {
                return Err(Error::InvalidEnv {
                    entry: entry.clone(),
                });
            }
        }
    }
    let path_in_image = match &opts.path_in_image {
        Some(p) => p.clone(),
        None => {
            let name = opts
                .module
                .file_name()
                .ok_or_else(|| Error::InvalidPathInImage {
                    path: opts.module.display_path().display().to_string(),
                    reason: "module has no file name; give a path in the image".to_string(),
                })?;
            format!("/{name}")
        }
    };
    let path_err = |reason: String| Error::InvalidPathInImage {
        path: path_in_image.clone(),
        reason,
    };
    if !path_in_image.starts_with('/') {
        return Err(path_err("must be absolute (start with '/')".into()));
    }
    let rel = layout::relative_components(&path_in_image)
        .map_err(path_err)?
        .join("/");
    let unsupported = |reason: &str| Error::Unsupported {
        format: opts.format,
        reason: reason.to_string(),
    };
    match opts.format {
        Format::Artifact | Format::WasmToOci => {
            if !opts.args.is_empty() || !opts.env.is_empty() {
                return Err(unsupported(
                    "has no image config for arguments or environment",
                ));
            }
            if !opts.files.is_empty() {
                return Err(unsupported("holds one Wasm layer and no other files"));
            }
        }
        Format::Compat | Format::Layer => {}
    }

    let module = opts.module.load()?;
    let kind = detect(&module).map_err(|e| Error::NotWasm {
        path: opts.module.display_path(),
        reason: match e {
            NotWasm::NoMagic => "no \\0asm magic".to_string(),
            NotWasm::Truncated => "truncated after the \\0asm magic".to_string(),
            NotWasm::UnknownVersion(v) => format!(
                "unknown version/layer bytes {} (core module: 01 00 00 00, component: 0d 00 01 00)",
                hex::encode(v)
            ),
        },
    })?;
    let platform = explicit_platform.unwrap_or_else(|| opts.format.default_platform(kind));
    let module_digest = digest(&module);
    let exec = ExecConfig {
        entrypoint: vec![path_in_image.clone()],
        cmd: opts.args.clone(),
        env: opts.env.clone(),
        ..ExecConfig::default()
    };
    let file_name = rel.rsplit('/').next().unwrap_or(&rel).to_string();
    let (config, layers) = match opts.format {
        Format::Compat => {
            let mut entries = vec![Entry::file(&path_in_image, 0o755, module)];
            entries.extend(opts.files.iter().cloned());
            (ImageConfig::Oci(exec), vec![Layer::tar(&entries)?])
        }
        Format::Layer => {
            let mut layers = Vec::new();
            if !opts.files.is_empty() {
                layers.push(Layer::tar(&opts.files)?);
            }
            // The title is the module's path relative to the root, so that a shim that reads
            // layers from the content store can tell which one the entrypoint names.
            layers.push(Layer::blob(MEDIA_TYPE_WASM_COMPONENT_LAYER, module).with_title(&rel));
            (ImageConfig::Oci(exec), layers)
        }
        Format::Artifact => {
            let component = match kind {
                WasmKind::Component => {
                    Some(
                        component_info(&module).map_err(|reason| Error::BadComponent {
                            path: opts.module.display_path(),
                            reason,
                        })?,
                    )
                }
                WasmKind::Module => None,
            };
            (
                ImageConfig::Wasm {
                    created: FIXED_CREATED.to_string(),
                    author: None,
                    component,
                },
                vec![Layer::blob(MEDIA_TYPE_WASM_ARTIFACT_LAYER, module)],
            )
        }
        Format::WasmToOci => (
            ImageConfig::Raw {
                media_type: MediaType::from(MEDIA_TYPE_WASM_TO_OCI_CONFIG),
                data: b"{}".to_vec(),
            },
            vec![Layer::blob(MEDIA_TYPE_WASM_TO_OCI_LAYER, module).with_title(&file_name)],
        ),
    };
    let img = Image {
        reference,
        platform: platform.clone(),
        config,
        layers,
    };
    let summary = ImageSummary {
        reference: img.reference.full(),
        manifest_digest: String::new(),
        config_digest: String::new(),
        layer_digests: img.layers.iter().map(Layer::digest).collect(),
        module_digest,
        path_in_image,
        platform,
        format: opts.format,
        kind,
    };
    Ok((img, summary))
}

/// Builds the image described by `opts` and writes it to `out` as an OCI image-layout tarball.
/// Nothing is written when the options or the module are refused.
///
/// The output depends only on the options and the module's bytes, so building twice gives
/// byte-identical tarballs and the same digests.
pub fn build(opts: &BuildOptions, out: impl Write) -> Result<ImageSummary, Error> {
    let (img, mut summary) = image(opts)?;
    let written = img.write(out)?;
    summary.manifest_digest = written.manifest_digest;
    summary.config_digest = written.config_digest;
    Ok(summary)
}

/// How to convert an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConvertOptions {
    /// The form to write.
    pub format: Format,
    /// The new image's reference; default the input's `io.containerd.image.name`.
    pub reference: Option<String>,
    /// The new image's platform; default the form's for the module's kind.
    pub platform: Option<String>,
    /// The module's path in the new image; default the entrypoint's (or `/<layer title>`,
    /// else `/<last component of the repository>.wasm`).
    pub path_in_image: Option<String>,
}

/// Reads an image-layout tarball of any form, finds its Wasm module, and writes it again in
/// `opts.format`, keeping the module's path, `Cmd` and `Env` where the new form has room for
/// them. Other files of a compat image are not carried over.
pub fn convert(
    input: impl Read,
    opts: &ConvertOptions,
    out: impl Write,
) -> Result<ImageSummary, Error> {
    let loaded = read_layout(input)?;
    let found = loaded.find_module()?;
    let reference = opts
        .reference
        .clone()
        .or_else(|| loaded.reference.clone())
        .ok_or_else(|| Error::InvalidLayout {
            reason: "the input names no image (no io.containerd.image.name annotation); give a reference".into(),
        })?;
    let parsed = Reference::parse(&reference)?;
    let repo_name = parsed.path.rsplit('/').next().unwrap_or(&parsed.path);
    let path_in_image = opts
        .path_in_image
        .clone()
        .or(found.path)
        .unwrap_or_else(|| format!("/{repo_name}.wasm"));
    let (args, env) = match opts.format {
        Format::Compat | Format::Layer => (found.cmd, found.env),
        Format::Artifact | Format::WasmToOci => (Vec::new(), Vec::new()),
    };
    let name = path_in_image
        .rsplit('/')
        .next()
        .unwrap_or(&path_in_image)
        .to_string();
    build(
        &BuildOptions {
            module: ModuleSource::Bytes {
                name,
                data: found.data,
            },
            path_in_image: Some(path_in_image),
            reference,
            platform: opts.platform.clone(),
            args,
            env,
            format: opts.format,
            files: Vec::new(),
        },
        out,
    )
}

#[cfg(test)]
mod tests;
