//! Grows linear memory 1 MiB at a time until `memory.grow` fails (or an
//! optional limit in MiB given as argv[1] is reached), touching every new
//! page so the memory is really committed. Used to test memory limits.
//!
//! Exit codes: 0 when the limit was reached, 12 when `memory.grow` failed.

use std::io::Write;

/// Wasm page size in bytes.
const PAGE: usize = 64 * 1024;
/// Pages per growth step (16 x 64 KiB = 1 MiB).
const STEP_PAGES: usize = 16;

#[cfg(target_arch = "wasm32")]
fn grow(pages: usize) -> usize {
    core::arch::wasm32::memory_grow(0, pages)
}

#[cfg(not(target_arch = "wasm32"))]
fn grow(_pages: usize) -> usize {
    usize::MAX
}

fn main() {
    let limit: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let mut grown_mib = 0usize;
    let mut out = std::io::stdout();
    loop {
        if let Some(limit) = limit
            && grown_mib >= limit
        {
            println!("reached {grown_mib} MiB");
            let _ = out.flush();
            std::process::exit(0);
        }
        let old_pages = grow(STEP_PAGES);
        if old_pages == usize::MAX {
            println!("memory.grow failed at {grown_mib} MiB");
            let _ = out.flush();
            std::process::exit(12);
        }
        let base = old_pages * PAGE;
        for i in 0..STEP_PAGES {
            let addr = (base + i * PAGE) as *mut u8;
            // SAFETY: the pages [old_pages, old_pages + STEP_PAGES) were just
            // added to linear memory 0 by memory.grow and nothing else owns
            // them; writing one byte per page commits the memory.
            unsafe { core::ptr::write_volatile(addr, 1) };
        }
        grown_mib += 1;
        if grown_mib.is_multiple_of(16) {
            println!("grown to {grown_mib} MiB");
            let _ = out.flush();
        }
    }
}
