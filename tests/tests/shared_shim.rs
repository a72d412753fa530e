//! `KILN_SHIM_GROUPING=namespace`: the containers of a containerd namespace share one shim
//! process; each container's log lines still reach containerd after earlier containers are
//! gone; the shim exits once it has been idle.

use std::time::Duration;

use kiln_e2e::{Container, Kiln, children_of, image, kiln_with_env, parent_of, wait_until};

fn k() -> &'static Kiln {
    kiln_with_env(&[
        ("KILN_SHIM_GROUPING", "namespace"),
        ("KILN_SHIM_IDLE_SECS", "2"),
    ])
}

/// The shim server serving a worker: the worker's parent (the zygote clones workers with
/// CLONE_PARENT).
fn shim_of(worker: u32) -> u32 {
    parent_of(worker).expect("worker's parent")
}

/// Shim server processes of this test binary's containerd (their `-address` is our socket).
fn servers(k: &Kiln) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-kiln-v1"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-address" && w[1] == k.sock.as_bytes());
        // The server is forked from `start` and drops that word from its command line.
        let server = !args.iter().any(|a| *a == b"start" || *a == b"delete");
        let parent_is_shim = parent_of(pid)
            .and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
            .is_some_and(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .is_some_and(|a| a.ends_with(b"containerd-shim-kiln-v1"))
            });
        if is_shim && ours && server && !parent_is_shim {
            out.push(pid);
        }
    }
    out
}

fn start_sleeper(c: &Container) -> u32 {
    let out = c.run(&image("sleep")).detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("RUNNING", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

fn stop(c: &Container) {
    let _ = c.kill(Some("SIGKILL"));
    let _ = c.wait_status("STOPPED", Duration::from_secs(5));
    let _ = c.delete_task();
    let _ = c.delete_container();
}

// One test drives the whole sequence: the shim's lifetime spans the containers, so parallel
// tests in this binary would see each other's shim.
#[test]
fn containers_of_a_namespace_share_one_shim() {
    let k = k();

    // Two sleepers: one shim server between them, separate workers.
    let a = k.container("shared-a");
    let b = k.container("shared-b");
    let pa = start_sleeper(&a);
    let pb = start_sleeper(&b);
    assert_ne!(pa, pb);
    let shim = shim_of(pa);
    assert_eq!(shim, shim_of(pb), "the two containers have different shims");
    assert_eq!(servers(k), vec![shim], "exactly one shim server");

    // A shared shim's descriptors bound how many containers it serves: the v1 OOM watch keeps
    // only its eventfd, not the `memory.oom_control` it was registered for.
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{shim}/fd"))
        .expect("the shim's fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with("memory.oom_control"))
        .collect();
    assert!(held.is_empty(), "the shim holds {held:?} open");

    // The zygote dies: the running containers are the shim's own children and go on; the next
    // Create gets a new zygote (exec'd) and runs in the same shim.
    let zygote = children_of(shim)
        .into_iter()
        .find(|p| *p != pa && *p != pb)
        .expect("the shim's zygote");
    // SAFETY: kill(2) on the zygote we just identified.
    assert_eq!(unsafe { libc::kill(zygote as i32, libc::SIGKILL) }, 0);
    let reaped = wait_until(Duration::from_secs(5), || {
        (!children_of(shim).contains(&zygote)).then_some(())
    });
    assert!(reaped.is_some(), "the dead zygote {zygote} was not reaped");
    let e = k.container("shared-after-zygote");
    let pe = start_sleeper(&e);
    assert_eq!(shim_of(pe), shim, "the new container has another shim");
    let new_zygote = children_of(shim)
        .into_iter()
        .find(|p| ![pa, pb, pe].contains(p))
        .expect("a new zygote");
    let cmdline = std::fs::read(format!("/proc/{new_zygote}/cmdline")).unwrap_or_default();
    assert!(
        cmdline.split(|b| *b == 0).any(|a| a == b"zygote"),
        "the replacement is an exec'd zygote: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    for c in [&a, &b] {
        assert_eq!(
            c.task().map(|t| t.status).as_deref(),
            Some("RUNNING"),
            "{}",
            c.id
        );
    }
    stop(&e);

    // Killing one leaves the other running.
    let out = a.kill(Some("SIGKILL"));
    assert!(out.success(), "{out}");
    assert!(a.wait_status("STOPPED", Duration::from_secs(2)).is_some());
    assert_eq!(b.task().map(|t| t.status).as_deref(), Some("RUNNING"));
    stop(&a);

    // With a gone, b's log lines must still reach containerd: kill b and look for its exit
    // line, which the shim writes to b's own log pipe.
    stop(&b);
    let log = std::fs::read_to_string(k.log_path()).unwrap_or_default();
    let line = format!("container {} exited with 137", b.id);
    assert!(
        log.contains(&line),
        "containerd's log lacks {line:?}: lines for later containers are lost"
    );

    // A later container reuses the still-running shim.
    let c = k.container("shared-hello");
    let out = c.run(&image("hello")).output();
    assert_eq!(out.stdout, "Hello from Kiln!\n", "{out}");
    assert_eq!(
        servers(k),
        vec![shim],
        "hello did not reuse the shared shim"
    );

    // Idle with no containers: the shim exits after KILN_SHIM_IDLE_SECS.
    let gone = wait_until(Duration::from_secs(10), || {
        servers(k).is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "the idle shared shim is still running: {:?}",
        servers(k)
    );

    // And the next container starts a new one.
    let d = k.container("shared-after");
    let out = d.run(&image("hello")).output();
    assert_eq!(out.stdout, "Hello from Kiln!\n", "{out}");
}
