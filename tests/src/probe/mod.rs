//! `kiln-probe`: times the phases of one task's life through containerd's gRPC API, without
//! `ctr`'s own start-up and client-side work (see `src/bin/kiln-probe.rs` and
//! `scripts/bench-probe.sh`).
//!
//! It lives in the library so that its pure parts (options, index and config parsing, the
//! spec, statistics) are unit-tested; [`client`], [`events`], [`image::resolve`] and [`round`]
//! talk to containerd.

pub mod args;
pub mod client;
pub mod events;
pub mod image;
pub mod report;
pub mod round;
pub mod spec;
pub mod stats;
