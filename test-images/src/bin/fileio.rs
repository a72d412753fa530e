//! Exercises the filesystem the shim exposes to the module.
//!
//! Usage:
//!   fileio read PATH         print the file's content
//!   fileio write PATH TEXT   write TEXT to PATH (created or truncated)
//!   fileio ls PATH           list entries of a directory, sorted
//!   fileio open PATH MODE    open PATH for reading (r), writing (w) or both (rw), print
//!                            "opened PATH", and touch no data (device-node probes)
//!   fileio mkdir PATH        create a directory

use std::io::Write;
use std::process::exit;

fn fail(msg: String) -> ! {
    eprintln!("{msg}");
    exit(1);
}

fn usage() -> ! {
    fail("usage: fileio read PATH | write PATH TEXT | ls PATH | open PATH r|w|rw | mkdir PATH".to_string());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("read") if args.len() == 3 => {
            let path = &args[2];
            match std::fs::read(path) {
                Ok(data) => {
                    let mut out = std::io::stdout().lock();
                    if let Err(e) = out.write_all(&data).and_then(|()| out.flush()) {
                        fail(format!("write to stdout failed: {e}"));
                    }
                }
                Err(e) => fail(format!("read failed: {path}: {e}")),
            }
        }
        Some("write") if args.len() == 4 => {
            let path = &args[2];
            match std::fs::write(path, args[3].as_bytes()) {
                Ok(()) => println!("wrote {path}"),
                Err(e) => fail(format!("write failed: {e}")),
            }
        }
        Some("ls") if args.len() == 3 => {
            let path = &args[2];
            let entries = match std::fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) => fail(format!("ls failed: {path}: {e}")),
            };
            let mut names = Vec::new();
            for entry in entries {
                match entry {
                    Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
                    Err(e) => fail(format!("ls failed: {path}: {e}")),
                }
            }
            names.sort();
            for name in names {
                println!("{name}");
            }
        }
        Some("open") if args.len() == 4 => {
            let path = &args[2];
            let (read, write) = match args[3].as_str() {
                "r" => (true, false),
                "w" => (false, true),
                "rw" => (true, true),
                _ => usage(),
            };
            match std::fs::OpenOptions::new().read(read).write(write).open(path) {
                Ok(_) => println!("opened {path}"),
                Err(e) => fail(format!("open failed: {path}: {e}")),
            }
        }
        Some("mkdir") if args.len() == 3 => {
            let path = &args[2];
            match std::fs::create_dir(path) {
                Ok(()) => println!("created {path}"),
                Err(e) => fail(format!("mkdir failed: {path}: {e}")),
            }
        }
        _ => usage(),
    }
}
