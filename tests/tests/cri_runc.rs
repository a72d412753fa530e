//! The CRI harness proven on runc: pods and containers driven through the CRI as kubelet
//! drives them, so that the Kiln tests that follow compare against a known-good runtime.

use std::net::Ipv4Addr;
use std::time::Duration;

use kiln_e2e::cri::{
    self, BUSYBOX, ContainerSpec, LogLine, PodSpec, SANDBOX_IMAGE, State, Stream, cri,
};

const HANDLER: &str = "runc";
const WAIT: Duration = Duration::from_secs(60);
const MIB: i64 = 1024 * 1024;

/// The log lines of `c` once its stdout and stderr hold `stdout` and `stderr` lines (the CRI
/// writes the log file from its own copy loop, which may finish after the exit is reported).
fn logs_when(c: &cri::Container, stdout: usize, stderr: usize) -> Vec<LogLine> {
    let mut last = Err(String::new());
    let got = kiln_e2e::wait_until(Duration::from_secs(10), || {
        last = c.logs();
        let lines = last.as_ref().ok()?;
        let count = |s| lines.iter().filter(|l| l.stream == s).count();
        (count(Stream::Stdout) >= stdout && count(Stream::Stderr) >= stderr).then(|| lines.clone())
    });
    got.unwrap_or_else(|| panic!("log of {} incomplete: {last:?}", c.id))
}

#[test]
fn echo_reaches_exited_and_its_log_has_lines_and_stream_tags() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("echo", HANDLER)).unwrap();
    assert!(pod.ready().unwrap(), "the sandbox is not ready");
    assert_eq!(pod.ip().unwrap(), None, "a host-network pod has no pod IP");
    let c = pod
        .run(&ContainerSpec::busybox_sh(
            "echo",
            "echo one; echo two >&2; echo 'three  spaced'; printf last",
        ))
        .unwrap();
    let s = c.wait_exited(WAIT).unwrap();
    assert_eq!(s.exit_code, 0, "{s:?}");
    assert_eq!(s.reason, "Completed", "{s:?}");
    // containerd stamps started_at when StartContainer returns, and finished_at with the
    // shim's exit time: for a container this short the exit can come first.
    assert!(
        s.started_at >= s.raw.created_at
            && s.finished_at >= s.raw.created_at
            && s.raw.created_at > 0,
        "times: {s:?}"
    );
    assert_eq!(s.raw.log_path, c.log_path.to_string_lossy());

    let lines = logs_when(&c, 3, 1);
    let tags: Vec<(Stream, bool, &str)> = lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| (l.stream, l.partial, l.content.as_str()))
        .collect();
    assert_eq!(
        tags,
        [
            (Stream::Stdout, false, "one"),
            (Stream::Stdout, false, "three  spaced"),
            // No newline before the stream ended: a partial line.
            (Stream::Stdout, true, "last"),
        ],
        "{lines:#?}"
    );
    assert_eq!(
        cri::stream_text(&lines, Stream::Stdout),
        "one\nthree  spaced\nlast"
    );
    assert_eq!(cri::stream_text(&lines, Stream::Stderr), "two\n");
}

#[test]
fn exit_code_and_reason_of_a_failing_container() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("exit3", HANDLER)).unwrap();
    let c = pod
        .run(&ContainerSpec::busybox_sh(
            "exit3",
            "echo failing >&2; exit 3",
        ))
        .unwrap();
    let s = c.wait_exited(WAIT).unwrap();
    assert_eq!(s.exit_code, 3, "{s:?}");
    assert_eq!(s.reason, "Error", "{s:?}");
    let lines = logs_when(&c, 0, 1);
    assert_eq!(cri::stream_text(&lines, Stream::Stderr), "failing\n");
}

#[test]
fn stop_with_a_grace_period_ends_a_sleeper() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("stop", HANDLER)).unwrap();
    // `sleep` is PID 1 of its PID namespace: it ignores SIGTERM, so the grace period runs out
    // and the runtime sends SIGKILL.
    let c = pod
        .run(&ContainerSpec::new("sleeper", BUSYBOX).command(["/bin/sleep", "3600"]))
        .unwrap();
    c.wait_state(State::Running, WAIT).unwrap();
    c.stop(2).unwrap();
    let s = c.status().unwrap();
    assert_eq!(
        s.state,
        State::Exited,
        "StopContainer returned before the exit: {s:?}"
    );
    assert!(
        s.exit_code == 137 || s.exit_code == 143,
        "a stopped sleeper exits 137 (SIGKILL) or 143 (SIGTERM): {s:?}"
    );
    // Stopping again is a no-op, and the container can be removed on its own.
    c.stop(2).unwrap();
    c.remove().unwrap();
    let err = c.status().unwrap_err();
    assert!(err.is_not_found(), "status of a removed container: {err}");
}

#[test]
fn stats_report_usage_and_the_memory_limit() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("stats", HANDLER)).unwrap();
    let limit = 64 * MIB;
    let c = pod
        .run(
            &ContainerSpec::busybox_sh(
                "busy",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 3600",
            )
            .memory_limit(limit),
        )
        .unwrap();
    c.wait_state(State::Running, WAIT).unwrap();
    // The loop has burnt some CPU once the sleep is PID 1's program.
    let comm = kiln_e2e::wait_until(Duration::from_secs(30), || {
        let r = c.exec_sync(&["cat", "/proc/1/cmdline"], WAIT).ok()?;
        r.stdout.starts_with("sleep").then_some(r)
    });
    assert!(comm.is_some(), "the container never reached its sleep");

    let s = c.stats().unwrap();
    let cpu = s
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref());
    assert!(cpu.is_some_and(|v| v.value > 0), "cpu: {:?}", s.cpu);
    let mem = s.memory.as_ref().expect("memory stats");
    let ws = mem.working_set_bytes.as_ref().map_or(0, |v| v.value);
    assert!(ws > 0 && ws < limit as u64, "working set {ws}: {mem:?}");
    // containerd 1.7 and later also report what is left below the limit.
    if let Some(avail) = &mem.available_bytes {
        assert_eq!(avail.value + ws, limit as u64, "{mem:?}");
    }
    assert_eq!(
        s.attributes.as_ref().map(|a| a.id.as_str()),
        Some(c.id.as_str())
    );

    // The limit as the container's cgroup has it, read from inside through ExecSync.
    let file = if kiln_e2e::cgroup_v2() {
        "/sys/fs/cgroup/memory.max"
    } else {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    };
    let r = c.exec_sync(&["cat", file], WAIT).unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), limit.to_string(), "{r:?}");
    let info = c.status_info().unwrap();
    assert_eq!(
        info["runtimeSpec"]["linux"]["resources"]["memory"]["limit"], limit,
        "{info}"
    );

    let listed = pod.container_stats().unwrap();
    assert!(
        listed
            .iter()
            .any(|l| l.attributes.as_ref().is_some_and(|a| a.id == c.id)),
        "ListContainerStats of the pod lacks {}: {listed:?}",
        c.id
    );
    let ps = pod.stats().unwrap();
    let linux = ps.linux.as_ref().expect("linux pod stats");
    let pod_ws = linux
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    // Against the container's figure in the same snapshot: the one read above came before
    // the ExecSync `cat`s had exited, and usage can shrink in between.
    let same_time_ws = linux
        .containers
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == c.id))
        .and_then(|s| s.memory.as_ref()?.working_set_bytes.as_ref())
        .map(|v| v.value);
    let container_ws = same_time_ws.expect("the pod's stats include its container");
    assert!(
        pod_ws >= container_ws && container_ws > 0,
        "pod working set {pod_ws} < the container's {container_ws}: {ps:?}"
    );
    let pod_cpu = linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    assert!(pod_cpu > 0, "pod cpu: {ps:?}");
    assert_eq!(
        ps.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.id.as_str())
    );
    let all = cri.list_pod_stats().unwrap();
    assert!(
        all.iter()
            .any(|p| p.attributes.as_ref().is_some_and(|a| a.id == pod.id)),
        "ListPodSandboxStats lacks the pod"
    );
}

#[test]
fn exec_sync_returns_output_and_exit_code() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("exec", HANDLER)).unwrap();
    let c = pod
        .run(&ContainerSpec::new("sleeper", BUSYBOX).command(["/bin/sleep", "3600"]))
        .unwrap();
    c.wait_state(State::Running, WAIT).unwrap();
    let r = c
        .exec_sync(&["/bin/sh", "-c", "echo out; echo err >&2; exit 5"], WAIT)
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (5, "out\n", "err\n")
    );
}

#[test]
fn removing_a_pod_leaves_no_process_mount_or_cgroup() {
    let cri = cri();
    let pod = cri.run_pod(PodSpec::new("cleanup", HANDLER)).unwrap();
    let sleeper = pod
        .run(&ContainerSpec::new("sleeper", BUSYBOX).command(["/bin/sleep", "3600"]))
        .unwrap();
    let done = pod
        .run(&ContainerSpec::busybox_sh("done", "echo done"))
        .unwrap();
    sleeper.wait_state(State::Running, WAIT).unwrap();
    done.wait_exited(WAIT).unwrap();
    let traces = pod.traces().unwrap();
    assert_eq!(traces.containers.len(), 2, "{traces:?}");
    // The check sees a live pod: shim, pause and sleeper processes, rootfs mounts, cgroups.
    let live = traces.leftovers();
    for kind in ["process ", "mount ", "cgroup directory "] {
        assert!(
            live.iter().any(|l| l.starts_with(kind)),
            "a running pod shows no {kind}trace: {live:#?}"
        );
    }
    pod.remove().unwrap();
    traces.assert_gone(Duration::from_secs(10));
}

#[test]
fn images_are_listed_and_inspected() {
    let cri = cri();
    let images = cri.list_images().unwrap();
    for want in [BUSYBOX, SANDBOX_IMAGE] {
        assert!(
            images.iter().any(|i| i.repo_tags.iter().any(|t| t == want)),
            "ListImages lacks {want}: {images:?}"
        );
    }
    let bb = cri.image_status(BUSYBOX).unwrap().expect("busybox status");
    assert!(bb.id.starts_with("sha256:"), "{bb:?}");
    assert!(bb.size > 0, "{bb:?}");
    assert_eq!(
        cri.image_status("docker.io/kiln-test/absent:1")
            .unwrap()
            .map(|i| i.id),
        None
    );
}

#[test]
fn unknown_runtime_handler_is_refused() {
    let cri = cri();
    let err = cri
        .run_pod(PodSpec::new("nohandler", "no-such-handler"))
        .unwrap_err();
    assert!(err.code.is_some(), "{err}");
    assert!(err.message.contains("no-such-handler"), "{err}");
}

#[test]
fn a_pod_network_serves_http_inside_the_harness_namespace() {
    let cri = cri();
    let pod = cri
        .run_pod(PodSpec::new("web", HANDLER).pod_network())
        .unwrap();
    let ip = pod.ip().unwrap().expect("a pod-network pod has an IP");
    let addr: Ipv4Addr = ip.parse().expect("an IPv4 pod IP");
    assert_eq!(
        addr.octets()[..3],
        [10, 88, 0],
        "outside the pod subnet: {ip}"
    );
    let script = format!(
        "mkdir -p /www && echo 'hello from {}' > /www/index.html && exec httpd -f -p 8080 -h /www",
        pod.name
    );
    let c = pod
        .run(&ContainerSpec::new("web", BUSYBOX).command(["/bin/busybox", "sh", "-c", &script]))
        .unwrap();
    c.wait_state(State::Running, WAIT).unwrap();
    let mut last = String::new();
    let resp = kiln_e2e::wait_until(Duration::from_secs(20), || {
        match cri.http_get(&ip, 8080, "/index.html") {
            Ok(r) if r.starts_with("HTTP/1.") => Some(r),
            Ok(r) => {
                last = r;
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    })
    .unwrap_or_else(|| panic!("no HTTP answer from {ip}:8080: {last}"));
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    assert!(
        resp.ends_with(&format!("\r\n\r\nhello from {}\n", pod.name)),
        "{resp}"
    );

    // The bridge is in the harness's namespace, not on the host.
    let host = std::process::Command::new("ip")
        .args(["link", "show", "kiln-cri0"])
        .output()
        .unwrap();
    assert!(!host.status.success(), "kiln-cri0 exists on the host");
    let inside = std::process::Command::new("ip")
        .args(["-n", &cri.netns, "link", "show", "kiln-cri0"])
        .output()
        .unwrap();
    assert!(inside.status.success(), "no kiln-cri0 in {}", cri.netns);

    let traces = pod.traces().unwrap();
    assert!(traces.netns.is_some(), "no network namespace in {traces:?}");
    pod.remove().unwrap();
    traces.assert_gone(Duration::from_secs(10));
}

#[test]
fn pull_from_a_registry_run_inside_the_namespace() {
    let cri = cri();
    let registry = cri.start_registry().unwrap();
    // An image of its own (busybox plus a marker): RemoveImage removes an image by id, with
    // every tag of it, so the shared busybox must not be the one pulled and removed.
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let img = kiln_image::Image {
        reference: kiln_image::Reference::parse("kiln-test/pulled:1").expect("reference"),
        platform: kiln_image::Platform::parse(&format!("linux/{arch}")).expect("platform"),
        config: kiln_image::ImageConfig::Oci(kiln_image::ExecConfig {
            entrypoint: vec!["/bin/busybox".into()],
            cmd: vec!["echo".into(), "pulled".into()],
            ..kiln_image::ExecConfig::default()
        }),
        layers: vec![
            kiln_image::Layer::tar(&[
                kiln_image::Entry::file("/bin/busybox", 0o755, busybox),
                kiln_image::Entry::file(
                    "/pulled",
                    0o644,
                    format!("{}\n", std::process::id()).into_bytes(),
                ),
            ])
            .expect("layer"),
        ],
    };
    let tar = cri.dir.join("pulled.tar");
    std::fs::write(&tar, img.to_tar().expect("image tarball")).expect("write the tarball");
    let reference = registry
        .push(&tar, "kiln-test/pulled:1")
        .unwrap_or_else(|out| panic!("skopeo could not push {}:\n{out}", tar.display()));
    assert_eq!(cri.image_status(&reference).unwrap().map(|i| i.id), None);

    let id = cri.pull_image(&reference).unwrap();
    assert!(id.starts_with("sha256:"), "PullImage returned {id:?}");
    let pulled = cri.image_status(&reference).unwrap().expect("pulled image");
    assert_eq!(pulled.id, id);
    assert!(pulled.repo_tags.contains(&reference), "{pulled:?}");
    assert!(
        cri.list_images().unwrap().iter().any(|i| i.id == id),
        "ListImages lacks the pulled image"
    );

    // The image's own entrypoint and cmd.
    let pod = cri.run_pod(PodSpec::new("pulled", HANDLER)).unwrap();
    let c = pod.run(&ContainerSpec::new("echo", &reference)).unwrap();
    let s = c.wait_exited(WAIT).unwrap();
    assert_eq!(s.exit_code, 0, "{s:?}");
    assert_eq!(
        cri::stream_text(&logs_when(&c, 1, 0), Stream::Stdout),
        "pulled\n"
    );
    pod.remove().unwrap();

    cri.remove_image(&reference).unwrap();
    assert_eq!(cri.image_status(&reference).unwrap().map(|i| i.id), None);
}
