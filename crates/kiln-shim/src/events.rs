//! Publishing task events to containerd, each one awaited.
//!
//! containerd-shim's `RemotePublisher` queues an event and sends it from a background task, so
//! its `publish` returns before containerd has the event. containerd sends Shutdown right
//! after Delete, and a shim that then exits could lose its last TaskExit or TaskDelete (the
//! throughput benchmark saw the forward cut off with "broken pipe" a few times per hundred
//! containers). Kiln waits for containerd's reply to every forward instead, retrying once on a
//! fresh connection.

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::{Client, EventsClient};
use containerd_shim::protos::ttrpc;
use tokio::sync::Mutex;

/// How long one forward may take before it is counted as failed.
const FORWARD_TIMEOUT_NS: i64 = 5_000_000_000;

/// A connection to containerd's event service.
pub struct Publisher {
    address: String,
    client: Mutex<Option<EventsClient>>,
}

impl Publisher {
    /// Connects to containerd's TTRPC address.
    pub async fn connect(address: &str) -> Result<Publisher, String> {
        let client = connect(address).await?;
        Ok(Publisher {
            address: address.to_string(),
            client: Mutex::new(Some(client)),
        })
    }

    /// Sends `event` under `topic` and waits until containerd has accepted it.
    pub async fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        let mut envelope = Envelope::new();
        envelope.set_topic(topic.to_string());
        envelope.set_namespace(namespace.to_string());
        envelope.set_timestamp(containerd_shim::util::timestamp().map_err(|e| e.to_string())?);
        envelope
            .set_event(containerd_shim::util::convert_to_any(event).map_err(|e| e.to_string())?);
        let mut req = ForwardRequest::new();
        req.set_envelope(envelope);

        let mut slot = self.client.lock().await;
        let mut last = String::new();
        for _ in 0..2 {
            if slot.is_none() {
                *slot = Some(connect(&self.address).await?);
            }
            let Some(client) = slot.as_ref() else {
                continue;
            };
            match client
                .forward(ttrpc::context::with_timeout(FORWARD_TIMEOUT_NS), &req)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    last = e.to_string();
                    // Reconnect and try once more.
                    *slot = None;
                }
            }
        }
        Err(format!("forward {topic}: {last}"))
    }
}

async fn connect(address: &str) -> Result<EventsClient, String> {
    let addr = address.to_string();
    let fd = tokio::task::spawn_blocking(move || containerd_shim::util::connect(addr))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to containerd at {address}: {e}"))?;
    // SAFETY: `fd` is a connected unix socket we own; the client takes ownership.
    let client = unsafe { Client::from_raw_unix_socket_fd(fd) };
    Ok(EventsClient::new(client))
}
