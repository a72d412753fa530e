//! What the worker becomes before guest code runs: the container's user, no new privileges,
//! the namespaces the spec names by path; and the compile cache it loads the module from.

use std::time::Duration;

use kiln_e2e::{Container, Kiln, image, kiln, proc_status};
use kiln_image::Image;
use sha2::{Digest, Sha256};

/// Imports a copy of workload `name` whose image config sets `User`, once per test binary.
fn image_as_user(k: &'static Kiln, name: &str, user: &str) -> String {
    let reference = format!(
        "docker.io/kiln-test/{name}-as-{}:latest",
        user.replace(':', "-")
    );
    let mut img = Image::single_file(
        &reference,
        &format!("/{name}.wasm"),
        std::fs::read(k.wasm(name)).expect("read module"),
    )
    .expect("describe the image");
    img.exec_config_mut().expect("an OCI config").user = Some(user.to_string());
    let out = k.import_image(&img);
    assert!(out.success(), "import {reference}:\n{out}");
    reference
}

fn start_sleeper(c: &Container, opts: &[&str]) -> u32 {
    start_image(c, &image("sleep"), opts)
}

fn start_image(c: &Container, image: &str, opts: &[&str]) -> u32 {
    let mut run = c.run(image);
    for o in opts {
        run = run.opt(o);
    }
    let out = run.detach();
    assert!(out.success(), "ctr run -d failed:\n{out}");
    c.wait_status("RUNNING", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{} not RUNNING; task: {:?}", c.id, c.task()))
        .pid
}

fn stop(c: &Container) {
    let _ = c.kill(Some("SIGKILL"));
    let _ = c.wait_status("STOPPED", Duration::from_secs(5));
}

#[test]
fn the_worker_runs_as_the_containers_user_without_new_privileges() {
    let k = kiln();
    let c = k.container("user");
    let pid = start_image(&c, &image_as_user(k, "sleep", "1000:1001"), &[]);
    let uid = proc_status(pid, "Uid");
    let gid = proc_status(pid, "Gid");
    let nnp = proc_status(pid, "NoNewPrivs");
    stop(&c);
    assert!(uid.split_whitespace().all(|u| u == "1000"), "Uid: {uid}");
    assert!(gid.split_whitespace().all(|g| g == "1001"), "Gid: {gid}");
    assert_eq!(nnp, "1", "NoNewPrivs");

    // The user's identity applies to guest file access: the rootfs belongs to root.
    let c = k.container("user-write");
    let out = c
        .run(&image_as_user(k, "fileio", "1000:1000"))
        .args(["/fileio.wasm", "write", "/denied.txt", "x"])
        .output();
    assert_eq!(
        out.code(),
        1,
        "uid 1000 must not write to / of the rootfs:\n{out}"
    );
    assert!(out.stderr.contains("write failed"), "{out}");
}

#[test]
fn the_worker_joins_namespaces_given_by_path() {
    let k = kiln();
    // A process in fresh network and UTS namespaces to join.
    let mut holder = std::process::Command::new("unshare")
        .args(["--net", "--uts", "sleep", "60"])
        .spawn()
        .expect("unshare");
    let holder_pid = holder.id();
    let ns = |pid: u32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    // unshare execs sleep once the namespaces exist.
    let ready = kiln_e2e::wait_until(Duration::from_secs(5), || {
        (ns(holder_pid, "net") != ns(std::process::id(), "net")).then_some(())
    });
    assert!(
        ready.is_some(),
        "unshare did not create a network namespace"
    );

    let c = k.container("netns");
    let net = format!("network:/proc/{holder_pid}/ns/net");
    let uts = format!("uts:/proc/{holder_pid}/ns/uts");
    let pid = start_sleeper(&c, &["--with-ns", &net, "--with-ns", &uts]);
    let worker_net = ns(pid, "net");
    let worker_uts = ns(pid, "uts");
    let holder_net = ns(holder_pid, "net");
    let holder_uts = ns(holder_pid, "uts");
    stop(&c);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(holder_net.is_some() && holder_uts.is_some());
    assert_eq!(worker_net, holder_net, "network namespace not joined");
    assert_eq!(worker_uts, holder_uts, "uts namespace not joined");
}

#[test]
fn a_module_is_compiled_once_and_then_mapped_from_the_cache() {
    let k = kiln();
    let wasm = std::fs::read(k.wasm("exitcode")).expect("exitcode.wasm");
    let key = hex::encode(Sha256::digest(&wasm));
    let find = || k.cached_artifact(&key);
    for (i, code) in ["7", "8"].iter().enumerate() {
        let c = k.container(&format!("cache-{i}"));
        let out = c
            .run(&image("exitcode"))
            .args(["/exitcode.wasm", code])
            .output();
        assert_eq!(out.code().to_string(), *code, "{out}");
        if i == 0 {
            // The first start ran the baseline compiler's code; the optimized artifact is
            // written by a background compile that may end a little after the container.
            let artifact = kiln_e2e::wait_until(Duration::from_secs(120), find)
                .expect("the compiled module is in the cache after a run");
            let meta = std::fs::metadata(&artifact).expect("meta");
            // Only root may write the cache.
            let dir_mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(artifact.parent().expect("dir"))
                    .expect("meta")
                    .permissions(),
            );
            assert_eq!(
                dir_mode & 0o022,
                0,
                "cache dir writable by others: {dir_mode:o}"
            );
            std::fs::write(
                k.dir.join("cache-probe"),
                format!("{:?}", meta.modified().ok()),
            )
            .expect("write probe");
        } else {
            // The second run mapped the entry: it was not rewritten.
            let before = std::fs::read_to_string(k.dir.join("cache-probe")).expect("probe");
            let after = format!(
                "{:?}",
                std::fs::metadata(find().expect("entry"))
                    .expect("meta")
                    .modified()
                    .ok()
            );
            assert_eq!(before, after, "the cached artifact was recompiled");
        }
    }
}

#[test]
fn a_worker_that_compiled_keeps_no_compiler_threads() {
    // The compilation of a cache miss (here the default baseline first start; the optimized
    // one is tested in first_start_optimized.rs) runs in children of the worker, so the worker
    // keeps neither a compiler's heap nor the parallel compiler's thread pool: once running, a
    // worker that compiled looks like one that mapped the cached artifact.
    let k = kiln();
    let (reference, key) = k.import_unique("sleep", "uncached");
    let miss = k.container("compiled-miss");
    let miss_pid = start_image(&miss, &reference, &[]);
    // The second container must really map the artifact: wait for the cache fill first.
    let cached = kiln_e2e::wait_until(Duration::from_secs(120), || k.cached_artifact(&key));
    assert!(cached.is_some(), "the cache fill did not store the module");
    let hit = k.container("compiled-hit");
    let hit_pid = start_image(&hit, &reference, &[]);
    let threads = |pid| proc_status(pid, "Threads");
    let rss_kib = |pid| {
        proc_status(pid, "VmRSS")
            .trim_end_matches(" kB")
            .parse::<u64>()
            .unwrap_or(0)
    };
    let (miss_threads, hit_threads) = (threads(miss_pid), threads(hit_pid));
    let (miss_rss, hit_rss) = (rss_kib(miss_pid), rss_kib(hit_pid));
    stop(&miss);
    stop(&hit);
    assert!(
        !hit_threads.is_empty() && !miss_threads.is_empty(),
        "no status for the workers {miss_pid} and {hit_pid}"
    );
    assert!(
        miss_rss > 0 && hit_rss > 0,
        "unreadable RSS: {miss_rss} and {hit_rss} KiB"
    );
    assert_eq!(
        miss_threads, hit_threads,
        "threads of the worker that compiled vs the one that mapped the artifact"
    );
    // Cranelift leaves megabytes behind in the process that compiled; a worker that compiled in
    // a child is within a couple of MiB of one that did not.
    assert!(
        miss_rss < hit_rss + 2048,
        "worker that compiled: {miss_rss} KiB RSS, worker that mapped: {hit_rss} KiB"
    );
}
