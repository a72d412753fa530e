//! The one Wasmtime engine configuration Kiln uses.
//!
//! The configuration is part of the compile cache's key (through the engine's compatibility
//! hash), so it lives in one place.

use wasmtime::{Config, Engine, OptLevel};

/// Builds the engine. Called once in the zygote and inherited by every worker.
pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.cranelift_opt_level(OptLevel::Speed);
    config.parallel_compilation(true);
    // Linear memory is initialised copy-on-write from the mapped artifact.
    config.memory_init_cow(true);
    Engine::new(&config)
}
