//! A minimal OCI image-layout tarball writer, for images `kiln image build` refuses to make
//! (a shell script as the entrypoint, a truncated module): the tests need them to check that
//! the shim rejects them with a message.
//!
//! The layout is what `ctr images import` reads: `oci-layout`, `index.json` (whose manifest
//! descriptor carries the `io.containerd.image.name` annotation, so the image is named on
//! import) and `blobs/sha256/*` (one uncompressed layer, the config, the manifest).

use serde_json::json;
use sha2::{Digest, Sha256};

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A file in the image's single layer.
#[derive(Debug, Clone)]
pub struct File {
    /// Absolute path in the image, e.g. `/app.wasm`.
    pub path: String,
    /// The content.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// A device node (`'c'` or `'b'`, major, minor) instead of a regular file; `data` is
    /// then empty.
    pub node: Option<(char, u32, u32)>,
}

/// An image to write.
#[derive(Debug, Clone)]
pub struct Image {
    /// Full reference, e.g. `docker.io/kiln-test/notwasm:latest`.
    pub reference: String,
    /// Platform OS, e.g. `wasi`.
    pub os: String,
    /// Platform architecture, e.g. `wasm`.
    pub arch: String,
    /// The config's Entrypoint.
    pub entrypoint: Vec<String>,
    /// The config's Cmd.
    pub cmd: Vec<String>,
    /// The config's Env (`K=V`).
    pub env: Vec<String>,
    /// The config's User (`uid[:gid]`); empty for none.
    pub user: String,
    /// The layer's files.
    pub files: Vec<File>,
}

impl Image {
    /// A `wasi/wasm` image holding `data` at `path`, which is also the entrypoint.
    pub fn single_file(reference: &str, path: &str, data: Vec<u8>) -> Image {
        Image {
            reference: reference.to_string(),
            os: "wasi".to_string(),
            arch: "wasm".to_string(),
            entrypoint: vec![path.to_string()],
            cmd: Vec::new(),
            env: Vec::new(),
            user: String::new(),
            files: vec![File {
                path: path.to_string(),
                data,
                mode: 0o755,
                node: None,
            }],
        }
    }

    /// The image as an OCI image-layout tarball.
    pub fn to_tar(&self) -> std::io::Result<Vec<u8>> {
        let layer = self.layer()?;
        let layer_digest = digest(&layer);

        let mut config_body = serde_json::Map::new();
        config_body.insert("Entrypoint".into(), json!(self.entrypoint));
        if !self.cmd.is_empty() {
            config_body.insert("Cmd".into(), json!(self.cmd));
        }
        if !self.env.is_empty() {
            config_body.insert("Env".into(), json!(self.env));
        }
        if !self.user.is_empty() {
            config_body.insert("User".into(), json!(self.user));
        }
        let config = to_vec(&json!({
            "architecture": self.arch,
            "os": self.os,
            "config": config_body,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }));
        let config_digest = digest(&config);

        let manifest = to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len()}],
        }));
        let manifest_digest = digest(&manifest);
        let tag = self
            .reference
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t)
            .unwrap_or("latest");
        let index = to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": self.reference,
                    "org.opencontainers.image.ref.name": tag,
                },
                "platform": {"architecture": self.arch, "os": self.os},
            }],
        }));

        let mut tar = tar::Builder::new(Vec::new());
        append(
            &mut tar,
            "oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#,
            0o644,
        )?;
        append(&mut tar, "index.json", &index, 0o644)?;
        for (d, data) in [
            (&layer_digest, &layer),
            (&config_digest, &config),
            (&manifest_digest, &manifest),
        ] {
            let name = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            append(&mut tar, &name, data, 0o644)?;
        }
        tar.into_inner()
    }

    fn layer(&self) -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dirs: Vec<String> = Vec::new();
        for f in &self.files {
            let rel = f.path.trim_start_matches('/');
            let comps: Vec<&str> = rel.split('/').collect();
            for depth in 1..comps.len() {
                let dir = format!("{}/", comps[..depth].join("/"));
                if !dirs.contains(&dir) {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0);
                    tar.append_data(&mut h, &dir, std::io::empty())?;
                    dirs.push(dir);
                }
            }
            match f.node {
                Some((kind, major, minor)) => {
                    let kind = if kind == 'b' {
                        tar::EntryType::Block
                    } else {
                        tar::EntryType::Char
                    };
                    let mut h = header(kind, f.mode, 0);
                    h.set_device_major(major)?;
                    h.set_device_minor(minor)?;
                    tar.append_data(&mut h, rel, std::io::empty())?;
                }
                None => append(&mut tar, rel, &f.data, f.mode)?,
            }
        }
        tar.into_inner()
    }
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn to_vec(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialising a JSON value cannot fail")
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut h, path, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn untar(data: &[u8]) -> BTreeMap<String, (tar::EntryType, u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(data);
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).unwrap();
            out.insert(path, (kind, mode, buf));
        }
        out
    }

    fn blob<'a>(files: &'a BTreeMap<String, (tar::EntryType, u32, Vec<u8>)>, d: &str) -> &'a [u8] {
        let name = format!("blobs/sha256/{}", d.strip_prefix("sha256:").unwrap());
        let data = &files
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .2;
        assert_eq!(digest(data), d, "blob {name} does not match its digest");
        data
    }

    fn json(data: &[u8]) -> serde_json::Value {
        serde_json::from_slice(data).unwrap()
    }

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn layout_is_complete_and_consistent() {
        let img = Image::single_file(
            "docker.io/kiln-test/x:v2",
            "/opt/app/app.wasm",
            b"#!/bin/sh\necho hi\n".to_vec(),
        );
        let files = untar(&img.to_tar().unwrap());
        assert_eq!(files["oci-layout"].2, br#"{"imageLayoutVersion":"1.0.0"}"#);
        // Three blobs plus oci-layout and index.json, nothing else.
        assert_eq!(files.len(), 5, "{:?}", files.keys().collect::<Vec<_>>());

        let index = json(&files["index.json"].2);
        assert_eq!(index["schemaVersion"], 2);
        let desc = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(desc["mediaType"], MEDIA_MANIFEST);
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "docker.io/kiln-test/x:v2"
        );
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "v2"
        );
        assert_eq!(desc["platform"]["os"], "wasi");
        assert_eq!(desc["platform"]["architecture"], "wasm");

        let manifest_bytes = blob(&files, desc["digest"].as_str().unwrap());
        assert_eq!(desc["size"], manifest_bytes.len());
        let manifest = json(manifest_bytes);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
        let config_bytes = blob(&files, manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let layer_desc = &manifest["layers"][0];
        assert_eq!(layer_desc["mediaType"], MEDIA_LAYER);
        let layer = blob(&files, layer_desc["digest"].as_str().unwrap());
        assert_eq!(layer_desc["size"], layer.len());

        let config = json(config_bytes);
        assert_eq!(config["os"], "wasi");
        assert_eq!(config["architecture"], "wasm");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/opt/app/app.wasm"])
        );
        assert!(config["config"].get("Cmd").is_none());
        assert_eq!(config["rootfs"]["type"], "layers");
        // Uncompressed layer: its diff id is its digest.
        assert_eq!(config["rootfs"]["diff_ids"][0], layer_desc["digest"]);

        let entries = untar(layer);
        let names: Vec<&String> = entries.keys().collect();
        assert_eq!(names, ["opt/", "opt/app/", "opt/app/app.wasm"]);
        assert_eq!(entries["opt/"].0, tar::EntryType::Directory);
        let (kind, mode, data) = &entries["opt/app/app.wasm"];
        assert_eq!(*kind, tar::EntryType::Regular);
        assert_eq!(*mode, 0o755);
        assert_eq!(data, b"#!/bin/sh\necho hi\n");
    }

    #[test]
    fn output_is_reproducible_and_content_addressed() {
        let a = Image::single_file("docker.io/kiln-test/x:latest", "/app.wasm", vec![1, 2, 3]);
        assert_eq!(a.to_tar().unwrap(), a.to_tar().unwrap());
        let mut b = a.clone();
        b.files[0].data = vec![1, 2, 4];
        assert_ne!(a.to_tar().unwrap(), b.to_tar().unwrap());
    }

    #[test]
    fn cmd_env_and_default_tag() {
        let mut img = Image::single_file("kiln-test/y", "/y.wasm", b"\0asm".to_vec());
        img.cmd = vec!["a".into(), "b c".into()];
        img.env = vec!["K=V".into()];
        let files = untar(&img.to_tar().unwrap());
        let index = json(&files["index.json"].2);
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            "latest"
        );
        let manifest = json(blob(&files, desc["digest"].as_str().unwrap()));
        let config = json(blob(&files, manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["a", "b c"]));
        assert_eq!(config["config"]["Env"], serde_json::json!(["K=V"]));
    }
}
