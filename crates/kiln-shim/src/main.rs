//! `containerd-shim-kiln-v1`: containerd's runtime v2 shim for WebAssembly.
//!
//! One binary, three roles, picked by containerd's command line:
//! * `start`: start (or find) the shim server for this container and print its address;
//! * `delete`: clean up after a shim that died (containerd runs it after every disconnect);
//! * no action: the long-lived server that answers the Task API;
//! * `zygote`: a replacement zygote, started by a server whose zygote died.
//!
//! The bootstrap is written here rather than taken from `containerd_shim::run`: that function
//! speaks containerd 2.x's JSON `start` reply and serves only `containerd.task.v3.Task`, and
//! containerd 1.6 and 1.7 (still on most nodes) need a bare address and `containerd.task.v2.Task`.
//! Everything else (flags, socket naming, logger, publisher, mounts, protos) is the crate's.

mod create;
mod drain;
mod events;
mod exits;
mod group;
mod image;
mod logging;
mod manager;
mod metrics;
mod seccomp;
mod server;
mod service;
mod table;
mod task;
mod zygote_client;

use std::process::ExitCode;

/// The runtime name containerd knows Kiln by.
pub const RUNTIME_NAME: &str = "io.containerd.kiln.v1";

fn main() -> ExitCode {
    // One malloc arena for the shim and for what it forks (zygote, workers). glibc gives each
    // new thread an arena of its own, whose first pages cost some 150-200 KiB resident for good:
    // the shim's blocking-pool threads and a worker's runtime thread would each add one per
    // container, and none of them allocates enough at once to contend. An HTTP server, whose
    // requests allocate on several threads, raises the limit again.
    // SAFETY: mallopt before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("zygote") {
        // A replacement zygote, exec'd by a shim whose zygote died.
        logging::init_detached();
        let _ = kiln_worker::LOG_REDIRECT.set(logging::redirect_to);
        return ExitCode::from(kiln_worker::zygote::exec_main() as u8);
    }
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_NAME}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!(
            "{}:\n  Runtime: {RUNTIME_NAME}\n  Version: {}",
            args[0],
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => manager::start(&flags),
        "delete" => manager::delete(&flags),
        "" => server::serve(&flags),
        other => Err(anyhow::anyhow!("unknown action {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{RUNTIME_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
