//! Sleeps, to test kill/stop/timeouts. With argv[1] = N it sleeps N seconds,
//! prints `slept N` (println! panics if stdout is broken) and exits 0; without
//! it, it sleeps forever.

use std::io::Write;
use std::time::Duration;

fn main() {
    let limit: Option<u64> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    println!("sleeping");
    let _ = std::io::stdout().flush();
    match limit {
        Some(secs) => {
            for _ in 0..secs {
                std::thread::sleep(Duration::from_secs(1));
            }
            println!("slept {secs}");
        }
        None => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}
