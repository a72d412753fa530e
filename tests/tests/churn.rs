//! 500 containers churned through one shared shim, 10 at a time: every one runs, and nothing of
//! them is left afterwards (processes, cgroups, mounts, bundle directories, cache temporary
//! files), and the shim's descriptors return to where they were. `scripts/churn.sh` runs the
//! same for 10,000 and reports the shim's memory.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, image, kiln_with_env, leftovers, parent_of, wait_until};

const TASKS: usize = 500;
const CONCURRENCY: usize = 10;

fn k() -> &'static Kiln {
    kiln_with_env(&[
        ("KILN_SHIM_GROUPING", "namespace"),
        ("KILN_SHIM_IDLE_SECS", "120"),
    ])
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    kiln_e2e::proc_status(pid, "VmRSS")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            found.extend(temp_files(&e.path()));
        } else if name.starts_with(".tmp-") {
            found.push(e.path().display().to_string());
        }
    }
    found
}

#[test]
fn five_hundred_containers_leave_nothing_behind() {
    let k = k();
    // A long-lived container holds the shared shim up and tells its pid.
    let anchor = k.container("churn-anchor");
    let out = anchor
        .run(&image("sleep"))
        .args(["/sleep.wasm", "600"])
        .detach();
    assert!(out.success(), "{out}");
    let worker = anchor
        .wait_status("RUNNING", Duration::from_secs(30))
        .expect("anchor running")
        .pid;
    let shim = parent_of(worker).expect("the shim");
    // One churned container first, so that lazily opened descriptors (the event connection,
    // the blocking threads) are open before the count is taken.
    let first = k.container("churn-warm");
    assert!(first.run(&image("hello")).output().success());
    std::thread::sleep(Duration::from_millis(500));
    let (fds_before, rss_before) = (fd_count(shim), rss_kib(shim));
    assert!(
        fds_before > 0 && rss_before > 0,
        "cannot read the shim {shim}"
    );

    let started = Instant::now();
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONCURRENCY)
            .map(|t| {
                s.spawn(move || {
                    let mut ids = Vec::new();
                    for i in 0..TASKS / CONCURRENCY {
                        let c = k.container(&format!("churn-{t}-{i}"));
                        let out = c
                            .run(&image("hello"))
                            .timeout(Duration::from_secs(60))
                            .output();
                        assert!(
                            out.success() && out.stdout == "Hello from Kiln!\n",
                            "container {} of the churn:\n{out}",
                            c.id
                        );
                        ids.push(c.id.clone());
                    }
                    ids
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a churn thread panicked"))
            .collect()
    });
    let took = started.elapsed();
    assert_eq!(ids.len(), TASKS);

    // The cgroup removals run in the background: give them a moment, then everything of every
    // container must be gone, and the shim's descriptors back where they were.
    let fds_settled = wait_until(Duration::from_secs(20), || {
        (fd_count(shim) <= fds_before).then_some(())
    });
    let (fds_after, rss_after) = (fd_count(shim), rss_kib(shim));
    eprintln!(
        "churn: {TASKS} containers at concurrency {CONCURRENCY} in {took:?} ({:.1}/s); shim \
         descriptors {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB",
        TASKS as f64 / took.as_secs_f64()
    );
    assert!(
        fds_settled.is_some(),
        "the shim holds {fds_after} descriptors after the churn, {fds_before} before"
    );
    let state = k.dir.join("state/io.containerd.runtime.v2.task/default");
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(20), || {
        left = ids
            .iter()
            .flat_map(|id| {
                let mut l = leftovers(id);
                if state.join(id).exists() {
                    l.push(format!("bundle {}", state.join(id).display()));
                }
                l
            })
            .collect();
        left.extend(temp_files(&k.dir.join("cache")));
        left.is_empty().then_some(())
    });
    assert!(clean.is_some(), "left behind:\n  {}", left.join("\n  "));
    let _ = anchor.kill(Some("SIGKILL"));
}
