//! The Wasmtime engine configurations Kiln uses.
//!
//! The configuration is part of the compile cache's key (through the engine's compatibility
//! hash), so it lives in one place.

use wasmtime::{Config, Engine, OptLevel, Strategy};

/// The optimizing configuration: what the zygote's engine and the HTTP servers' pooling engine
/// (which adds only an allocation strategy, not part of an artifact's compatibility) share.
pub fn config() -> Config {
    let mut config = Config::new();
    config.cranelift_opt_level(OptLevel::Speed);
    config.parallel_compilation(true);
    // Linear memory is initialised copy-on-write from the mapped artifact.
    config.memory_init_cow(true);
    config
}

/// Builds the engine. Called once in the zygote and inherited by every worker.
pub fn new_engine() -> wasmtime::Result<Engine> {
    Engine::new(&config())
}

/// Builds the baseline engine: Winch, a single-pass compiler, for the first start of a module
/// that is not in the compile cache yet.
///
/// On this project's 2-core nodes Winch compiles a 1.9 MB module in about 0.3 s where
/// Cranelift takes 1.1–1.5 s (40 KB: 16 ms against 65 ms), and its code runs about half as
/// fast. So a first start runs Winch's code while Cranelift's is compiled into the cache in the
/// background, and every later start maps Cranelift's. Only a worker with a cache miss builds
/// it (it is not kept in the zygote).
pub fn new_baseline_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.strategy(Strategy::Winch);
    config.parallel_compilation(true);
    config.memory_init_cow(true);
    Engine::new(&config)
}
