//! From an image name to what a round needs: the chain id of its layers (the parent of the
//! container's snapshot) and its config (Entrypoint, Cmd, Env, WorkingDir, User), read through
//! containerd's Images and Content services. Done once, before the rounds, so it is not timed.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::client::Ctx;

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Indexes, manifests and configs are small; a larger blob is not what we think it is.
const MAX_BLOB: i64 = 16 << 20;
/// An index may point at indexes; real images nest one level at most.
const MAX_DEPTH: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = matches!(parts.len(), 2 | 3) && parts.iter().all(|p| !p.is_empty());
        ensure!(ok, "--platform wants OS/ARCH[/VARIANT], not '{s}'");
        Ok(Platform {
            os: parts[0].to_string(),
            arch: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The parts of an image config that go into the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    /// The digest of the manifest used (the image's target, or the index entry picked).
    pub manifest: String,
    /// The platform of that manifest, when the index or the config says.
    pub platform: Option<String>,
    pub chain_id: String,
    pub config: ImageConfig,
}

pub async fn resolve(ctx: &Ctx, name: &str, want: Option<&Platform>) -> Result<Resolved> {
    let image = ImagesClient::new(ctx.channel.clone())
        .get(ctx.req(GetImageRequest {
            name: name.to_string(),
        }))
        .await
        .with_context(|| {
            format!(
                "image {name} in namespace {}: import or pull it first",
                ctx.namespace
            )
        })?
        .into_inner()
        .image
        .with_context(|| format!("image {name}: containerd returned no image"))?;
    let target = image
        .target
        .with_context(|| format!("image {name} has no target"))?;

    let (mut digest, mut media_type, mut size) = (target.digest, target.media_type, target.size);
    let mut platform = None;
    for _ in 0..MAX_DEPTH {
        let blob = read_blob(ctx, &digest, size).await?;
        let doc: Value = serde_json::from_slice(&blob)
            .with_context(|| format!("{digest} ({media_type}) is not JSON"))?;
        if !is_index(&media_type, &doc) {
            let (config, diff_ids, config_platform) = read_config(ctx, &doc, &digest).await?;
            // An index entry was matched already; a lone manifest is checked like containerd
            // checks it for `ctr run --platform`: by its config.
            if let (None, Some(w), Some(have)) = (&platform, want, &config_platform) {
                ensure!(
                    platform_matches(have, w),
                    "image {name} is for {have}, not {w}"
                );
            }
            return Ok(Resolved {
                manifest: digest,
                platform: platform.or(config_platform),
                chain_id: chain_id(&diff_ids)?,
                config,
            });
        }
        let entry = pick_manifest(&doc, want).with_context(|| format!("index {digest}"))?;
        digest = entry.digest;
        media_type = entry.media_type;
        size = entry.size;
        platform = entry.platform;
    }
    bail!("image {name}: indexes nested deeper than {MAX_DEPTH} levels")
}

async fn read_config(
    ctx: &Ctx,
    manifest: &Value,
    digest: &str,
) -> Result<(ImageConfig, Vec<String>, Option<String>)> {
    let desc = manifest
        .get("config")
        .with_context(|| format!("manifest {digest} has no config"))?;
    let config_digest = desc
        .get("digest")
        .and_then(Value::as_str)
        .with_context(|| format!("manifest {digest}: the config has no digest"))?;
    let config_size = desc.get("size").and_then(Value::as_i64).unwrap_or(0);
    let blob = read_blob(ctx, config_digest, config_size).await?;
    let doc: Value = serde_json::from_slice(&blob)
        .with_context(|| format!("config {config_digest} is not JSON"))?;
    parse_config(&doc).with_context(|| format!("config {config_digest}"))
}

fn is_index(media_type: &str, doc: &Value) -> bool {
    if INDEX_TYPES.contains(&media_type) {
        return true;
    }
    if MANIFEST_TYPES.contains(&media_type) {
        return false;
    }
    // OCI makes the descriptor's mediaType optional in places: go by the content.
    doc.get("manifests").is_some() && doc.get("config").is_none()
}

/// `have` is `os/arch` from an image config, which carries no variant worth comparing here.
fn platform_matches(have: &str, want: &Platform) -> bool {
    have.split_once('/')
        .is_some_and(|(os, arch)| os == want.os && arch == want.arch)
}

#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub digest: String,
    pub media_type: String,
    pub size: i64,
    pub platform: Option<String>,
}

/// The manifest of an index for `want`; without `want`, linux/amd64 if present (what a plain
/// `ctr run` picks on this machine), else the first manifest.
pub fn pick_manifest(index: &Value, want: Option<&Platform>) -> Result<Entry> {
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .context("no manifests")?;
    ensure!(!manifests.is_empty(), "the index lists no manifests");
    let platform_of = |m: &Value| -> Option<Platform> {
        let p = m.get("platform")?;
        Some(Platform {
            os: p.get("os")?.as_str()?.to_string(),
            arch: p.get("architecture")?.as_str()?.to_string(),
            variant: p.get("variant").and_then(Value::as_str).map(str::to_string),
        })
    };
    let chosen = match want {
        Some(w) => manifests.iter().find(|m| {
            platform_of(m).is_some_and(|p| {
                p.os == w.os && p.arch == w.arch && (w.variant.is_none() || p.variant == w.variant)
            })
        }),
        None => manifests
            .iter()
            .find(|m| platform_of(m).is_some_and(|p| p.os == "linux" && p.arch == "amd64"))
            .or_else(|| manifests.first()),
    };
    let Some(m) = chosen else {
        let have: Vec<String> = manifests
            .iter()
            .map(|m| platform_of(m).map_or_else(|| "(no platform)".to_string(), |p| p.to_string()))
            .collect();
        bail!(
            "no manifest for {}; the index has: {}",
            want.map(Platform::to_string).unwrap_or_default(),
            have.join(", ")
        );
    };
    Ok(Entry {
        digest: m
            .get("digest")
            .and_then(Value::as_str)
            .context("an index entry has no digest")?
            .to_string(),
        media_type: m
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        size: m.get("size").and_then(Value::as_i64).unwrap_or(0),
        platform: platform_of(m).map(|p| p.to_string()),
    })
}

/// The image config's process settings, its layers' diff ids and its platform.
pub fn parse_config(doc: &Value) -> Result<(ImageConfig, Vec<String>, Option<String>)> {
    let strings = |v: Option<&Value>| -> Result<Vec<String>> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| s.as_str().map(str::to_string).context("not a string"))
                .collect(),
            Some(other) => bail!("expected a list of strings, found {other}"),
        }
    };
    let c = doc.get("config");
    let field = |name: &str| c.and_then(|c| c.get(name));
    let text = |name: &str| {
        field(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let config = ImageConfig {
        entrypoint: strings(field("Entrypoint")).context("Entrypoint")?,
        cmd: strings(field("Cmd")).context("Cmd")?,
        env: strings(field("Env")).context("Env")?,
        working_dir: text("WorkingDir"),
        user: text("User"),
    };
    let diff_ids =
        strings(doc.get("rootfs").and_then(|r| r.get("diff_ids"))).context("rootfs.diff_ids")?;
    ensure!(
        !diff_ids.is_empty(),
        "the image has no layers (rootfs.diff_ids)"
    );
    let platform = match (
        doc.get("os").and_then(Value::as_str),
        doc.get("architecture").and_then(Value::as_str),
    ) {
        (Some(os), Some(arch)) => Some(format!("{os}/{arch}")),
        _ => None,
    };
    Ok((config, diff_ids, platform))
}

/// The OCI chain id of a layer stack: the name of the committed snapshot of its top layer.
pub fn chain_id(diff_ids: &[String]) -> Result<String> {
    let (first, rest) = diff_ids.split_first().context("no layers")?;
    let mut chain = first.clone();
    for d in rest {
        let h = Sha256::digest(format!("{chain} {d}").as_bytes());
        chain = format!("sha256:{}", hex::encode(h));
    }
    Ok(chain)
}

async fn read_blob(ctx: &Ctx, digest: &str, size: i64) -> Result<Vec<u8>> {
    ensure!(
        size <= MAX_BLOB,
        "{digest}: {size} bytes is too large for an index, manifest or config"
    );
    let mut stream = ContentClient::new(ctx.channel.clone())
        .read(ctx.req(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .with_context(|| format!("read content {digest}"))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .with_context(|| format!("read content {digest}"))?
    {
        data.extend_from_slice(&chunk.data);
        ensure!(
            data.len() as i64 <= MAX_BLOB,
            "{digest}: larger than {MAX_BLOB} bytes"
        );
    }
    if let Some(want) = digest.strip_prefix("sha256:") {
        let got = hex::encode(Sha256::digest(&data));
        ensure!(got == want, "content {digest} reads back as sha256:{got}");
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chain_ids() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        assert_eq!(chain_id(std::slice::from_ref(&a)).expect("one"), a);
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(chain_id(&[a, b]).expect("two"), want);
        assert!(chain_id(&[]).is_err());
    }

    fn index() -> Value {
        json!({"schemaVersion": 2, "manifests": [
            {"mediaType": MANIFEST_TYPES[0], "digest": "sha256:01", "size": 10,
             "platform": {"os": "wasi", "architecture": "wasm"}},
            {"mediaType": MANIFEST_TYPES[0], "digest": "sha256:02", "size": 20,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": MANIFEST_TYPES[0], "digest": "sha256:03", "size": 30,
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]})
    }

    #[test]
    fn picking_a_manifest() {
        let idx = index();
        assert_eq!(
            pick_manifest(&idx, None).expect("default").digest,
            "sha256:03"
        );
        let wasm: Platform = "wasi/wasm".parse().expect("platform");
        let e = pick_manifest(&idx, Some(&wasm)).expect("wasm");
        assert_eq!(e.digest, "sha256:01");
        assert_eq!(e.size, 10);
        assert_eq!(e.platform.as_deref(), Some("wasi/wasm"));
        let arm: Platform = "linux/arm64/v8".parse().expect("platform");
        assert_eq!(
            pick_manifest(&idx, Some(&arm)).expect("arm").digest,
            "sha256:02"
        );
        let arm7: Platform = "linux/arm64/v7".parse().expect("platform");
        let err = pick_manifest(&idx, Some(&arm7)).expect_err("no v7");
        assert!(format!("{err}").contains("linux/arm64/v8"), "{err}");

        let no_amd64 = json!({"manifests": [
            {"digest": "sha256:0a", "platform": {"os": "wasi", "architecture": "wasm"}},
            {"digest": "sha256:0b"},
        ]});
        assert_eq!(
            pick_manifest(&no_amd64, None).expect("first").digest,
            "sha256:0a"
        );
        assert!(pick_manifest(&json!({"manifests": []}), None).is_err());
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//".parse::<Platform>().is_err());
    }

    #[test]
    fn lone_manifest_platform() {
        let wasm: Platform = "wasi/wasm".parse().expect("platform");
        assert!(platform_matches("wasi/wasm", &wasm));
        assert!(!platform_matches("linux/amd64", &wasm));
        assert!(!platform_matches("wasi", &wasm));
    }

    #[test]
    fn index_or_manifest() {
        assert!(is_index(INDEX_TYPES[1], &json!({})));
        assert!(!is_index(MANIFEST_TYPES[1], &json!({"manifests": []})));
        assert!(is_index("", &json!({"manifests": []})));
        assert!(!is_index("", &json!({"config": {}, "layers": []})));
    }

    #[test]
    fn configs() {
        let doc = json!({
            "architecture": "wasm", "os": "wasi",
            "config": {"Entrypoint": ["/hello.wasm"], "Env": ["A=1"], "WorkingDir": "/w",
                       "Cmd": null},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]}
        });
        let (c, diff_ids, platform) = parse_config(&doc).expect("config");
        assert_eq!(c.entrypoint, vec!["/hello.wasm"]);
        assert!(c.cmd.is_empty());
        assert_eq!(c.env, vec!["A=1"]);
        assert_eq!(c.working_dir, "/w");
        assert_eq!(c.user, "");
        assert_eq!(diff_ids, vec!["sha256:aa"]);
        assert_eq!(platform.as_deref(), Some("wasi/wasm"));

        assert!(parse_config(&json!({"rootfs": {"diff_ids": []}})).is_err());
        assert!(
            parse_config(&json!({"config": {"Cmd": "sh"}, "rootfs": {"diff_ids": ["x"]}})).is_err()
        );
    }
}
