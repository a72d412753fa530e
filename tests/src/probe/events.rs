//! The `/tasks/exit` events of the probe's namespace, each stamped with the moment it arrived.
//!
//! A task that exits at once can report its exit before containerd has answered Start, so the
//! stream is read all the time by a task of its own, never only after Start returned: the time
//! a round records is when the event reached the probe, not when the probe got round to it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use containerd_client::events::{ContainerUpdate, TaskExit};
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::{PublishRequest, SubscribeRequest};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::Ctx;

const EXIT_TOPIC: &str = "/tasks/exit";
/// Published by the probe itself to learn when its subscription is live (see `start`).
const SYNC_TOPIC: &str = "/kiln-probe/sync";
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Exit {
    pub at: Instant,
    pub container_id: String,
    pub exit_status: u32,
}

enum Msg {
    Exit(Exit),
    Sync,
    Closed(String),
}

pub struct ExitWatcher {
    rx: mpsc::UnboundedReceiver<Msg>,
    reader: JoinHandle<()>,
}

impl Drop for ExitWatcher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl ExitWatcher {
    /// Subscribes, and returns once the subscription is known to be live.
    pub async fn start(ctx: &Ctx) -> Result<ExitWatcher> {
        let ns = &ctx.namespace;
        let filters = vec![
            format!("topic==\"{EXIT_TOPIC}\",namespace==\"{ns}\""),
            format!("topic==\"{SYNC_TOPIC}\",namespace==\"{ns}\""),
        ];
        let (tx, rx) = mpsc::unbounded_channel();
        let mut client = EventsClient::new(ctx.channel.clone());
        let request = ctx.req(SubscribeRequest { filters });
        let reader = tokio::spawn(async move {
            let closed = |why: String| {
                let _ = tx.send(Msg::Closed(why));
            };
            // containerd sends the response headers with the first event only, so this await
            // lasts until then: the reason it runs here and not before `start` returns.
            let mut stream = match client.subscribe(request).await {
                Ok(r) => r.into_inner(),
                Err(e) => return closed(format!("subscribe: {e}")),
            };
            loop {
                let envelope = match stream.message().await {
                    Ok(Some(e)) => e,
                    Ok(None) => return closed("containerd ended the stream".into()),
                    Err(e) => return closed(e.to_string()),
                };
                let at = Instant::now();
                let msg = match (envelope.topic.as_str(), envelope.event) {
                    (EXIT_TOPIC, Some(any)) => match TaskExit::decode(any.value.as_slice()) {
                        Ok(e) => Msg::Exit(Exit {
                            at,
                            container_id: e.container_id,
                            exit_status: e.exit_status,
                        }),
                        Err(e) => return closed(format!("undecodable TaskExit: {e}")),
                    },
                    (SYNC_TOPIC, _) => Msg::Sync,
                    _ => continue,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let mut watcher = ExitWatcher { rx, reader };
        watcher.sync(ctx).await?;
        Ok(watcher)
    }

    /// An event published before containerd registered the subscription is lost, and nothing
    /// tells when that happened: publish until one comes back.
    async fn sync(&mut self, ctx: &Ctx) -> Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut events = EventsClient::new(ctx.channel.clone());
        while Instant::now() < deadline {
            let payload = ContainerUpdate {
                id: "kiln-probe".into(),
                ..ContainerUpdate::default()
            };
            events
                .publish(ctx.req(PublishRequest {
                    topic: SYNC_TOPIC.into(),
                    event: Some(containerd_client::to_any(&payload)),
                }))
                .await
                .context("publish the probe's sync event")?;
            let wait = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    match self.rx.recv().await {
                        Some(Msg::Sync) => return Ok(()),
                        Some(Msg::Closed(why)) => bail!("the event stream ended: {why}"),
                        None => bail!("the event reader is gone"),
                        Some(Msg::Exit(_)) => {}
                    }
                }
            });
            if let Ok(r) = wait.await {
                return r;
            }
        }
        bail!("no event came back from containerd's event service within {SYNC_TIMEOUT:?}")
    }

    /// The next exit event of container `id`; exits of other containers are dropped.
    pub async fn wait_exit(&mut self, id: &str, timeout: Duration) -> Result<Exit> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => bail!("no {EXIT_TOPIC} event for {id} within {timeout:?}"),
                Ok(None) => bail!("the event reader is gone"),
                Ok(Some(Msg::Closed(why))) => bail!("the event stream ended: {why}"),
                Ok(Some(Msg::Exit(e))) if e.container_id == id => return Ok(e),
                Ok(Some(_)) => {}
            }
        }
    }
}
