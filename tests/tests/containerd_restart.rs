//! containerd stopped and started again while Kiln containers run (a node's containerd being
//! upgraded or restarted): the containers keep running, and one that exited while containerd
//! was down is reported with its exit status once it is back. A test binary of its own: it
//! takes its containerd away from any other test.

use std::time::Duration;

use kiln_e2e::{Container, image, kiln};

fn start(c: &Container, args: &[&str]) -> u32 {
    let out = c.run(&image("sleep")).args(args.iter().copied()).detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("RUNNING", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

#[test]
fn containers_survive_a_containerd_restart_and_exits_while_it_was_down_are_reported() {
    let k = kiln();
    let long = k.container("restart-long");
    let short = k.container("restart-short");
    let long_pid = start(&long, &["/sleep.wasm", "300"]);
    start(&short, &["/sleep.wasm", "2"]);

    // Down for longer than the short sleeper lives: its exit happens with nobody listening.
    let out = k.restart_containerd(Duration::from_secs(4));
    assert!(out.success(), "restart containerd:\n{out}");

    let long_task = long
        .task()
        .expect("the long sleeper's task after the restart");
    assert_eq!(long_task.status, "RUNNING", "{long_task:?}");
    assert_eq!(long_task.pid, long_pid, "the same worker");
    let stopped = short.wait_status("STOPPED", Duration::from_secs(10));
    assert!(stopped.is_some(), "short sleeper: {:?}", short.task());
    assert_eq!(
        short.exit_status(),
        Some(0),
        "exited while containerd was down"
    );

    // The long one still answers signals through its shim.
    let out = long.kill(None);
    assert!(out.success(), "{out}");
    let status = kiln_e2e::wait_until(Duration::from_secs(5), || long.exit_status());
    assert_eq!(status, Some(143));
}
