//! Network probes for a WASI preview 2 component (wasi:sockets through Rust std), so the tests
//! can check which network a container gets: none, the host's, or its own namespace.
//!
//! Usage:
//!   net-p2 connect HOST:PORT   connect over TCP; prints `connected ADDR`, `refused ADDR` or
//!                              `error HOST:PORT: KIND: MESSAGE`
//!   net-p2 listen PORT         bind 0.0.0.0:PORT (0 picks a port), print `listening ADDR`,
//!                              accept one connection (`accepted PEER`), read one line from it,
//!                              send it back and print `echoed N bytes`
//!   net-p2 resolve NAME        print `address IP` for each address NAME resolves to
//!
//! Every outcome is a line on stdout, because std's `exit` on wasm32-wasip2 can only report
//! success or failure: 0 when the probe succeeded, 1 otherwise (refused, error, usage).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::process::exit;

fn out(line: String) {
    let mut stdout = std::io::stdout().lock();
    // A probe whose result cannot be printed is a failed probe.
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: net-p2 connect HOST:PORT | listen PORT | resolve NAME");
    exit(1);
}

fn connect(target: &str) -> bool {
    let addrs = match target.to_socket_addrs() {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(e) => {
            out(format!("error {target}: {:?}: {e}", e.kind()));
            return false;
        }
    };
    if addrs.is_empty() {
        out(format!("error {target}: NotFound: no address"));
        return false;
    }
    // Like TcpStream::connect, try each address, but say what happened to each one.
    let mut ok = false;
    for addr in addrs {
        match TcpStream::connect(addr) {
            Ok(_) => {
                out(format!("connected {addr}"));
                ok = true;
                break;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => out(format!("refused {addr}")),
            Err(e) => out(format!("error {addr}: {:?}: {e}", e.kind())),
        }
    }
    ok
}

fn listen(port: &str) -> bool {
    let port: u16 = match port.parse() {
        Ok(port) => port,
        Err(_) => usage(),
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(e) => {
            out(format!("error bind 0.0.0.0:{port}: {:?}: {e}", e.kind()));
            return false;
        }
    };
    match listener.local_addr() {
        Ok(addr) => out(format!("listening {addr}")),
        Err(_) => out(format!("listening 0.0.0.0:{port}")),
    }
    let (stream, peer) = match listener.accept() {
        Ok(conn) => conn,
        Err(e) => {
            out(format!("error accept: {:?}: {e}", e.kind()));
            return false;
        }
    };
    out(format!("accepted {peer}"));
    let mut line = Vec::new();
    let mut reader = BufReader::new(&stream);
    if let Err(e) = reader.read_until(b'\n', &mut line) {
        out(format!("error read: {:?}: {e}", e.kind()));
        return false;
    }
    let mut writer = &stream;
    if let Err(e) = writer.write_all(&line).and_then(|()| writer.flush()) {
        out(format!("error write: {:?}: {e}", e.kind()));
        return false;
    }
    out(format!("echoed {} bytes", line.len()));
    true
}

fn resolve(name: &str) -> bool {
    match (name, 0).to_socket_addrs() {
        Ok(addrs) => {
            let mut any = false;
            for addr in addrs {
                out(format!("address {}", addr.ip()));
                any = true;
            }
            if !any {
                out(format!("error {name}: NotFound: no address"));
            }
            any
        }
        Err(e) => {
            out(format!("error {name}: {:?}: {e}", e.kind()));
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ok = match (args.get(1).map(String::as_str), args.len()) {
        (Some("connect"), 3) => connect(&args[2]),
        (Some("listen"), 3) => listen(&args[2]),
        (Some("resolve"), 3) => resolve(&args[2]),
        _ => usage(),
    };
    exit(if ok { 0 } else { 1 });
}
