//! `native-echo`: the native counterpart of the `http-p2` test component for
//! scripts/bench-http.sh, so that a runc container serves the same bytes over the same HTTP
//! stack (hyper 1, HTTP/1.1 with keep-alive, a multi-thread tokio runtime sized to the CPUs
//! it may use) and the difference to Kiln is the Wasm part only.
//!
//! Every path answers 200 with `method=M`, `path=P` (with the query) and `x-kiln-test=V`
//! (values joined by `,`; `x-kiln-test absent` without it), as `http-p2` does, and prints
//! `native-echo: METHOD PATH -> 200` to stdout, the container's log, as `http-p2` prints
//! its line. It listens on `KILN_HTTP_ADDR` (`host:port`, or a port), else on `0.0.0.0:8080`,
//! and exits 0 on SIGTERM or SIGINT (as a container's pid 1 it has no default action for them).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{SignalKind, signal};

fn listen_addr() -> Result<SocketAddr, String> {
    let value = std::env::var("KILN_HTTP_ADDR").unwrap_or_else(|_| "0.0.0.0:8080".to_string());
    let full = if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) {
        format!("0.0.0.0:{value}")
    } else {
        value.clone()
    };
    full.parse()
        .map_err(|_| format!("KILN_HTTP_ADDR={value:?} is not host:port or a port"))
}

async fn echo(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let values: Vec<String> = req
        .headers()
        .get_all("x-kiln-test")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let header = if values.is_empty() {
        "x-kiln-test absent".to_string()
    } else {
        format!("x-kiln-test={}", values.join(","))
    };
    let body = format!("method={method}\npath={path}\n{header}\n");
    {
        // A log that cannot be written is not worth failing a request.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "native-echo: {method} {path} -> 200").and_then(|()| out.flush());
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() {
    let addr = match listen_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("native-echo: {e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("native-echo: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("native-echo: watch signals: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("native-echo: serving HTTP on {addr}");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        eprintln!("native-echo: accept: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service_fn(echo))
                        .await;
                });
            }
        }
    }
}
