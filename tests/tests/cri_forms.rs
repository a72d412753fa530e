//! Every Wasm image form through the CRI, pulled from a registry as kubelet pulls, run in a
//! Kiln pod: the compat form, runwasi's layer form, and the two artifact forms `ctr run`
//! cannot run (their configs are not OCI image configs; the CRI needs the pod to give a
//! command, as it does for any image without one). And a wasi:http component as a pod's
//! server, on the node's network and on a pod network, stopped with a grace period.
//! containerd 1.6 refuses the Wasm-layer forms at pull (asserted).

use std::sync::OnceLock;
use std::time::Duration;

use kiln_e2e::cri::{self, ContainerSpec, PodSpec, State, Stream, cri};
use kiln_image::{BuildOptions, Format, ModuleSource};

const HANDLER: &str = "kiln";
const WAIT: Duration = Duration::from_secs(60);

fn is_1_6(cri: &cri::Cri) -> bool {
    cri.runtime_version
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with("1.6."))
}

/// Pushes `wasm` in `format` as `kiln-test/NAME:1` and returns the reference.
fn push(registry: &cri::Registry, name: &str, file: &str, wasm: Vec<u8>, format: Format) -> String {
    let c = cri();
    let mut opts = BuildOptions::new("unused", format!("kiln-test/{name}:1"));
    opts.module = ModuleSource::Bytes {
        name: file.to_string(),
        data: wasm,
    };
    opts.format = format;
    let tar = c.dir.join(format!("{name}.tar"));
    let file = std::fs::File::create(&tar).expect("create");
    kiln_image::build(&opts, file).expect("build the image");
    registry
        .push(&tar, &format!("kiln-test/{name}:1"))
        .unwrap_or_else(|out| panic!("push {name}:\n{out}"))
}

fn test_image(name: &str) -> Vec<u8> {
    let dir = kiln_e2e::test_images_dir().expect("the test images");
    std::fs::read(dir.join(format!("{name}.wasm"))).expect("read the module")
}

#[test]
fn every_image_form_pulled_through_the_cri_runs_hello() {
    let c = cri();
    let hello = test_image("hello");
    let registry = c.start_registry().expect("start the registry");
    let pod = c.run_pod(PodSpec::new("forms", HANDLER)).unwrap();
    for (name, format) in [
        ("forms-compat", Format::Compat),
        ("forms-layer", Format::Layer),
        ("forms-artifact", Format::Artifact),
        ("forms-wasm-to-oci", Format::WasmToOci),
    ] {
        let reference = push(&registry, name, "hello.wasm", hello.clone(), format);
        let pulled = c.pull_image(&reference);
        if is_1_6(c) && format != Format::Compat {
            let e = pulled.expect_err("1.6 refuses a Wasm-layer image at pull");
            assert!(
                e.message
                    .contains("mismatched image rootfs and manifest layers"),
                "{name}: {e}"
            );
            continue;
        }
        pulled.unwrap_or_else(|e| panic!("{name}: pull: {e}"));
        // The artifact configs carry no command: the pod names the module, as a pod must
        // for any image without one. The name picks nothing here (one Wasm layer).
        let spec = match format {
            Format::Artifact | Format::WasmToOci => {
                ContainerSpec::new(name, &reference).command(["hello.wasm"])
            }
            _ => ContainerSpec::new(name, &reference),
        };
        let ctr = pod.run(&spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = ctr.wait_exited(WAIT).unwrap();
        assert_eq!(
            (s.exit_code, s.reason.as_str()),
            (0, "Completed"),
            "{name}: {s:?}"
        );
        let lines = kiln_e2e::wait_until(Duration::from_secs(10), || {
            let l = ctr.logs().ok()?;
            (!l.is_empty()).then_some(l)
        })
        .unwrap_or_else(|| panic!("{name}: no log"));
        assert_eq!(
            cri::stream_text(&lines, Stream::Stdout),
            "Hello from Kiln!\n",
            "{name}"
        );
    }
    pod.remove().unwrap();
}

#[test]
fn a_component_command_in_the_artifact_form_runs_with_its_exit_code() {
    let c = cri();
    if is_1_6(c) {
        return;
    }
    let registry = c.start_registry().expect("start the registry");
    let reference = push(
        &registry,
        "forms-cli-p2",
        "cli-p2.wasm",
        test_image("cli-p2"),
        Format::Artifact,
    );
    c.pull_image(&reference).unwrap();
    let pod = c.run_pod(PodSpec::new("forms-p2", HANDLER)).unwrap();
    let ctr = pod
        .run(
            &ContainerSpec::new("cli", &reference)
                .command(["cli-p2.wasm"])
                .args(["exit-with-code", "9"]),
        )
        .unwrap();
    let s = ctr.wait_exited(WAIT).unwrap();
    assert_eq!(s.exit_code, 9, "{s:?}");
    pod.remove().unwrap();
}

/// The http-p2 image (compat form), imported into the CRI's namespace.
fn http_image() -> String {
    static DONE: OnceLock<()> = OnceLock::new();
    let c = cri();
    DONE.get_or_init(|| {
        let dir = kiln_e2e::test_images_dir().expect("the test images");
        let out = c.import(&dir.join("http-p2.tar"), true);
        assert!(out.success(), "import http-p2:\n{out}");
    });
    kiln_e2e::image("http-p2")
}

fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn an_http_component_serves_in_a_pod_on_the_nodes_network_and_stops_with_0() {
    let c = cri();
    let image = http_image();
    let port = kiln_e2e::net::free_port();
    let pod = c.run_pod(PodSpec::new("http-host", HANDLER)).unwrap();
    let ctr = pod
        .run(
            &ContainerSpec::new("server", &image)
                .env("KILN_HTTP_ADDR", &format!("127.0.0.1:{port}")),
        )
        .unwrap();
    ctr.wait_state(State::Running, WAIT).unwrap();
    let resp = kiln_e2e::wait_until(Duration::from_secs(30), || {
        c.http_get("127.0.0.1", port, "/from-the-node").ok()
    })
    .expect("the server answers on the node's loopback");
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert!(resp.contains("path=/from-the-node"), "{resp}");
    let trap = c.http_get("127.0.0.1", port, "/trap").expect("GET /trap");
    assert_eq!(status_of(&trap), Some(500), "{trap}");
    // StopContainer: SIGTERM, the server drains and exits 0 well within the grace period.
    ctr.stop(10).unwrap();
    let s = ctr.status().unwrap();
    assert_eq!((s.state, s.exit_code), (State::Exited, 0), "{s:?}");
    // Each request's line is in the container's log.
    let lines = ctr.logs().unwrap();
    let out = cri::stream_text(&lines, Stream::Stdout);
    assert!(out.contains("http-p2: GET /from-the-node -> 200"), "{out}");
    assert!(out.contains("http-p2: GET /trap -> trap"), "{out}");
    pod.remove().unwrap();
}

#[test]
fn an_http_component_serves_on_its_pods_ip_at_8080() {
    let c = cri();
    let image = http_image();
    let pod = c
        .run_pod(PodSpec::new("http-pod", HANDLER).pod_network())
        .unwrap();
    let ip = pod.ip().unwrap().expect("the pod has an IP");
    let ctr = pod.run(&ContainerSpec::new("server", &image)).unwrap();
    ctr.wait_state(State::Running, WAIT).unwrap();
    let resp = kiln_e2e::wait_until(Duration::from_secs(30), || {
        c.http_get(&ip, 8080, "/via-the-pod-ip").ok()
    })
    .unwrap_or_else(|| panic!("nothing answers on {ip}:8080"));
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert!(resp.contains("path=/via-the-pod-ip"), "{resp}");
    ctr.stop(10).unwrap();
    assert_eq!(ctr.status().unwrap().exit_code, 0);
    pod.remove().unwrap();
}
