//! Exits as Linux has them, and faults survived: a worker killed from outside with a fault
//! signal dies of it (128 + signal) instead of having the signal swallowed by Wasmtime's trap
//! handler; a guest's exit code is the code it asked for, whatever its size; the kernel's OOM
//! killer is reported to containerd (TaskOOM) and the task ends with 137.

use std::time::Duration;

use kiln_e2e::{Container, Proc, image, kiln};

fn start(c: &Container, image: &str, opts: &[&str], args: &[&str]) -> u32 {
    let mut run = c.run(image);
    for o in opts {
        run = run.opt(o);
    }
    let out = run.args(args.iter().copied()).detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("RUNNING", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

fn wait_exit(c: &Container) -> u32 {
    kiln_e2e::wait_until(Duration::from_secs(10), || c.exit_status())
        .unwrap_or_else(|| panic!("{} did not stop; task: {:?}", c.id, c.task()))
}

#[test]
fn a_fault_signal_from_outside_kills_the_worker_with_its_status() {
    let k = kiln();
    for (sig, name) in [
        (libc::SIGSEGV, "segv"),
        (libc::SIGBUS, "bus"),
        (libc::SIGABRT, "abrt"),
    ] {
        // A guest in a host call (sleeping) and one running Wasm code (spinning).
        for (workload, args) in [
            ("sleep", vec!["/sleep.wasm", "60"]),
            ("spin", vec!["/spin.wasm", "60"]),
        ] {
            let c = k.container(&format!("fault-{name}-{workload}"));
            let pid = start(&c, &image(workload), &[], &args);
            // Let the guest reach its sleep or its loop.
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: kill(2) on the worker we just started.
            assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
            assert_eq!(
                wait_exit(&c),
                128 + sig as u32,
                "{workload} killed with signal {sig} from outside"
            );
        }
    }
}

#[test]
fn a_guests_exit_code_is_reported_whatever_its_size() {
    let k = kiln();
    for (code, expected) in [
        ("3", 3),
        ("126", 126),
        ("130", 130),
        ("255", 255),
        ("259", 3),
    ] {
        let c = k.container(&format!("exit-{code}"));
        let out = c
            .run(&image("exitcode"))
            .args(["/exitcode.wasm", code])
            .output();
        assert_eq!(out.code(), expected, "exit({code}):\n{out}");
        assert!(
            !out.stderr.contains("trap"),
            "exit({code}) is not a trap:\n{out}"
        );
    }
}

#[test]
fn an_oom_kill_is_reported_as_task_oom_and_137() {
    let k = kiln();
    let events = Proc::spawn(k.ctr_cmd(&["events"])).expect("ctr events");
    let c = k.container("oom");
    let out = c
        .run(&image("tablegrow"))
        .memory_limit(48 << 20)
        .timeout(Duration::from_secs(60))
        .output();
    // Give the event a moment to reach the subscriber, then stop it.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(events.pid() as i32, libc::SIGTERM) };
    let seen = events.wait(Duration::from_secs(5));
    assert_eq!(out.code(), 137, "the OOM-killed guest reports 137:\n{out}");
    assert!(
        seen.stdout
            .lines()
            .any(|l| l.contains("/tasks/oom") && l.contains(&c.id)),
        "no /tasks/oom event for {}:\n{}",
        c.id,
        seen.stdout
    );
}
