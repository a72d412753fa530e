//! The one OCI image-layout writer: an [`Image`] (reference, platform, config, layers) becomes
//! an image-layout tarball that `ctr images import` reads, and `skopeo copy oci-archive:`
//! pushes to a registry.
//!
//! The documents are oci-spec's types (`ImageManifest`, `ImageIndex`, `ImageConfiguration`,
//! `Descriptor`), so field names and required fields follow the spec rather than hand-written
//! JSON. oci-spec keeps annotations and labels in `HashMap`s, whose order changes from run to
//! run; every document therefore goes through a `serde_json::Value` (a sorted map) before it is
//! written, which makes the bytes, and so every digest, depend on the content alone. Tar entries
//! get a fixed mtime and owner, so the same [`Image`] always gives the same tarball.
//!
//! The writer does not judge content: a layer may hold anything (the tests need a shell script
//! as a "Wasm" layer and truncated modules). Checking that a module is Wasm is
//! [`crate::build`]'s job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest as OciDigest, HistoryBuilder,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os,
    PlatformBuilder, RootFsBuilder,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wasm::ComponentInfo;
use crate::{Error, Platform, Reference};

/// Media type of runwasi's Wasm layers (oci-tar-builder, `containerd-shim-wasm`), used there
/// for core modules and components alike.
pub const MEDIA_TYPE_WASM_COMPONENT_LAYER: &str =
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// Config media type of the CNCF TAG-Runtime Wasm OCI artifact (`wkg oci push`).
pub const MEDIA_TYPE_WASM_ARTIFACT_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of the CNCF Wasm OCI artifact.
pub const MEDIA_TYPE_WASM_ARTIFACT_LAYER: &str = "application/wasm";
/// Config media type wasm-to-oci writes (its config is `{}`).
pub const MEDIA_TYPE_WASM_TO_OCI_CONFIG: &str = "application/vnd.wasm.config.v1+json";
/// Layer media type wasm-to-oci (and Spin, for its modules) writes.
pub const MEDIA_TYPE_WASM_TO_OCI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Annotation containerd uses to name an imported image.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI annotation carrying the tag of a manifest in an image layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// OCI annotation naming a layer's file (ORAS and wasm-to-oci set it on every blob).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// Label runwasi puts in the config of an image with Wasm layers: the sha256 of the Wasm
/// layers' digests, so that images whose rootfs is empty still get distinct config digests.
pub const LABEL_RUNWASI_LAYERS: &str = "containerd.runwasi.layers";
/// Modification time (seconds since the epoch) of every tar entry, fixed so that builds are
/// reproducible.
pub const FIXED_MTIME: u64 = 0;
/// The `created` time written into Wasm artifact configs: the epoch, for reproducibility.
pub const FIXED_CREATED: &str = "1970-01-01T00:00:00Z";

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The hex part of a `sha256:<hex>` digest.
pub(crate) fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// One entry of a tar layer. Paths are absolute or relative to the image root (`/app.wasm`
/// and `app.wasm` are the same entry); missing parent directories are added (mode 0755).
/// Every entry is owned by root and has mtime [`FIXED_MTIME`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Content.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Where.
        path: String,
        /// What it points to, verbatim.
        target: String,
    },
    /// A character device node.
    CharDevice {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device node.
    BlockDevice {
        /// Where.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl Entry {
    /// A regular file.
    pub fn file(path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.to_string(),
            mode,
            data: data.into(),
        }
    }

    /// The entry's path as given.
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDevice { path, .. }
            | Entry::BlockDevice { path, .. } => path,
        }
    }
}

/// `path` relative to the image root, checked: no empty, `.` or `..` components, no NUL.
pub(crate) fn relative_components(path: &str) -> Result<Vec<&str>, String> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let comps: Vec<&str> = rest.split('/').collect();
    if path.contains('\0') {
        return Err("must not contain NUL".into());
    }
    if comps.iter().any(|c| c.is_empty()) {
        return Err("must name an entry and contain no empty components".into());
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err("must not contain '.' or '..' components".into());
    }
    Ok(comps)
}

/// A tar header with the fixed metadata every entry gets (owner root, fixed mtime).
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    // Short ASCII constants: these cannot fail.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str, mode: u32) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    tar.append_data(&mut h, format!("{path}/"), io::empty())
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut h, path, data)
}

/// A layer of an image: a blob, its media type and its descriptor's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The descriptor's media type.
    pub media_type: MediaType,
    /// The blob.
    pub data: Vec<u8>,
    /// The descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    /// An uncompressed tar layer (`application/vnd.oci.image.layer.v1.tar`) holding `entries`
    /// in the order given, each missing parent directory added before its first child.
    pub fn tar(entries: &[Entry]) -> Result<Layer, Error> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        for entry in entries {
            let comps =
                relative_components(entry.path()).map_err(|reason| Error::InvalidPathInImage {
                    path: entry.path().to_string(),
                    reason,
                })?;
            let rel = comps.join("/");
            for depth in 1..comps.len() {
                let dir = comps[..depth].join("/");
                if dirs.insert(dir.clone()) {
                    append_dir(&mut tar, &dir, 0o755)?;
                }
            }
            match entry {
                Entry::Dir { mode, .. } => {
                    if dirs.insert(rel.clone()) {
                        append_dir(&mut tar, &rel, *mode)?;
                    }
                }
                Entry::File { mode, data, .. } => append_file(&mut tar, &rel, *mode, data)?,
                Entry::Symlink { target, .. } => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    tar.append_link(&mut h, &rel, target)?;
                }
                Entry::CharDevice {
                    mode, major, minor, ..
                }
                | Entry::BlockDevice {
                    mode, major, minor, ..
                } => {
                    let kind = if matches!(entry, Entry::CharDevice { .. }) {
                        tar::EntryType::Char
                    } else {
                        tar::EntryType::Block
                    };
                    let mut h = header(kind, *mode, 0);
                    h.set_device_major(*major)?;
                    h.set_device_minor(*minor)?;
                    tar.append_data(&mut h, &rel, io::empty())?;
                }
            }
        }
        Ok(Layer {
            media_type: MediaType::ImageLayer,
            data: tar.into_inner()?,
            annotations: BTreeMap::new(),
        })
    }

    /// A layer holding `data` as it is (a Wasm binary, for the Wasm media types).
    pub fn blob(media_type: &str, data: impl Into<Vec<u8>>) -> Layer {
        Layer {
            media_type: MediaType::from(media_type),
            data: data.into(),
            annotations: BTreeMap::new(),
        }
    }

    /// The same layer with annotation `org.opencontainers.image.title` set to `title`.
    pub fn with_title(mut self, title: &str) -> Layer {
        self.annotations
            .insert(ANNOTATION_TITLE.to_string(), title.to_string());
        self
    }

    /// The `org.opencontainers.image.title` annotation, if any.
    pub fn title(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_TITLE).map(String::as_str)
    }

    /// Whether this is an uncompressed tar layer (one that containerd unpacks and that the
    /// rootfs `diff_ids` of an OCI config list).
    pub fn is_tar(&self) -> bool {
        self.media_type == MediaType::ImageLayer
    }

    /// `sha256:<hex>` of the blob.
    pub fn digest(&self) -> String {
        digest(&self.data)
    }
}

/// The execution parameters of an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecConfig {
    /// `Entrypoint` (omitted when empty).
    pub entrypoint: Vec<String>,
    /// `Cmd` (omitted when empty).
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE` entries (omitted when empty).
    pub env: Vec<String>,
    /// `User` (`uid[:gid]` or a name).
    pub user: Option<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
}

/// The config blob of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageConfig {
    /// An OCI image config (`application/vnd.oci.image.config.v1+json`): os and architecture
    /// from the image's platform, `rootfs.diff_ids` from its tar layers, and, when the image
    /// has layers that are not tar, runwasi's [`LABEL_RUNWASI_LAYERS`] label.
    Oci(ExecConfig),
    /// A CNCF Wasm artifact config (`application/vnd.wasm.config.v0+json`): architecture and
    /// os from the image's platform, `layerDigests` from its layers.
    Wasm {
        /// RFC 3339 creation time.
        created: String,
        /// Who made it.
        author: Option<String>,
        /// Required for components (os `wasip2`), absent for modules.
        component: Option<ComponentInfo>,
    },
    /// Any other config, written as given.
    Raw {
        /// The config descriptor's media type.
        media_type: MediaType,
        /// The blob.
        data: Vec<u8>,
    },
}

impl ImageConfig {
    /// The config descriptor's media type.
    pub fn media_type(&self) -> MediaType {
        match self {
            ImageConfig::Oci(_) => MediaType::ImageConfig,
            ImageConfig::Wasm { .. } => MediaType::from(MEDIA_TYPE_WASM_ARTIFACT_CONFIG),
            ImageConfig::Raw { media_type, .. } => media_type.clone(),
        }
    }
}

/// The CNCF Wasm artifact config document, field names as the spec (and `wkg`) write them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmArtifactConfig {
    /// RFC 3339 creation time.
    pub created: String,
    /// Who made it (`null` when unknown, as `wkg` writes it).
    pub author: Option<String>,
    /// Always `wasm`.
    pub architecture: String,
    /// `wasip1` for modules, `wasip2` for components.
    pub os: String,
    /// The digests of the manifest's layers, in order.
    pub layer_digests: Vec<String>,
    /// The component's imports and exports (`null` for modules).
    pub component: Option<ComponentInfo>,
}

/// An image to write: everything the layout's documents are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The image's name (the `io.containerd.image.name` annotation, the docker tag).
    pub reference: Reference,
    /// The platform of the index's manifest descriptor (and of an OCI or Wasm config).
    pub platform: Platform,
    /// The config blob.
    pub config: ImageConfig,
    /// The manifest's layers, in order.
    pub layers: Vec<Layer>,
}

/// What [`Image::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The fully normalised reference, e.g. `docker.io/library/hello:latest`.
    pub reference: String,
    /// Digest of the manifest (`sha256:<hex>`), i.e. the image's identity.
    pub manifest_digest: String,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Digests of the layers, in manifest order.
    pub layer_digests: Vec<String>,
}

/// Serialises through a `Value`, whose maps are sorted: oci-spec's `HashMap`s would otherwise
/// make the bytes (and digests) differ from run to run.
fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

fn oci_digest(d: &str) -> Result<OciDigest, Error> {
    Ok(OciDigest::from_str(d)?)
}

fn hash_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[derive(Serialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: [String; 1],
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

impl Image {
    /// An image in the compat form holding `data` at `path` (mode 0755), which is also the
    /// entrypoint, with platform `wasi/wasm`. `data` is not checked: any bytes will do.
    pub fn single_file(
        reference: &str,
        path: &str,
        data: impl Into<Vec<u8>>,
    ) -> Result<Image, Error> {
        Ok(Image {
            reference: Reference::parse(reference)?,
            platform: Platform::parse(crate::DEFAULT_PLATFORM)?,
            config: ImageConfig::Oci(ExecConfig {
                entrypoint: vec![path.to_string()],
                ..ExecConfig::default()
            }),
            layers: vec![Layer::tar(&[Entry::file(path, 0o755, data)])?],
        })
    }

    /// The OCI config's execution parameters, when the config is an OCI one.
    pub fn exec_config_mut(&mut self) -> Option<&mut ExecConfig> {
        match &mut self.config {
            ImageConfig::Oci(c) => Some(c),
            _ => None,
        }
    }

    /// The config blob as written.
    fn config_blob(&self) -> Result<Vec<u8>, Error> {
        let p = &self.platform;
        match &self.config {
            ImageConfig::Oci(exec) => {
                let mut labels = exec.labels.clone();
                let wasm_layers: Vec<String> = self
                    .layers
                    .iter()
                    .filter(|l| !l.is_tar())
                    .map(|l| digest_hex(&l.digest()).to_string())
                    .collect();
                if !wasm_layers.is_empty() {
                    labels.insert(
                        LABEL_RUNWASI_LAYERS.to_string(),
                        hex::encode(Sha256::digest(wasm_layers.concat())),
                    );
                }
                let mut config = ConfigBuilder::default();
                if !exec.entrypoint.is_empty() {
                    config = config.entrypoint(exec.entrypoint.clone());
                }
                if !exec.cmd.is_empty() {
                    config = config.cmd(exec.cmd.clone());
                }
                if !exec.env.is_empty() {
                    config = config.env(exec.env.clone());
                }
                if let Some(user) = &exec.user {
                    config = config.user(user.clone());
                }
                if let Some(dir) = &exec.working_dir {
                    config = config.working_dir(dir.clone());
                }
                if !labels.is_empty() {
                    config = config.labels(hash_map(&labels));
                }
                let tar_layers: Vec<&Layer> = self.layers.iter().filter(|l| l.is_tar()).collect();
                let history = tar_layers
                    .iter()
                    .map(|_| {
                        HistoryBuilder::default()
                            .created_by("kiln image build")
                            .comment("WebAssembly module")
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut builder = ImageConfigurationBuilder::default()
                    .architecture(Arch::from(p.architecture.as_str()))
                    .os(Os::from(p.os.as_str()))
                    .config(config.build()?)
                    .rootfs(
                        RootFsBuilder::default()
                            .typ("layers")
                            .diff_ids(tar_layers.iter().map(|l| l.digest()).collect::<Vec<_>>())
                            .build()?,
                    );
                if !history.is_empty() {
                    builder = builder.history(history);
                }
                if let Some(v) = &p.variant {
                    builder = builder.variant(v.clone());
                }
                canonical_json(&builder.build()?)
            }
            ImageConfig::Wasm {
                created,
                author,
                component,
            } => canonical_json(&WasmArtifactConfig {
                created: created.clone(),
                author: author.clone(),
                architecture: p.architecture.clone(),
                os: p.os.clone(),
                layer_digests: self.layers.iter().map(Layer::digest).collect(),
                component: component.clone(),
            }),
            ImageConfig::Raw { data, .. } => Ok(data.clone()),
        }
    }

    /// Writes the image as an OCI image-layout tarball to `out`: `oci-layout`, `index.json`
    /// (one manifest descriptor with the platform and the `io.containerd.image.name` and
    /// `org.opencontainers.image.ref.name` annotations), the blobs, and, when the image is a
    /// plain OCI image (OCI config, tar layers only), Docker's `manifest.json` so that
    /// `docker load` reads it too.
    pub fn write<W: Write>(&self, out: W) -> Result<Written, Error> {
        let config = self.config_blob()?;
        let config_digest = digest(&config);
        let layer_digests: Vec<String> = self.layers.iter().map(Layer::digest).collect();

        let mut layer_descs = Vec::with_capacity(self.layers.len());
        for (layer, d) in self.layers.iter().zip(&layer_digests) {
            let mut desc = Descriptor::new(
                layer.media_type.clone(),
                layer.data.len() as u64,
                oci_digest(d)?,
            );
            if !layer.annotations.is_empty() {
                desc.set_annotations(Some(hash_map(&layer.annotations)));
            }
            layer_descs.push(desc);
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                self.config.media_type(),
                config.len() as u64,
                oci_digest(&config_digest)?,
            ))
            .layers(layer_descs)
            .build()?;
        let manifest = canonical_json(&manifest)?;
        let manifest_digest = digest(&manifest);

        let full_ref = self.reference.full();
        let mut platform = PlatformBuilder::default()
            .architecture(Arch::from(self.platform.architecture.as_str()))
            .os(Os::from(self.platform.os.as_str()));
        if let Some(v) = &self.platform.variant {
            platform = platform.variant(v.clone());
        }
        let mut manifest_desc = Descriptor::new(
            MediaType::ImageManifest,
            manifest.len() as u64,
            oci_digest(&manifest_digest)?,
        );
        manifest_desc.set_platform(Some(platform.build()?));
        manifest_desc.set_annotations(Some(HashMap::from([
            (ANNOTATION_CONTAINERD_NAME.to_string(), full_ref.clone()),
            (ANNOTATION_REF_NAME.to_string(), self.reference.tag.clone()),
        ])));
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![manifest_desc])
            .build()?;
        let index = canonical_json(&index)?;

        let blob_path = |d: &str| format!("blobs/sha256/{}", digest_hex(d));
        let plain_oci =
            matches!(self.config, ImageConfig::Oci(_)) && self.layers.iter().all(Layer::is_tar);
        let docker_manifest = if plain_oci {
            Some(serde_json::to_vec(&[DockerManifestEntry {
                config: blob_path(&config_digest),
                repo_tags: [self.reference.familiar()],
                layers: layer_digests.iter().map(|d| blob_path(d)).collect(),
            }])?)
        } else {
            None
        };

        let mut tar = tar::Builder::new(out);
        append_file(
            &mut tar,
            "oci-layout",
            0o644,
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        append_file(&mut tar, "index.json", 0o644, &index)?;
        if let Some(docker) = &docker_manifest {
            append_file(&mut tar, "manifest.json", 0o644, docker)?;
        }
        append_dir(&mut tar, "blobs", 0o755)?;
        append_dir(&mut tar, "blobs/sha256", 0o755)?;
        // Two layers with the same content are one blob.
        let mut written = BTreeSet::new();
        let blobs = self
            .layers
            .iter()
            .zip(&layer_digests)
            .map(|(l, d)| (d, &l.data[..]))
            .chain([
                (&config_digest, &config[..]),
                (&manifest_digest, &manifest[..]),
            ]);
        for (d, data) in blobs {
            if written.insert(d.clone()) {
                append_file(&mut tar, &blob_path(d), 0o644, data)?;
            }
        }
        let mut out = tar.into_inner()?;
        out.flush()?;
        Ok(Written {
            reference: full_ref,
            manifest_digest,
            config_digest,
            layer_digests,
        })
    }

    /// The image-layout tarball in memory.
    pub fn to_tar(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.write(&mut out)?;
        Ok(out)
    }
}
