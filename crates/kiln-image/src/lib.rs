//! Packs a WebAssembly module into an OCI image-layout tarball.
//!
//! Kiln runs Wasm modules that containerd pulls or imports like any other
//! container image, so a module has to be wrapped in an image before Kiln can
//! run it. Pushing through a registry is not always possible (tests, air-gapped
//! machines), so this crate writes a self-contained tarball that
//! `ctr images import` (and `docker load`) accept directly.
//!
//! # Layout of the tarball
//!
//! ```text
//! oci-layout                    {"imageLayoutVersion":"1.0.0"}
//! index.json                    image index naming the one manifest
//! manifest.json                 Docker "save" manifest, so `docker load` works
//! blobs/sha256/<layer>          uncompressed tar holding the module
//! blobs/sha256/<config>         image config (Entrypoint, Cmd, Env, rootfs)
//! blobs/sha256/<manifest>       image manifest
//! ```
//!
//! Design choices, and why:
//!
//! * **Uncompressed layer** (`application/vnd.oci.image.layer.v1.tar`): Wasm
//!   modules are small, and skipping gzip keeps the diff ID equal to the layer
//!   digest and makes the output independent of a compressor's version.
//! * **Reproducible output**: every tar entry has a fixed mtime, owner root
//!   (uid/gid 0) and fixed modes, the config has no `created` timestamp, and
//!   JSON is serialised from structs with a fixed field order. The same inputs
//!   therefore always give the same digests, which keeps content stores and
//!   caches warm across rebuilds.
//! * **Platform `wasi/wasm` by default**: it is the platform the containerd
//!   Wasm shims agree on; a host-platform containerd only unpacks it when asked
//!   (`ctr images import --platform wasi/wasm`), so a Wasm image is never
//!   mistaken for a native one.
//! * **`io.containerd.image.name` annotation**: `ctr images import` names the
//!   imported image from it, so the image appears under its full normalised
//!   reference (e.g. `docker.io/library/hello:latest`).
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

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Media type of the image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the image manifest blob.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the image config blob.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the (uncompressed) layer blob.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Annotation containerd uses to name an imported image.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI annotation carrying the tag of a manifest in an image layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Platform used when none is given.
pub const DEFAULT_PLATFORM: &str = "wasi/wasm";
/// Modification time (seconds since the epoch) of every tar entry, fixed so
/// that builds are reproducible.
pub const FIXED_MTIME: u64 = 0;

/// The four bytes every Wasm binary (core module or component) starts with.
const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Errors returned while building an image.
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
    /// The module does not start with the Wasm magic `\0asm`.
    #[error("{path} is not a WebAssembly binary (missing \\0asm magic)")]
    NotWasm {
        /// The module path (or name, for in-memory modules).
        path: PathBuf,
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
    /// The path of the module inside the image is unusable.
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
    /// Writing the tarball failed.
    #[error("cannot write image tarball: {0}")]
    Write(#[from] io::Error),
    /// Serialising a JSON document failed (should not happen).
    #[error("cannot serialise JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where the Wasm module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Read the module from this file.
    Path(PathBuf),
    /// Use these bytes; `name` stands in for a file name (default path in the
    /// image and error messages).
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
    /// The Wasm module to pack.
    pub module: ModuleSource,
    /// Absolute path of the module inside the image; default
    /// `/<file name of the module>`.
    pub path_in_image: Option<String>,
    /// Image reference, e.g. `hello:latest`; normalised like Docker does.
    pub reference: String,
    /// Platform as `os/arch[/variant]`, e.g. `wasi/wasm` (the default).
    pub platform: String,
    /// Extra arguments, stored as the config's `Cmd`.
    pub args: Vec<String>,
    /// Environment entries (`KEY=VALUE`), stored as the config's `Env`.
    pub env: Vec<String>,
}

impl BuildOptions {
    /// Options for packing the module file at `module` as `reference`, with
    /// the default platform, path, no extra arguments and no environment.
    pub fn new(module: impl Into<PathBuf>, reference: impl Into<String>) -> Self {
        BuildOptions {
            module: ModuleSource::Path(module.into()),
            path_in_image: None,
            reference: reference.into(),
            platform: DEFAULT_PLATFORM.to_string(),
            args: Vec::new(),
            env: Vec::new(),
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
    /// Digest of the config blob (`sha256:<hex>`), i.e. Docker's image ID.
    pub config_digest: String,
    /// Digest of the uncompressed layer (`sha256:<hex>`), also its diff ID.
    pub layer_digest: String,
    /// Digest of the module's bytes (`sha256:<hex>`).
    pub module_digest: String,
    /// Absolute path of the module inside the image.
    pub path_in_image: String,
    /// The platform the image was built for.
    pub platform: Platform,
}

/// An OCI platform (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, e.g. `wasi`.
    pub os: String,
    /// Architecture, e.g. `wasm`.
    pub architecture: String,
    /// Optional architecture variant, e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant` (e.g. `wasi/wasm`, `wasip1/wasm`,
    /// `linux/arm64/v8`).
    pub fn parse(s: &str) -> Result<Platform, Error> {
        let err = |reason: &str| Error::InvalidPlatform {
            platform: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(err("wrong number of components"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(err("empty component"));
            }
            if !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Err(err("components may only contain [A-Za-z0-9_.-]"));
            }
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A Docker-style image reference, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry domain, e.g. `docker.io` or `localhost:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/hello`.
    pub path: String,
    /// Tag, e.g. `latest`.
    pub tag: String,
}

/// Docker Hub's canonical domain.
const DOCKER_HUB: &str = "docker.io";

impl Reference {
    /// Parses and normalises a reference like Docker does: a bare `name`
    /// becomes `docker.io/library/name`, `user/name` becomes
    /// `docker.io/user/name`, and a missing tag becomes `latest`. Digests
    /// (`@sha256:…`) are rejected: the digest is an output of the build.
    pub fn parse(s: &str) -> Result<Reference, Error> {
        let err = |reason: &str| Error::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty reference"));
        }
        if s.contains('@') {
            return Err(err("digest references are not supported; give a tag"));
        }
        // The tag is after the last ':' that follows the last '/', so that a
        // registry port (`localhost:5000/x`) is not taken for a tag.
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, "latest"),
        };
        if !valid_tag(tag) {
            return Err(err("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let domain = if domain == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            domain
        };
        if !valid_domain(&domain) {
            return Err(err("invalid registry domain"));
        }
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(err(
                "repository name components must be lowercase [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }
        if domain.len() + 1 + path.len() > 255 {
            return Err(err("repository name longer than 255 characters"));
        }
        Ok(Reference {
            domain,
            path,
            tag: tag.to_string(),
        })
    }

    /// The full form, e.g. `docker.io/library/hello:latest`.
    pub fn full(&self) -> String {
        format!("{}/{}:{}", self.domain, self.path, self.tag)
    }

    /// The short form Docker shows, e.g. `hello:latest` or `user/app:v1`;
    /// other registries keep their domain.
    pub fn familiar(&self) -> String {
        if self.domain != DOCKER_HUB {
            return self.full();
        }
        // Docker shortens `library/x` to `x`, but leaves `library/a/b` alone.
        match self.path.strip_prefix("library/") {
            Some(short) if !short.contains('/') => format!("{short}:{}", self.tag),
            _ => format!("{}:{}", self.path, self.tag),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full())
    }
}

fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return false,
    }
    tag.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the distribution spec's path component.
fn valid_path_component(comp: &str) -> bool {
    let b = comp.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &comp[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Checks the module's path inside the image and returns it split into its
/// components (without the leading `/`).
fn parse_path_in_image(path: &str) -> Result<Vec<&str>, Error> {
    let err = |reason: &str| Error::InvalidPathInImage {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| err("must be absolute (start with '/')"))?;
    let comps: Vec<&str> = rest.split('/').collect();
    if comps.iter().any(|c| c.is_empty()) {
        return Err(err("must name a file and contain no empty components"));
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(err("must not contain '.' or '..' components"));
    }
    if path.contains('\0') {
        return Err(err("must not contain NUL"));
    }
    Ok(comps)
}

/// `sha256:<hex>` of `data`.
fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The hex part of a `sha256:<hex>` digest.
fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<PlatformJson<'a>>,
}

#[derive(Serialize)]
struct PlatformJson<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: ExecConfig<'a>,
    rootfs: RootFs<'a>,
    history: [History<'a>; 1],
}

#[derive(Serialize)]
struct ExecConfig<'a> {
    #[serde(rename = "Env", skip_serializing_if = "<[_]>::is_empty")]
    env: &'a [String],
    #[serde(rename = "Entrypoint")]
    entrypoint: [&'a str; 1],
    #[serde(rename = "Cmd", skip_serializing_if = "<[_]>::is_empty")]
    cmd: &'a [String],
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: [&'a str; 1],
}

#[derive(Serialize)]
struct History<'a> {
    created_by: &'a str,
    comment: &'a str,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: [Descriptor<'a>; 1],
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    manifests: [Descriptor<'a>; 1],
}

#[derive(Serialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: [String; 1],
    #[serde(rename = "Layers")]
    layers: [String; 1],
}

/// A tar header with the fixed metadata every entry gets (owner root, fixed
/// mtime), so that output is reproducible.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(FIXED_MTIME);
    // Names are short ASCII constants; these cannot fail.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, path, io::empty())
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

/// Builds the layer: an uncompressed tar with the module at `components`
/// (mode 0755, owner root) and its parent directories.
fn build_layer(components: &[&str], module: &[u8]) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for depth in 1..components.len() {
        append_dir(&mut tar, &format!("{}/", components[..depth].join("/")))?;
    }
    append_file(&mut tar, &components.join("/"), 0o755, module)?;
    tar.into_inner()
}

/// Builds the image described by `opts` and writes it to `out` as an OCI
/// image-layout tarball (with a Docker `manifest.json` as well).
///
/// The output depends only on the options and the module's bytes, so
/// building twice gives byte-identical tarballs and the same digests.
pub fn build(opts: &BuildOptions, out: impl Write) -> Result<ImageSummary, Error> {
    // Validate everything before reading the module or writing anything.
    let reference = Reference::parse(&opts.reference)?;
    let platform = Platform::parse(&opts.platform)?;
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
    let components = parse_path_in_image(&path_in_image)?;

    let module = opts.module.load()?;
    if !module.starts_with(WASM_MAGIC) {
        return Err(Error::NotWasm {
            path: opts.module.display_path(),
        });
    }
    let module_digest = digest(&module);

    let layer = build_layer(&components, &module)?;
    let layer_digest = digest(&layer);

    let config = serde_json::to_vec(&ImageConfig {
        architecture: &platform.architecture,
        os: &platform.os,
        variant: platform.variant.as_deref(),
        config: ExecConfig {
            env: &opts.env,
            entrypoint: [&path_in_image],
            cmd: &opts.args,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: [&layer_digest],
        },
        history: [History {
            created_by: "kiln image build",
            comment: "WebAssembly module",
        }],
    })?;
    let config_digest = digest(&config);

    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_MANIFEST,
        config: Descriptor {
            media_type: MEDIA_TYPE_CONFIG,
            digest: &config_digest,
            size: config.len() as u64,
            annotations: None,
            platform: None,
        },
        layers: [Descriptor {
            media_type: MEDIA_TYPE_LAYER,
            digest: &layer_digest,
            size: layer.len() as u64,
            annotations: None,
            platform: None,
        }],
    })?;
    let manifest_digest = digest(&manifest);

    let full_ref = reference.full();
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: MEDIA_TYPE_INDEX,
        manifests: [Descriptor {
            media_type: MEDIA_TYPE_MANIFEST,
            digest: &manifest_digest,
            size: manifest.len() as u64,
            annotations: Some(BTreeMap::from([
                (ANNOTATION_CONTAINERD_NAME, full_ref.as_str()),
                (ANNOTATION_REF_NAME, reference.tag.as_str()),
            ])),
            platform: Some(PlatformJson {
                architecture: &platform.architecture,
                os: &platform.os,
                variant: platform.variant.as_deref(),
            }),
        }],
    })?;

    let blob_path = |d: &str| format!("blobs/sha256/{}", digest_hex(d));
    let docker_manifest = serde_json::to_vec(&[DockerManifestEntry {
        config: blob_path(&config_digest),
        repo_tags: [reference.familiar()],
        layers: [blob_path(&layer_digest)],
    }])?;

    let mut tar = tar::Builder::new(out);
    append_file(
        &mut tar,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_file(&mut tar, "index.json", 0o644, &index)?;
    append_file(&mut tar, "manifest.json", 0o644, &docker_manifest)?;
    append_dir(&mut tar, "blobs/")?;
    append_dir(&mut tar, "blobs/sha256/")?;
    append_file(&mut tar, &blob_path(&layer_digest), 0o644, &layer)?;
    append_file(&mut tar, &blob_path(&config_digest), 0o644, &config)?;
    append_file(&mut tar, &blob_path(&manifest_digest), 0o644, &manifest)?;
    let mut out = tar.into_inner()?;
    out.flush()?;

    Ok(ImageSummary {
        reference: full_ref,
        manifest_digest,
        config_digest,
        layer_digest,
        module_digest,
        path_in_image,
        platform,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashMap;
    use std::io::Read;

    /// A minimal valid Wasm module: magic + version 1, no sections.
    const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";

    fn bytes_opts(reference: &str) -> BuildOptions {
        BuildOptions {
            module: ModuleSource::Bytes {
                name: "hello.wasm".to_string(),
                data: EMPTY_MODULE.to_vec(),
            },
            path_in_image: None,
            reference: reference.to_string(),
            platform: DEFAULT_PLATFORM.to_string(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    fn build_vec(opts: &BuildOptions) -> (ImageSummary, Vec<u8>) {
        let mut out = Vec::new();
        let summary = build(opts, &mut out).expect("build");
        (summary, out)
    }

    /// Unpacks a tar into path → (header, content).
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

    fn json(data: &[u8]) -> Value {
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

    #[test]
    fn digests_agree_with_blob_contents() {
        let mut opts = bytes_opts("hello:latest");
        opts.args = vec!["a".into(), "b c".into()];
        opts.env = vec!["K=V".into(), "EMPTY=".into()];
        let (summary, out) = build_vec(&opts);
        let files = files(&out);

        assert_eq!(
            json(&files["oci-layout"]),
            serde_json::json!({"imageLayoutVersion": "1.0.0"})
        );

        let index = json(&files["index.json"]);
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_TYPE_INDEX);
        let desc = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(desc["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(desc["digest"], summary.manifest_digest.as_str());
        assert_eq!(
            desc["platform"],
            serde_json::json!({"os": "wasi", "architecture": "wasm"})
        );
        assert_eq!(
            desc["annotations"][ANNOTATION_CONTAINERD_NAME],
            "docker.io/library/hello:latest"
        );
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], "latest");

        let manifest_bytes = blob(&files, &summary.manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len() as u64);
        let manifest = json(manifest_bytes);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_TYPE_CONFIG);
        assert_eq!(manifest["config"]["digest"], summary.config_digest.as_str());
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], MEDIA_TYPE_LAYER);
        assert_eq!(layers[0]["digest"], summary.layer_digest.as_str());

        let config_bytes = blob(&files, &summary.config_digest);
        assert_eq!(manifest["config"]["size"], config_bytes.len() as u64);
        let config = json(config_bytes);
        assert_eq!(config["os"], "wasi");
        assert_eq!(config["architecture"], "wasm");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/hello.wasm"])
        );
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["a", "b c"]));
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!(["K=V", "EMPTY="])
        );
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!([summary.layer_digest])
        );

        let layer_bytes = blob(&files, &summary.layer_digest);
        assert_eq!(layers[0]["size"], layer_bytes.len() as u64);
        let layer = untar(layer_bytes);
        assert_eq!(layer.len(), 1);
        let (path, header, content) = &layer[0];
        assert_eq!(path, "hello.wasm");
        assert_eq!(content, EMPTY_MODULE);
        assert_eq!(header.mode().unwrap(), 0o755);
        assert_eq!(header.uid().unwrap(), 0);
        assert_eq!(header.gid().unwrap(), 0);
        assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
        assert_eq!(summary.module_digest, super::digest(EMPTY_MODULE));

        let docker = json(&files["manifest.json"]);
        assert_eq!(
            docker,
            serde_json::json!([{
                "Config": format!("blobs/sha256/{}", digest_hex(&summary.config_digest)),
                "RepoTags": ["hello:latest"],
                "Layers": [format!("blobs/sha256/{}", digest_hex(&summary.layer_digest))],
            }])
        );
        // Nothing but the expected files.
        assert_eq!(files.len(), 6);
    }

    #[test]
    fn optional_config_fields_are_omitted() {
        let (summary, out) = build_vec(&bytes_opts("hello"));
        let files = files(&out);
        let config = json(blob(&files, &summary.config_digest));
        assert!(config["config"].get("Cmd").is_none());
        assert!(config["config"].get("Env").is_none());
        assert!(config.get("created").is_none());
    }

    #[test]
    fn output_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.wasm");
        std::fs::write(&path, EMPTY_MODULE).unwrap();
        let opts = BuildOptions::new(&path, "kiln-test/app:v1");
        let (s1, out1) = build_vec(&opts);
        // Changing the file's mtime must not change the output.
        std::fs::write(&path, EMPTY_MODULE).unwrap();
        let (s2, out2) = build_vec(&opts);
        assert_eq!(s1, s2);
        assert_eq!(out1, out2);
        for (_, header, _) in untar(&out1) {
            assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
            assert_eq!(header.uid().unwrap(), 0);
        }
        // And a different module does change the digests.
        std::fs::write(&path, b"\0asm\x01\0\0\0\0\x01\0").unwrap();
        let (s3, _) = build_vec(&opts);
        assert_ne!(s1.manifest_digest, s3.manifest_digest);
        assert_ne!(s1.layer_digest, s3.layer_digest);
    }

    #[test]
    fn nested_path_in_image_gets_parent_directories() {
        let mut opts = bytes_opts("hello");
        opts.path_in_image = Some("/app/bin/hello.wasm".to_string());
        let (summary, out) = build_vec(&opts);
        assert_eq!(summary.path_in_image, "/app/bin/hello.wasm");
        let files = files(&out);
        let layer = untar(blob(&files, &summary.layer_digest));
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
        let config = json(blob(&files, &summary.config_digest));
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/app/bin/hello.wasm"])
        );
    }

    #[test]
    fn bad_paths_in_image_are_rejected() {
        for bad in ["relative.wasm", "/", "/a//b", "/a/../b", "/./a", "/dir/"] {
            let mut opts = bytes_opts("hello");
            opts.path_in_image = Some(bad.to_string());
            let err = build(&opts, Vec::new()).unwrap_err();
            assert!(
                matches!(err, Error::InvalidPathInImage { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn platform_parsing() {
        let p = Platform::parse("wasi/wasm").unwrap();
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant),
            ("wasi", "wasm", None)
        );
        let p = Platform::parse("wasip1/wasm").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("wasip1", "wasm"));
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        for bad in [
            "",
            "wasi",
            "wasi/",
            "/wasm",
            "a/b/c/d",
            "wa si/wasm",
            "wasi//wasm",
        ] {
            assert!(
                matches!(Platform::parse(bad), Err(Error::InvalidPlatform { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn platform_reaches_config_and_index() {
        let mut opts = bytes_opts("hello");
        opts.platform = "wasip1/wasm".to_string();
        let (summary, out) = build_vec(&opts);
        let files = files(&out);
        let config = json(blob(&files, &summary.config_digest));
        assert_eq!(
            (config["os"].as_str(), config["architecture"].as_str()),
            (Some("wasip1"), Some("wasm"))
        );
        let index = json(&files["index.json"]);
        assert_eq!(
            index["manifests"][0]["platform"],
            serde_json::json!({"os": "wasip1", "architecture": "wasm"})
        );
    }

    #[test]
    fn reference_normalisation() {
        let cases = [
            ("hello", "docker.io/library/hello:latest", "hello:latest"),
            (
                "hello:latest",
                "docker.io/library/hello:latest",
                "hello:latest",
            ),
            ("hello:v1.2", "docker.io/library/hello:v1.2", "hello:v1.2"),
            ("user/app", "docker.io/user/app:latest", "user/app:latest"),
            (
                "kiln-test/hello:latest",
                "docker.io/kiln-test/hello:latest",
                "kiln-test/hello:latest",
            ),
            ("docker.io/library/x:1", "docker.io/library/x:1", "x:1"),
            ("docker.io/x", "docker.io/library/x:latest", "x:latest"),
            ("index.docker.io/u/x", "docker.io/u/x:latest", "u/x:latest"),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
            ),
            ("ghcr.io/o/r:v1", "ghcr.io/o/r:v1", "ghcr.io/o/r:v1"),
            (
                "registry.example.com:443/x",
                "registry.example.com:443/x:latest",
                "registry.example.com:443/x:latest",
            ),
            ("a/b/c", "docker.io/a/b/c:latest", "a/b/c:latest"),
            (
                "my_app.v2-x",
                "docker.io/library/my_app.v2-x:latest",
                "my_app.v2-x:latest",
            ),
        ];
        for (input, full, familiar) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.full(), full, "{input}");
            assert_eq!(r.familiar(), familiar, "{input}");
        }
        let r = Reference::parse("hello:v1").unwrap();
        assert_eq!(r.tag, "v1");
        assert_eq!(r.path, "library/hello");
        assert_eq!(r.domain, "docker.io");
        for bad in [
            "",
            "Hello",
            "hello:",
            "hello:-x",
            "a//b",
            "/hello",
            "hello/",
            "x@sha256:0000",
            "a..b",
            "a___b",
            "hello:a b",
            "-a",
        ] {
            assert!(
                matches!(Reference::parse(bad), Err(Error::InvalidReference { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn tag_reaches_annotations_and_docker_manifest() {
        let (_, out) = build_vec(&bytes_opts("ghcr.io/o/app:v3"));
        let files = files(&out);
        let index = json(&files["index.json"]);
        let ann = &index["manifests"][0]["annotations"];
        assert_eq!(ann[ANNOTATION_CONTAINERD_NAME], "ghcr.io/o/app:v3");
        assert_eq!(ann[ANNOTATION_REF_NAME], "v3");
        assert_eq!(
            json(&files["manifest.json"])[0]["RepoTags"],
            serde_json::json!(["ghcr.io/o/app:v3"])
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
            matches!(&err, Error::NotWasm { path: p } if p == &path),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(out.is_empty(), "nothing must be written on error");

        // Too short to hold the magic.
        std::fs::write(&path, b"\0as").unwrap();
        assert!(matches!(
            build(&BuildOptions::new(&path, "x"), Vec::new()),
            Err(Error::NotWasm { .. })
        ));
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
            let mut opts = bytes_opts("hello");
            opts.env = vec![bad.to_string()];
            assert!(
                matches!(build(&opts, Vec::new()), Err(Error::InvalidEnv { .. })),
                "{bad}"
            );
        }
    }
}
