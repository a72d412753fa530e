//! WASI preview 2 components: commands (`wasi:cli/run`) with the same args, env, preopens and
//! exit codes as modules, their sockets in the container's network namespace, and
//! `wasi:http/incoming-handler` servers: requests answered on loopback, a trapping request
//! answered 500 while the server goes on, every request's instance seeing the container's
//! mounts (read-only ones read-only) and working directory, SIGTERM draining the requests in
//! flight, a port in use refused at create, and a component Kiln cannot run refused with a
//! clear error.

use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_e2e::net::{self, free_port, wait_listening};
use kiln_e2e::{Kiln, Output, assert_refused, kiln, wait_until};

const CLI: &str = "docker.io/kiln-test/cli-p2:latest";
const NET: &str = "docker.io/kiln-test/net-p2:latest";
const HTTP: &str = "docker.io/kiln-test/http-p2:latest";
const NEITHER: &str = "docker.io/kiln-test/neither-p2:latest";

/// A component that exports an interface of its own and neither of Kiln's worlds.
const NEITHER_WAT: &str = r#"
(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "f")))
  (instance $x (export "go" (func $f)))
  (export "example:thing/api@1.0.0" (instance $x)))
"#;

fn images(k: &'static Kiln) -> &'static Kiln {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for w in ["cli-p2", "net-p2", "http-p2", "hello"] {
            let out = k.import(&k.images_dir.join(format!("{w}.tar")));
            assert!(out.success(), "import {w}:\n{out}");
        }
        let wasm = wat::parse_str(NEITHER_WAT).expect("wat");
        let img = kiln_image::Image::single_file(NEITHER, "/neither.wasm", wasm).expect("image");
        let out = k.import_image(&img);
        assert!(out.success(), "import neither:\n{out}");
    });
    k
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.success(), "ctr run failed:\n{out}");
}

#[test]
fn a_command_component_gets_args_env_and_its_working_directory() {
    let k = images(kiln());
    let c = k.container("p2-args");
    let out = c
        .run(CLI)
        .env("GREETING=hello p2")
        .args(["/cli-p2.wasm", "args", "one", "two words"])
        .output();
    assert_ok(&out);
    for line in [
        "arg[0]=/cli-p2.wasm",
        "arg[1]=args",
        "arg[2]=one",
        "arg[3]=two words",
        "env:GREETING=hello p2",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?}:\n{out}"
        );
    }
    // A relative path is resolved in process.cwd.
    let work = tempfile::tempdir().expect("tempdir");
    let c = k.container("p2-cwd");
    let out = c
        .run(CLI)
        .bind(work.path(), "/work", false)
        .opt("--cwd")
        .opt("/work")
        .args(["/cli-p2.wasm", "write", "relative.txt", "in the cwd"])
        .output();
    assert_ok(&out);
    assert_eq!(
        std::fs::read_to_string(work.path().join("relative.txt")).expect("written in the cwd"),
        "in the cwd"
    );
}

#[test]
fn a_command_components_exit_codes_reach_containerd() {
    let k = images(kiln());
    for (args, code) in [
        (vec!["exit-with-code", "42"], 42),
        (vec!["exit-with-code", "0"], 0),
        // std's exit on wasm32-wasip2 carries only ok or error: error is 1, as `wasmtime run`.
        (vec!["exit", "3"], 1),
        (vec!["nonsense"], 1),
    ] {
        let c = k.container("p2-exit");
        let out = c
            .run(CLI)
            .args(std::iter::once("/cli-p2.wasm").chain(args.iter().copied()))
            .output();
        assert_eq!(out.code(), code, "{args:?}:\n{out}");
        assert_eq!(c.exit_status(), None, "ctr run --rm leaves no task");
    }
}

#[test]
fn a_command_components_mounts_are_preopens_and_read_only_stays_read_only() {
    let k = images(kiln());
    let rw = tempfile::tempdir().expect("tempdir");
    let ro = tempfile::tempdir().expect("tempdir");
    std::fs::write(ro.path().join("given.txt"), "from the host\n").expect("write");

    let c = k.container("p2-rw");
    let out = c
        .run(CLI)
        .bind(rw.path(), "/data", false)
        .args(["/cli-p2.wasm", "write", "/data/out.txt", "from the guest"])
        .output();
    assert_ok(&out);
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out.txt")).expect("the guest's file"),
        "from the guest"
    );

    let c = k.container("p2-ro-read");
    let out = c
        .run(CLI)
        .bind(ro.path(), "/ro", true)
        .args(["/cli-p2.wasm", "read", "/ro/given.txt"])
        .output();
    assert_ok(&out);
    assert_eq!(out.stdout, "from the host\n");

    let c = k.container("p2-ro-write");
    let out = c
        .run(CLI)
        .bind(ro.path(), "/ro", true)
        .args(["/cli-p2.wasm", "write", "/ro/new.txt", "nope"])
        .output();
    assert_eq!(
        out.code(),
        1,
        "a write to a read-only mount must fail:\n{out}"
    );
    assert!(out.stderr.contains("write failed"), "{out}");
    assert!(!ro.path().join("new.txt").exists());
}

#[test]
fn a_component_in_the_layer_form_runs() {
    let k = images(kiln());
    if k.containerd_version() < (1, 7) {
        // containerd 1.6 refuses the image at import (tests/tests/layers.rs asserts it).
        return;
    }
    let mut opts = kiln_image::BuildOptions::new(k.wasm("cli-p2"), "kiln-test/cli-p2-layer:1");
    opts.format = kiln_image::Format::Layer;
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("img.tar");
    let file = std::fs::File::create(&tar).expect("create");
    kiln_image::build(&opts, file).expect("build");
    let out = k.import(&tar);
    assert!(out.success(), "{out}");
    let c = k.container("p2-layer");
    let out = c
        .run("docker.io/kiln-test/cli-p2-layer:1")
        .args(["/cli-p2.wasm", "exit-with-code", "7"])
        .output();
    assert_eq!(out.code(), 7, "{out}");
    assert!(out.stdout.contains("exiting with code 7"), "{out}");
}

/// The guest's sockets are the container's: in its own network namespace it cannot reach a
/// listener on the host's loopback; with the host's network it can.
#[test]
fn a_components_sockets_follow_the_containers_network_namespace() {
    let k = images(kiln());
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr").to_string();
    let accept = std::thread::spawn(move || listener.accept().is_ok());

    let c = k.container("p2-own-net");
    let out = c.run(NET).args(["/net-p2.wasm", "connect", &addr]).output();
    assert_eq!(
        out.code(),
        1,
        "its own namespace has no such listener:\n{out}"
    );
    assert!(!out.stdout.contains("connected"), "{out}");

    let c = k.container("p2-host-net");
    let out = c
        .run(NET)
        .opt("--net-host")
        .args(["/net-p2.wasm", "connect", &addr])
        .output();
    assert_ok(&out);
    assert!(out.stdout.contains(&format!("connected {addr}")), "{out}");
    assert!(
        accept.join().expect("accept thread"),
        "the host saw no connection"
    );

    // Listening works in its own namespace too (nothing outside can reach it).
    let c = k.container("p2-listen");
    let out = c.run(NET).args(["/net-p2.wasm", "listen", "0"]).detach();
    assert_ok(&out);
    let log = k.container_log(&c.id);
    let listening = wait_until(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("listening 0.0.0.0:").then_some(())
    });
    assert!(
        listening.is_some(),
        "no listener:\n{}",
        k.log_report(std::slice::from_ref(&c.id))
    );
    assert!(c.kill(Some("SIGKILL")).success());
}

/// An HTTP server on the host's network, on its own port.
struct Server {
    c: kiln_e2e::Container,
    addr: SocketAddr,
}

fn serve(k: &'static Kiln, name: &str) -> Server {
    serve_with(k, name, |r| r)
}

/// [`serve`], with more options for `ctr run` (mounts, a working directory).
fn serve_with(
    k: &'static Kiln,
    name: &str,
    opts: impl FnOnce(kiln_e2e::Run) -> kiln_e2e::Run,
) -> Server {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let c = k.container(name);
    let out = opts(c.run(HTTP))
        .opt("--net-host")
        .env(&format!("KILN_HTTP_ADDR={addr}"))
        .detach();
    assert_ok(&out);
    assert!(
        wait_listening(addr, Duration::from_secs(30)),
        "the server does not listen on {addr}:\n{}",
        k.log_report(std::slice::from_ref(&c.id))
    );
    Server { c, addr }
}

#[test]
fn an_http_component_answers_and_survives_a_trapping_request() {
    let k = images(kiln());
    let s = serve(k, "http-echo");
    let r = net::get(s.addr, "/hello?x=1", &[("x-kiln-test", "yes")]).expect("GET /hello");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "method=GET\npath=/hello?x=1\nx-kiln-test=yes\n");

    let r = net::get(s.addr, "/trap", &[]).expect("GET /trap");
    assert_eq!(r.status, 500, "a trap is a 500: {r:?}");
    for i in 0..3 {
        let r = net::get(s.addr, &format!("/after/{i}"), &[]).expect("GET after the trap");
        assert_eq!(r.status, 200, "the server goes on after a trap: {r:?}");
        assert!(r.body.contains(&format!("path=/after/{i}")), "{r:?}");
    }
    // Requests at once, each with its own instance.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let addr = s.addr;
            std::thread::spawn(move || net::get(addr, &format!("/c/{i}"), &[]))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t.join().expect("thread").expect("GET");
        assert_eq!(r.status, 200);
        assert!(r.body.contains(&format!("path=/c/{i}")), "{r:?}");
    }
    // Each request's line is in the container's log.
    let log = k.container_log(&s.c.id);
    let lines = wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("http-p2: GET /after/2 -> 200")
            .then_some(text)
    });
    let text = lines.unwrap_or_else(|| panic!("no request lines in {}", log.display()));
    assert!(text.contains("http-p2: GET /trap -> trap"), "{text}");
    assert_eq!(s.c.task().map(|t| t.status).as_deref(), Some("RUNNING"));
}

#[test]
fn every_request_sees_the_mounts_and_read_only_stays_read_only() {
    let k = images(kiln());
    let rw = tempfile::tempdir().expect("tempdir");
    let ro = tempfile::tempdir().expect("tempdir");
    std::fs::write(ro.path().join("given.txt"), "from the host\n").expect("write");
    let s = serve_with(k, "http-files", |r| {
        r.bind(rw.path(), "/data", false)
            .bind(ro.path(), "/ro", true)
            .opt("--cwd")
            .opt("/data")
    });
    let get = |path: &str| net::get(s.addr, path, &[]).expect(path);

    let r = get("/read?path=%2Fro%2Fgiven.txt");
    assert_eq!((r.status, r.body.as_str()), (200, "from the host\n"));
    let r = get("/write?path=%2Fro%2Fnew.txt&text=nope");
    assert_eq!(
        r.status, 403,
        "a write to a read-only mount must fail: {r:?}"
    );
    assert!(!ro.path().join("new.txt").exists());

    let r = get("/write?path=%2Fdata%2Fout.txt&text=from%20request%201");
    assert_eq!((r.status, r.body.as_str()), (200, "wrote 14 bytes\n"));
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out.txt")).expect("the guest's file"),
        "from request 1"
    );
    // A later request, with an instance of its own, sees what an earlier one wrote, also
    // through its working directory; the read-only mount is still read-only.
    let r = get("/read?path=out.txt");
    assert_eq!((r.status, r.body.as_str()), (200, "from request 1"));
    let r = get("/write?path=relative.txt&text=in%20the%20cwd");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        std::fs::read_to_string(rw.path().join("relative.txt")).expect("written in the cwd"),
        "in the cwd"
    );
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let w = net::get(addr, &format!("/write?path=%2Fro%2Fc{i}&text=x"), &[]);
                let r = net::get(addr, "/read?path=%2Fro%2Fgiven.txt", &[]);
                (w, r)
            })
        })
        .collect();
    for t in threads {
        let (w, r) = t.join().expect("thread");
        assert_eq!(w.expect("GET /write").status, 403);
        let r = r.expect("GET /read");
        assert_eq!((r.status, r.body.as_str()), (200, "from the host\n"));
    }
    assert_eq!(
        std::fs::read_dir(ro.path()).expect("read_dir").count(),
        1,
        "nothing was created in the read-only mount"
    );
}

/// A one-shot upstream on the host's loopback: answers one request with `body`.
fn upstream(body: &'static str) -> (SocketAddr, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, Write};
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = l.local_addr().expect("addr");
    let t = std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else {
            return String::new();
        };
        let mut r = std::io::BufReader::new(&s);
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let mut w = &s;
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        first
    });
    (addr, t)
}

#[test]
fn an_http_handlers_outgoing_requests_reach_the_network_it_is_on() {
    let k = images(kiln());
    let s = serve(k, "http-fetch");
    let (up, seen) = upstream("twelve bytes");
    let url = format!("http%3A%2F%2F{up}%2Fupstream%2Fpath");
    let r = net::get(s.addr, &format!("/fetch?url={url}"), &[]).expect("GET /fetch");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "status=200 bytes=12\n"),
        "{r:?}"
    );
    let first = seen.join().expect("upstream");
    assert!(
        first.starts_with("GET /upstream/path HTTP/1.1"),
        "{first:?}"
    );
}

#[test]
fn sigterm_drains_the_requests_in_flight_then_exits_0() {
    let k = images(kiln());
    let s = serve(k, "http-drain");
    let addr = s.addr;
    let slow = std::thread::spawn(move || {
        let t = Instant::now();
        (net::get(addr, "/slow?ms=2500", &[]), t.elapsed())
    });
    // The request is in the handler well before this.
    std::thread::sleep(Duration::from_millis(700));
    let out = s.c.kill(None);
    assert!(out.success(), "{out}");
    // No new connection is accepted once SIGTERM has arrived...
    let refused = wait_until(Duration::from_secs(2), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    assert!(refused.is_some(), "still accepting after SIGTERM");
    // ...the one in flight completes...
    let (r, took) = slow.join().expect("thread");
    let r = r.expect("the request in flight must complete");
    assert_eq!((r.status, r.body.as_str()), (200, "slept 2500 ms\n"));
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    // ...and then the task stops with 0.
    let stopped = s.c.wait_status("STOPPED", Duration::from_secs(10));
    assert!(stopped.is_some(), "the server did not stop after draining");
    assert_eq!(s.c.exit_status(), Some(0));
}

#[test]
fn sigkill_ends_a_server_at_once_with_137() {
    let k = images(kiln());
    let s = serve(k, "http-kill");
    let out = s.c.kill(Some("SIGKILL"));
    assert!(out.success(), "{out}");
    assert!(
        s.c.wait_status("STOPPED", Duration::from_secs(10))
            .is_some()
    );
    assert_eq!(s.c.exit_status(), Some(137));
}

#[test]
fn a_port_in_use_is_refused_at_create() {
    let k = images(kiln());
    let taken = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = taken.local_addr().expect("addr");
    let c = k.container("http-port-taken");
    let out = c
        .run(HTTP)
        .opt("--net-host")
        .env(&format!("KILN_HTTP_ADDR={addr}"))
        .output();
    assert_refused(k, &c.id, &out, "already in use");
    assert!(out.stderr.contains(&addr.to_string()), "{out}");
}

#[test]
fn a_component_exporting_neither_world_is_refused() {
    let k = images(kiln());
    let c = k.container("p2-neither");
    let out = c.run(NEITHER).output();
    assert_refused(
        k,
        &c.id,
        &out,
        "exports neither wasi:cli/run nor wasi:http/incoming-handler",
    );
    assert!(out.stderr.contains("example:thing/api@1.0.0"), "{out}");
}
