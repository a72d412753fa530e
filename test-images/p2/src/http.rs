//! `http-p2`: a `wasi:http/proxy` component (exports `wasi:http/incoming-handler`) for Kiln's
//! HTTP serving tests. Each route exercises one thing a host must get right: the request
//! reaching the guest intact, a trap confined to one request, a request that takes time
//! (concurrency, timeouts), outgoing requests (the sandbox's network policy), and the
//! container's directories in every request (read-only mounts staying read-only).
//!
//! Routes (any method):
//!   /trap              panics, so the instance traps before answering
//!   /slow?ms=N         answers `slept N ms` after N milliseconds (wasi:clocks monotonic-clock)
//!   /fetch?url=URL     GETs URL (percent-encoded, http or https) through
//!                      wasi:http/outgoing-handler and answers `status=S bytes=N` with the
//!                      upstream status and body length, or 502 and `error: ...`
//!   /read?path=P       answers the contents of the file P (percent-encoded; relative to the
//!                      working directory unless absolute), or 404/403/500 and `error: ...`
//!   /write?path=P&text=T  writes T (percent-encoded) to the file P and answers `wrote N bytes`,
//!                      or 403/500 and `error: ...` (403: the directory is read-only)
//!   anything else      answers 200 with `method=M`, `path=P` (with the query) and
//!                      `x-kiln-test=V` (values joined by `,`; `x-kiln-test absent` without it)
//!
//! Each request also prints one line, `http-p2: METHOD PATH -> STATUS` (or `-> trap`), to
//! stdout, which is the container's log.
//!
//! Built with Rust std, the component also imports
//! wasi:cli/{environment,exit,terminal-*} besides the proxy world, so a host must link those
//! too (`wasmtime serve` needs `-S cli`), as it must for most components built with std.

use std::io::Write;

use wasip2::clocks::monotonic_clock;
use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

wasip2::http::proxy::export!(Handler);

struct Handler;

impl Guest for Handler {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = method_name(&request.method());
        let path = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
        let (status, body) = match route {
            "/trap" => {
                log(&format!("http-p2: {method} {path} -> trap"));
                panic!("http-p2: /trap requested");
            }
            "/slow" => slow(query),
            "/fetch" => fetch(query),
            "/read" => read_file(query),
            "/write" => write_file(query),
            _ => (200, echo(&request, &method, &path)),
        };
        respond(response_out, status, body.as_bytes());
        log(&format!("http-p2: {method} {path} -> {status}"));
    }
}

/// One line to the container log. `println!` would panic (and so trap) if stdout were
/// closed; a log that cannot be written is not worth failing a request.
fn log(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
    .to_string()
}

fn echo(request: &IncomingRequest, method: &str, path: &str) -> String {
    let values = request.headers().get("x-kiln-test");
    let header = if values.is_empty() {
        "x-kiln-test absent".to_string()
    } else {
        let values: Vec<String> = values
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        format!("x-kiln-test={}", values.join(","))
    };
    format!("method={method}\npath={path}\n{header}\n")
}

fn slow(query: &str) -> (u16, String) {
    let Some(ms) = param(query, "ms").and_then(|ms| ms.parse::<u64>().ok()) else {
        return (400, "usage: /slow?ms=N\n".to_string());
    };
    monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    (200, format!("slept {ms} ms\n"))
}

fn fetch(query: &str) -> (u16, String) {
    let Some(url) = param(query, "url") else {
        return (400, "usage: /fetch?url=URL\n".to_string());
    };
    match get(&url) {
        Ok((status, bytes)) => (200, format!("status={status} bytes={bytes}\n")),
        Err(e) => (502, format!("error: {e}\n")),
    }
}

fn read_file(query: &str) -> (u16, String) {
    let Some(path) = param(query, "path") else {
        return (400, "usage: /read?path=P\n".to_string());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => (200, text),
        Err(e) => (io_status(&e), format!("error: {path}: {e}\n")),
    }
}

fn write_file(query: &str) -> (u16, String) {
    let (Some(path), Some(text)) = (param(query, "path"), param(query, "text")) else {
        return (400, "usage: /write?path=P&text=T\n".to_string());
    };
    match std::fs::write(&path, text.as_bytes()) {
        Ok(()) => (200, format!("wrote {} bytes\n", text.len())),
        Err(e) => (io_status(&e), format!("error: {path}: {e}\n")),
    }
}

fn io_status(e: &std::io::Error) -> u16 {
    match e.kind() {
        std::io::ErrorKind::NotFound => 404,
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => 403,
        _ => 500,
    }
}

/// GETs `url` and returns the status and the length of the body.
fn get(url: &str) -> Result<(u16, u64), String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(format!("not an http(s) URL: {url}"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err(format!("no host in URL: {url}"));
    }

    let request = OutgoingRequest::new(Fields::new());
    let set = request
        .set_scheme(Some(&scheme))
        .and_then(|()| request.set_authority(Some(authority)))
        .and_then(|()| request.set_path_with_query(Some(&path)));
    if set.is_err() {
        return Err(format!("host refused the URL parts of {url}"));
    }
    let body = request
        .body()
        .map_err(|()| "request body already taken".to_string())?;
    let future = outgoing_handler::handle(request, None).map_err(error_code)?;
    OutgoingBody::finish(body, None).map_err(error_code)?;

    let response = loop {
        match future.get() {
            Some(Ok(Ok(response))) => break response,
            Some(Ok(Err(e))) => return Err(error_code(e)),
            Some(Err(())) => return Err("response already taken".to_string()),
            None => future.subscribe().block(),
        }
    };
    let status = response.status();
    let bytes = body_len(&response)?;
    Ok((status, bytes))
}

fn body_len(response: &IncomingResponse) -> Result<u64, String> {
    let body = response
        .consume()
        .map_err(|()| "response body already taken".to_string())?;
    let stream = body
        .stream()
        .map_err(|()| "response body stream already taken".to_string())?;
    let mut total = 0u64;
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => total += chunk.len() as u64,
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!("reading the body: {}", e.to_debug_string()));
            }
        }
    }
    Ok(total)
}

fn error_code(e: ErrorCode) -> String {
    format!("{e:?}")
}

/// The percent-decoded value of `key` in a query string `a=1&b=2`.
fn param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: &u8| (*b as char).to_digit(16);
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(response_out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::new();
    // Both names and the value are constant and valid, so append cannot fail.
    let _ = headers.append("content-type", b"text/plain; charset=utf-8");
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(response_out, Ok(response));
    let Ok(mut stream) = outgoing.write() else {
        return;
    };
    // The client hung up if this fails; nothing is left to tell it.
    if stream.write_all(body).is_ok() {
        let _ = stream.blocking_flush();
    }
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}
