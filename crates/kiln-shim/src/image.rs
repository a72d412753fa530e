//! The container's image, read from containerd over its gRPC API, for the image forms whose
//! module is a layer of its own (runwasi's component layer, the CNCF Wasm artifact,
//! wasm-to-oci): containerd unpacks no such layer into the rootfs, so the shim finds it as
//! containerd's own clients do: container → image → index → manifest → layers, in the
//! content store of the request's namespace.
//!
//! Only a container whose rootfs does not hold its entrypoint gets here, so the images Kiln
//! has always run (a `.wasm` file in a tar layer) cost no gRPC call. The connection is made on
//! first use and kept (tonic reconnects it if containerd restarts).

use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetContainerRequest, GetImageRequest, ReadContentRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Request};
use kiln_plan::ImageLayer;
use oci_spec::image::{ImageIndex, ImageManifest};
use tokio::sync::OnceCell;

/// One call's time limit: containerd answers these from its metadata and content stores.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest index or manifest read (containerd's own limit for manifests is 4 MiB).
const MAX_MANIFEST: i64 = 4 << 20;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why no layer was found.
#[derive(Debug)]
pub enum LayerError {
    /// The image could not be read.
    Read(String),
    /// It was read, and no layer can be chosen.
    Choose(String),
}

impl From<String> for LayerError {
    fn from(e: String) -> LayerError {
        LayerError::Read(e)
    }
}

/// containerd's API, as the shim uses it.
pub struct Images {
    address: String,
    channel: OnceCell<Channel>,
}

impl Images {
    /// For containerd's gRPC socket at `address` (the shim's `-address` flag).
    pub fn new(address: &str) -> Images {
        Images {
            address: address.trim_start_matches("unix://").to_string(),
            channel: OnceCell::new(),
        }
    }

    async fn channel(&self) -> Result<Channel, String> {
        self.channel
            .get_or_try_init(|| async {
                tokio::time::timeout(CALL_TIMEOUT, containerd_client::connect(&self.address))
                    .await
                    .map_err(|_| format!("connect to containerd at {}: timed out", self.address))?
                    .map_err(|e| format!("connect to containerd at {}: {e}", self.address))
            })
            .await
            .cloned()
    }

    /// The Wasm layer container `id` runs, if its image has one: the only one, or the one
    /// `arg0` names by title.
    pub async fn wasm_layer(
        &self,
        namespace: &str,
        id: &str,
        arg0: &str,
    ) -> Result<Option<ImageLayer>, LayerError> {
        let channel = self.channel().await?;
        let container = call(
            ContainersClient::new(channel.clone()).get(request(
                GetContainerRequest { id: id.to_string() },
                namespace,
            )?),
            "get the container",
        )
        .await?
        .container
        .ok_or_else(|| "containerd returned no container".to_string())?;
        if container.image.is_empty() {
            return Ok(None);
        }
        let image = call(
            ImagesClient::new(channel.clone()).get(request(
                GetImageRequest {
                    name: container.image.clone(),
                },
                namespace,
            )?),
            &format!("get image {}", container.image),
        )
        .await?
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| format!("image {} has no target", container.image))?;

        let mut manifest_digest = image.digest.clone();
        let mut body = self
            .read(&channel, namespace, &image.digest, 0, MAX_MANIFEST)
            .await?;
        if INDEX_TYPES.contains(&image.media_type.as_str()) {
            let index = ImageIndex::from_reader(body.as_slice())
                .map_err(|e| format!("image {}: its index: {e}", container.image))?;
            let chosen = kiln_image::wasm_manifest(&index).ok_or_else(|| {
                format!(
                    "image {}: its index lists no manifest for a Wasm platform \
                     (wasi/wasm, wasip1/wasm or wasip2/wasm)",
                    container.image
                )
            })?;
            manifest_digest = chosen.digest().to_string();
            body = self
                .read(&channel, namespace, &manifest_digest, 0, MAX_MANIFEST)
                .await?;
        }
        let manifest = ImageManifest::from_reader(body.as_slice())
            .map_err(|e| format!("image {}: manifest {manifest_digest}: {e}", container.image))?;
        let layers = kiln_image::wasm_layers(&manifest);
        let Some(layer) = kiln_image::select_layer(&layers, arg0)
            .map_err(|e| LayerError::Choose(format!("image {}: {e}", container.image)))?
        else {
            return Ok(None);
        };
        let head = self.read(&channel, namespace, &layer.digest, 0, 8).await?;
        Ok(Some(ImageLayer {
            digest: layer.digest,
            media_type: layer.media_type,
            size: layer.size,
            head,
        }))
    }

    /// The blob `digest` in a memfd, for a worker.
    pub async fn blob(&self, namespace: &str, digest: &str) -> Result<OwnedFd, String> {
        let channel = self.channel().await?;
        let fd =
            nix::sys::memfd::memfd_create(c"kiln-layer", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| format!("memfd: {e}"))?;
        let mut file = std::fs::File::from(fd);
        let mut stream = call(
            ContentClient::new(channel).read(request(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    size: 0,
                },
                namespace,
            )?),
            &format!("read {digest}"),
        )
        .await?;
        loop {
            let next = tokio::time::timeout(CALL_TIMEOUT, stream.message())
                .await
                .map_err(|_| format!("read {digest}: timed out"))?
                .map_err(|e| format!("read {digest}: {}", status(&e)))?;
            let Some(chunk) = next else { break };
            // Writes to a memfd are memory copies: not worth a blocking thread.
            file.write_all(&chunk.data)
                .map_err(|e| format!("copy {digest} into a memfd: {e}"))?;
        }
        file.rewind().map_err(|e| format!("memfd: {e}"))?;
        Ok(file.into())
    }

    /// At most `size` bytes of `digest` from `offset` (`size` 0: all of it).
    async fn read(
        &self,
        channel: &Channel,
        namespace: &str,
        digest: &str,
        offset: i64,
        size: i64,
    ) -> Result<Vec<u8>, String> {
        let mut stream = call(
            ContentClient::new(channel.clone()).read(request(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset,
                    size,
                },
                namespace,
            )?),
            &format!("read {digest}"),
        )
        .await?;
        let mut out = Vec::new();
        while let Some(chunk) = tokio::time::timeout(CALL_TIMEOUT, stream.message())
            .await
            .map_err(|_| format!("read {digest}: timed out"))?
            .map_err(|e| format!("read {digest}: {}", status(&e)))?
        {
            out.extend_from_slice(&chunk.data);
            if size > 0 && out.len() as i64 >= size {
                out.truncate(size as usize);
                break;
            }
        }
        Ok(out)
    }
}

/// `req` in containerd namespace `namespace`.
fn request<T>(req: T, namespace: &str) -> Result<Request<T>, String> {
    let mut r = Request::new(req);
    let value = namespace
        .parse()
        .map_err(|_| format!("namespace {namespace:?} cannot be sent to containerd"))?;
    r.metadata_mut().insert("containerd-namespace", value);
    Ok(r)
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    what: &str,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(format!("{what}: {}", status(&e))),
        Err(_) => Err(format!(
            "{what}: containerd did not answer in {CALL_TIMEOUT:?}"
        )),
    }
}

fn status(s: &tonic::Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}
