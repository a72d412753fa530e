//! The connection to containerd and the namespace every request carries.

use std::path::Path;

use anyhow::{Context, Result};
use containerd_client::tonic::Request;
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;

/// The header containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

#[derive(Clone)]
pub struct Ctx {
    pub channel: Channel,
    pub namespace: String,
    // Parsed once: containerd-client's `with_namespace!` parses (and unwraps) on every call.
    header: MetadataValue<Ascii>,
}

impl Ctx {
    pub async fn connect(address: &Path, namespace: &str) -> Result<Ctx> {
        let header = namespace
            .parse::<MetadataValue<Ascii>>()
            .with_context(|| format!("namespace '{namespace}' is not a valid header value"))?;
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("connect to containerd at {}", address.display()))?;
        Ok(Ctx {
            channel,
            namespace: namespace.to_string(),
            header,
        })
    }

    /// `msg` as a request in the probe's namespace.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.header.clone());
        req
    }
}
