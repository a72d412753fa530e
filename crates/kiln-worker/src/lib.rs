//! The worker side of Kiln: a zygote process that forks one worker per container, and the
//! worker that runs the container's module in Wasmtime.
//!
//! Guest code never runs in the shim: a trap in Cranelift-compiled code, a runaway guest or a
//! Wasmtime bug can then only take down one worker, and the kernel accounts each guest to its
//! container's cgroup. The shim is a multi-threaded tokio process, and forking a multi-threaded
//! process is undefined behaviour (locks held by other threads stay locked in the child). So
//! the shim forks the **zygote** once, before its runtime starts any thread; the zygote stays
//! single-threaded for its whole life and forks workers on request. A fork of a small
//! single-threaded process costs a fraction of a millisecond, where an exec of the shim binary
//! costs milliseconds (loading, relocating, re-creating the engine): cold start is Kiln's
//! headline, so the zygote it is.
//!
//! Process tree: the shim has the zygote and every worker as children (the zygote clones
//! workers with `CLONE_PARENT`), so the shim reaps its workers itself and a zygote that dies
//! loses no exit.

mod binary;
mod compile;
pub mod engine;
pub mod http;
mod p2;
mod pod;
pub mod process;
pub mod protocol;
mod run;
mod signals;
pub mod status;
mod stdio;
mod worker;
pub mod zygote;

pub use protocol::{SpawnRequest, Stdio, WorkerReport, ZygoteEvent};
pub use status::{EXIT_KILLED, EXIT_SETUP_FAILED, EXIT_TRAP};

/// Set by the shim before it forks the zygote: points a worker's log records at its own
/// container's log pipe (`(container id, path of the pipe)`). The worker calls it first thing.
pub static LOG_REDIRECT: std::sync::OnceLock<fn(&str, &std::path::Path)> =
    std::sync::OnceLock::new();
