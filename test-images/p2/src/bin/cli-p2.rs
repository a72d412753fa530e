//! The p1 workloads printargs, fileio and exitcode in one WASI preview 2 command component
//! (exports `wasi:cli/run`), so the tests can check that a component sees the same argv,
//! environment, preopens and mounts as a module, and that its exit status reaches containerd.
//!
//! Usage:
//!   cli-p2 [args [ARG ...]]      print argv, the environment (sorted by key) and the cwd
//!   cli-p2 read PATH             print the file's content
//!   cli-p2 write PATH TEXT       write TEXT to PATH (created or truncated)
//!   cli-p2 ls PATH               list the entries of a directory, sorted
//!   cli-p2 exit N                `std::process::exit(N)`
//!   cli-p2 exit-with-code N      `wasi:cli/exit#exit-with-code(N)`, N in 0..=255
//!
//! Two exit modes because they reach the host differently: on wasm32-wasip2 std's `exit`
//! calls `wasi:cli/exit.exit(result)`, which carries only ok or error, so any N != 0 arrives
//! as "error" (wasmtime reports 1); `exit-with-code` carries the code itself. It was unstable
//! before WASI 0.2.12; the `wasip2` crate imports it as `wasi:cli/exit@0.2.12`, which
//! wasmtime-wasi 48.0.8 links unconditionally (a host on an older WASI 0.2 would fail to
//! instantiate this component, in every mode, for want of that one function). Failures and
//! usage errors print a message on stderr and exit through std's `exit`, so the host sees 1.

use std::io::Write;
use std::process::exit;

fn fail(msg: String) -> ! {
    eprintln!("{msg}");
    exit(1);
}

fn usage() -> ! {
    eprintln!(
        "usage: cli-p2 [args [ARG ...]] | read PATH | write PATH TEXT | ls PATH | exit N | exit-with-code N"
    );
    exit(1);
}

fn print_args_env() {
    for (i, arg) in std::env::args().enumerate() {
        println!("arg[{i}]={arg}");
    }
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    for (key, value) in vars {
        println!("env:{key}={value}");
    }
    match std::env::current_dir() {
        Ok(dir) => println!("cwd={}", dir.display()),
        Err(_) => println!("cwd=?"),
    }
}

fn read(path: &str) {
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

fn write(path: &str, text: &str) {
    match std::fs::write(path, text.as_bytes()) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => fail(format!("write failed: {path}: {e}")),
    }
}

fn ls(path: &str) {
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

fn parse<T: std::str::FromStr>(arg: &str) -> T {
    match arg.parse() {
        Ok(n) => n,
        Err(_) => {
            eprintln!("cli-p2: not a valid exit code: {arg}");
            exit(1);
        }
    }
}

fn flush_stdout() {
    // Exiting does not run destructors: flush what was printed first.
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None | Some("args") => print_args_env(),
        Some("read") if args.len() == 3 => read(&args[2]),
        Some("write") if args.len() == 4 => write(&args[2], &args[3]),
        Some("ls") if args.len() == 3 => ls(&args[2]),
        Some("exit") if args.len() == 3 => {
            let code: i32 = parse(&args[2]);
            println!("exiting with {code}");
            flush_stdout();
            exit(code);
        }
        Some("exit-with-code") if args.len() == 3 => {
            let code: u8 = parse(&args[2]);
            println!("exiting with code {code}");
            flush_stdout();
            wasip2::cli::exit::exit_with_code(code);
            // The host must not return from exit-with-code.
            unreachable!("wasi:cli/exit#exit-with-code returned");
        }
        _ => usage(),
    }
}
