//! Long-running containers: signals, `task ps` / `task metrics`, concurrency, and cleanup.

use std::time::{Duration, Instant};

use kiln_e2e::{
    Container, assert_cleaned_up, cgroup_dirs, children_of, image, kiln, memory_cgroup_of,
    mounts_containing, parent_of, processes_of, wait_until,
};

/// How long a task may take to be seen RUNNING after `ctr run -d` / the start of `ctr run`
/// (the first run compiles the module).
const START: Duration = Duration::from_secs(30);
/// How fast a killed task must be seen STOPPED (or gone).
const STOP: Duration = Duration::from_secs(1);

/// Starts a detached sleeper and returns its pid once it is RUNNING.
fn start_sleeper(c: &Container) -> u32 {
    let out = c.run(&image("sleep")).detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    let t = c
        .wait_status("RUNNING", START)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()));
    assert!(t.pid > 0, "no pid: {t:?}");
    t.pid
}

/// Sends `signal` and waits for the task to be STOPPED; returns how long that took.
fn kill_and_wait_stopped(c: &Container, signal: Option<&str>) -> Duration {
    let t0 = Instant::now();
    let out = c.kill(signal);
    assert!(out.success(), "ctr task kill failed:\n{out}");
    let stopped = wait_until(STOP, || c.task().filter(|t| t.status == "STOPPED"));
    let took = t0.elapsed();
    assert!(
        stopped.is_some(),
        "{} not STOPPED {STOP:?} after kill {signal:?} (took {took:?}); task: {:?}",
        c.id,
        c.task()
    );
    took
}

/// `ctr task kill` on a finished task must fail and say why.
fn assert_kill_refused(c: &Container) {
    let out = c.kill(None);
    assert!(
        !out.success(),
        "ctr task kill of a finished task succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("not found") || out.stderr.contains("already finished"),
        "the error must say the process is gone (not found / already finished):\n{out}"
    );
}

/// The stopped task's exit status (asked of containerd), then `ctr task delete`.
fn delete_and_get_status(c: &Container) -> i32 {
    let status = c
        .exit_status()
        .unwrap_or_else(|| panic!("{}: no exit status; task: {:?}", c.id, c.task()));
    let out = c.delete_task();
    assert!(out.success(), "ctr task delete failed:\n{out}");
    status as i32
}

#[test]
fn sigterm_stops_a_foreground_run_with_143() {
    let k = kiln();
    let c = k.container("sigterm-fg");
    let run = c.run(&image("sleep")).spawn();
    c.wait_status("RUNNING", START)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()));
    // RUNNING means started, not that the guest has printed yet; give it time to reach its
    // sleep so the output check below is about Kiln, not about who won the race.
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    let out = c.kill(None);
    assert!(out.success(), "ctr task kill failed:\n{out}");
    // STOPPED, or already deleted by `ctr run --rm`.
    let stopped = wait_until(STOP, || match c.task() {
        None => Some(()),
        Some(t) if t.status == "STOPPED" => Some(()),
        Some(_) => None,
    });
    let took = t0.elapsed();
    let out = run.wait(Duration::from_secs(15));
    assert!(
        stopped.is_some(),
        "{} still running {took:?} after SIGTERM; ctr run:\n{out}",
        c.id
    );
    assert_eq!(out.code(), 143, "SIGTERM must give exit status 143:\n{out}");
    assert!(out.stdout.contains("sleeping"), "{out}");
    assert_kill_refused(&c);
}

#[test]
fn sigterm_stops_a_detached_task_with_143() {
    let k = kiln();
    let c = k.container("sigterm-d");
    start_sleeper(&c);
    kill_and_wait_stopped(&c, None);
    assert_kill_refused(&c);
    assert_eq!(delete_and_get_status(&c), 143, "exit status after SIGTERM");
    let out = c.delete_container();
    assert!(out.success(), "{out}");
}

#[test]
fn sigkill_stops_a_detached_task_with_137() {
    let k = kiln();
    let c = k.container("sigkill-d");
    start_sleeper(&c);
    kill_and_wait_stopped(&c, Some("SIGKILL"));
    assert_kill_refused(&c);
    assert_eq!(delete_and_get_status(&c), 137, "exit status after SIGKILL");
    let out = c.delete_container();
    assert!(out.success(), "{out}");
}

#[test]
fn task_ps_cgroup_and_metrics() {
    let k = kiln();
    let c = k.container("ps-metrics");
    let pid = start_sleeper(&c);

    let pids = c.ps();
    assert!(
        pids.contains(&pid),
        "ctr task ps {} lists {pids:?}, not the task's pid {pid}",
        c.id
    );

    let cg = memory_cgroup_of(pid)
        .unwrap_or_else(|| panic!("no memory cgroup for pid {pid} (is it alive?)"));
    let want = format!("/default/{}", c.id);
    assert!(
        cg.ends_with(&want),
        "pid {pid} is in memory cgroup {cg:?}, expected one ending with {want:?}"
    );

    let (out, rows) = c.metrics();
    assert!(out.success(), "ctr task metrics failed:\n{out}");
    let get = |key: &str| {
        rows.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let usage = get("memory.usage_in_bytes").or_else(|| get("memory.usage"));
    assert!(
        usage.is_some_and(|u| u > 0),
        "no non-zero memory usage in the metrics:\n{out}"
    );
    assert!(
        get("pids.current").is_some_and(|p| p >= 1),
        "no pids.current >= 1 in the metrics:\n{out}"
    );

    kill_and_wait_stopped(&c, Some("SIGKILL"));
}

#[test]
fn two_containers_run_at_once() {
    let k = kiln();
    let a = k.container("twin-a");
    let b = k.container("twin-b");
    let pa = start_sleeper(&a);
    let pb = start_sleeper(&b);
    assert_ne!(pa, pb, "two containers report the same pid");
    // Both still running once the second one is up.
    let tasks = k.tasks();
    for (c, pid) in [(&a, pa), (&b, pb)] {
        let t = tasks.iter().find(|t| t.id == c.id);
        assert!(
            t.is_some_and(|t| t.status == "RUNNING" && t.pid == pid),
            "{} is not RUNNING with pid {pid}: {tasks:?}",
            c.id
        );
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} of {} does not exist",
            c.id
        );
    }
    // Killing one leaves the other running.
    kill_and_wait_stopped(&a, Some("SIGKILL"));
    assert_eq!(
        b.task().map(|t| t.status),
        Some("RUNNING".to_string()),
        "killing {} stopped {} too",
        a.id,
        b.id
    );
    kill_and_wait_stopped(&b, Some("SIGKILL"));
}

#[test]
fn nothing_left_after_rm() {
    let k = kiln();

    // A container that runs to completion.
    let c = k.container("cleanup-hello");
    let out = c.run(&image("hello")).output();
    assert!(out.success(), "{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(3));

    // A killed one. While it runs, the probes must see it (or they prove nothing).
    let c = k.container("cleanup-sleep");
    let run = c.run(&image("sleep")).spawn();
    let t = c
        .wait_status("RUNNING", START)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()));
    let procs = processes_of(&c.id);
    assert!(
        procs.iter().any(|(p, _)| *p == t.pid),
        "the worker pid {} is not found by the process probe: {procs:?}",
        t.pid
    );
    assert!(
        !cgroup_dirs("default", &c.id).is_empty(),
        "no cgroup directory found for a running container"
    );
    assert!(
        !mounts_containing(&c.id).is_empty(),
        "no rootfs mount found for a running container"
    );
    let out = c.kill(Some("SIGKILL"));
    assert!(out.success(), "{out}");
    let out = run.wait(Duration::from_secs(15));
    assert_eq!(out.code(), 137, "{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(3));
}

#[test]
fn a_crashed_shim_is_cleaned_up_by_the_delete_action() {
    let k = kiln();
    let c = k.container("shim-crash");
    let run = c.run(&image("sleep")).spawn();
    let t = c
        .wait_status("RUNNING", START)
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()));
    // The worker is the shim server's child (the zygote clones it with CLONE_PARENT).
    let shim = parent_of(t.pid).expect("the worker's parent");
    let cmdline = std::fs::read_to_string(format!("/proc/{shim}/cmdline")).unwrap_or_default();
    assert!(
        cmdline.contains("containerd-shim-kiln-v1") && cmdline.contains(&c.id),
        "pid {shim} is not this container's shim: {cmdline:?}"
    );
    // SAFETY: kill(2) on a pid we just identified as the shim.
    assert_eq!(unsafe { libc::kill(shim as i32, libc::SIGKILL) }, 0);
    // containerd notices the lost shim and runs `containerd-shim-kiln-v1 delete`, which must
    // end the orphaned worker and remove its cgroup and rootfs mount.
    let out = run.wait(Duration::from_secs(15));
    assert_ne!(out.code(), 0, "ctr run must report the loss:\n{out}");
    assert_cleaned_up(&c.id, Duration::from_secs(5));
}

#[test]
fn a_detached_container_outlives_the_client_that_read_its_output() {
    // `ctr run -d` without --log-uri hands the task FIFOs and exits at once; the guest's later
    // output must not make it fail (with runc the container keeps running as well).
    let k = kiln();
    let c = k.container("detached-print");
    let out = k.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.kiln.v1",
        &image("sleep"),
        &c.id,
        "/sleep.wasm",
        "1",
    ]);
    assert!(out.success(), "ctr run -d failed:\n{out}");
    let stopped = c.wait_status("STOPPED", Duration::from_secs(10));
    assert!(stopped.is_some(), "{} did not finish: {:?}", c.id, c.task());
    let status = delete_and_get_status(&c);
    assert_eq!(
        status, 0,
        "printing after the client left must not kill the guest"
    );
}

#[test]
fn a_dead_zygote_costs_no_running_container() {
    let k = kiln();
    let c = k.container("zygote-death");
    let pid = start_sleeper(&c);
    let shim = parent_of(pid).expect("the worker's parent");
    // The shim's other child is its zygote.
    let zygote = children_of(shim)
        .into_iter()
        .find(|p| *p != pid)
        .expect("the shim has a zygote");
    // SAFETY: kill(2) on the zygote we just identified.
    assert_eq!(unsafe { libc::kill(zygote as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_until(Duration::from_secs(5), || (!children_of(shim)
            .contains(&zygote))
        .then_some(()))
        .is_some(),
        "the zygote {zygote} was not reaped"
    );
    // The worker is the shim's own child: untouched, still running, and its exit still
    // reaches containerd.
    assert_eq!(parent_of(pid), Some(shim), "worker {pid} moved");
    assert_eq!(c.task().map(|t| t.status), Some("RUNNING".to_string()));
    kill_and_wait_stopped(&c, Some("SIGTERM"));
    assert_eq!(delete_and_get_status(&c), 143);
}
