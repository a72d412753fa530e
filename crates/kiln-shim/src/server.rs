//! The long-lived shim server: fork the zygote, then serve the Task API over ttrpc.
//!
//! Order matters. The logger is set up first (the zygote and its workers inherit it), then the
//! zygote is forked while this process still has a single thread, and only then is the tokio
//! runtime built. The runtime is current-thread: the shim's work is waiting on sockets, and
//! every thread it does not start is memory a node with hundreds of containers keeps (work
//! that blocks goes to tokio's blocking threads, which exist only while needed).

use std::sync::Arc;

use anyhow::{Context, Result};
use containerd_shim::Flags;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use log::{debug, info};

use crate::exits::Exits;
use crate::service::Service;
use crate::zygote_client::ZygoteClient;

/// The Task API's service name in containerd 2.x (what the generated code registers).
const TASK_V3: &str = "containerd.task.v3.Task";
/// The same service as containerd 1.6 and 1.7 call it; the messages are identical.
const TASK_V2: &str = "containerd.task.v2.Task";

/// Runs the server until containerd shuts it down.
pub fn serve(flags: &Flags) -> Result<()> {
    if flags.socket.is_empty() {
        anyhow::bail!("the server needs -socket");
    }
    crate::logging::init(flags.debug, &flags.id).context("open containerd's log pipe")?;
    let _ = kiln_worker::LOG_REDIRECT.set(crate::logging::redirect_to);
    // The server runs in its first container's bundle, as `start` did: the same group.
    let group = crate::group::Grouping::from_env()?.group(&flags.id, std::path::Path::new("."));
    let zygote = kiln_worker::zygote::fork_zygote().context("start the zygote")?;
    debug!("zygote {} forked", zygote.pid);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    rt.block_on(run(flags, zygote, group))
}

async fn run(
    flags: &Flags,
    zygote: kiln_worker::zygote::ZygoteHandle,
    group: crate::group::Group,
) -> Result<()> {
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = crate::events::Publisher::connect(&ttrpc_address)
        .await
        .map_err(anyhow::Error::msg)
        .context("connect to containerd's event service")?;
    let exits = Arc::new(Exits::default());
    let client = ZygoteClient::start(zygote, exits.clone()).context("talk to the zygote")?;
    let service = Arc::new(Service::new(
        flags.namespace.clone(),
        publisher,
        client.clone(),
        group.shared.then(|| flags.socket.clone()),
        group.pod,
        &flags.address,
    ));

    tokio::spawn(crate::exits::reap(exits, client));
    tokio::spawn(crate::group::exit_when_idle(service.clone()));
    tokio::spawn(ignore_termination());

    let path = flags.socket.trim_start_matches("unix://").to_string();
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("listen on {path}"))?;
    let listener = Listener::try_from(listener).context("ttrpc listener")?;

    let task: Arc<dyn containerd_shim::protos::shim_async::Task + Send + Sync> = service.clone();
    let mut services = create_task(task.clone());
    let v2 = create_task(task)
        .remove(TASK_V3)
        .context("generated task service has an unexpected name")?;
    services.insert(TASK_V2.to_string(), v2);
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await.context("start the ttrpc server")?;
    signal_ready();
    info!("kiln shim serving on {path}");

    service.wait_for_shutdown().await;
    info!("kiln shim shutting down");
    let _ = server.shutdown().await;
    if !group.shared {
        // A shared server removed its socket itself, under the group lock.
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// Tells `start` that the server listens: closing our stdout (a pipe `start` reads to the end)
/// by pointing it at stderr.
fn signal_ready() {
    // SAFETY: dup2 on the standard descriptors.
    unsafe { libc::dup2(2, 1) };
}

/// containerd stops a shim with Shutdown, and kills it when it must; SIGTERM/SIGINT from a
/// terminal or a process-group kill must not take down running containers' bookkeeping.
async fn ignore_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => debug!("SIGTERM ignored; containerd uses Shutdown"),
            _ = int.recv() => debug!("SIGINT ignored; containerd uses Shutdown"),
        }
    }
}
