//! Burns CPU for N seconds of wall-clock time (argv[1], default 1), for CPU quota and
//! throttling tests: under a quota the same wall time buys fewer iterations, and the
//! cgroup's throttling counters grow.
//!
//! Prints `spinning N s`, then `spun N s: I iterations` and exits 0. The loop reads the
//! monotonic clock only every few thousand iterations, so nearly all the time is guest code.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

/// Iterations of the arithmetic loop between two clock reads.
const BATCH: u64 = 4096;

fn main() {
    let secs: u64 = match std::env::args().nth(1) {
        None => 1,
        Some(arg) => match arg.parse() {
            Ok(secs) => secs,
            Err(_) => {
                eprintln!("spin: not a number of seconds: {arg}");
                std::process::exit(2);
            }
        },
    };
    println!("spinning {secs} s");
    let _ = std::io::stdout().flush();
    let deadline = Duration::from_secs(secs);
    let start = Instant::now();
    let mut iterations: u64 = 0;
    let mut acc: u64 = 1;
    while start.elapsed() < deadline {
        for _ in 0..BATCH {
            // An xorshift step: cheap, and black_box keeps the optimizer from removing it.
            acc ^= acc << 13;
            acc ^= acc >> 7;
            acc ^= acc << 17;
            acc = black_box(acc);
        }
        iterations += BATCH;
    }
    println!("spun {secs} s: {iterations} iterations");
}
