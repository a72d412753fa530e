//! Executes a Wasm `unreachable` instruction after some output, to test how
//! the shim reports a trap (and that buffered output is not lost).

use std::io::Write;

fn main() {
    println!("about to trap");
    let _ = std::io::stdout().flush();
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}
