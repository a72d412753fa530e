//! `wat2wasm IN.wat OUT.wasm`: the WAT workloads' build step. Rust cannot emit some
//! instructions the tests need (table.grow), so those workloads are written in WAT, and
//! this keeps the build to cargo and a registry crate rather than an external toolkit.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        eprintln!("usage: wat2wasm IN.wat OUT.wasm");
        return ExitCode::from(2);
    };
    let wasm = match wat::parse_file(input) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("wat2wasm: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(output, wasm) {
        eprintln!("wat2wasm: cannot write {output}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
