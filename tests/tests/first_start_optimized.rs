//! `KILN_FIRST_START=optimized`: the first start of a module that is not in the compile cache
//! waits for the optimizing compile, so the artifact is in the cache when the container ends.

use std::time::Duration;

use kiln_e2e::{kiln_with_env, proc_status};

#[test]
fn an_optimized_first_start_leaves_the_artifact_in_the_cache() {
    let k = kiln_with_env(&[("KILN_FIRST_START", "optimized")]);
    let (reference, key) = k.import_unique("exitcode", "optimized-first-start");
    assert!(
        k.cached_artifact(&key).is_none(),
        "unique module already cached"
    );
    let c = k.container("optimized-first-start");
    let out = c.run(&reference).args(["/exitcode.wasm", "4"]).output();
    assert_eq!(out.code(), 4, "{out}");
    assert!(
        k.cached_artifact(&key).is_some(),
        "the artifact must be in the cache as soon as the first run ends"
    );
}

#[test]
fn a_worker_that_compiled_keeps_no_compiler_threads() {
    // With the optimized first start the module is compiled by a short-lived child of the
    // worker, so the worker keeps neither Cranelift's heap nor its thread pool: running, a
    // worker that compiled looks like one that mapped the cached artifact.
    let k = kiln_with_env(&[("KILN_FIRST_START", "optimized")]);
    let (reference, _) = k.import_unique("sleep", "optimized-threads");
    let start = |name: &str| {
        let c = k.container(name);
        let out = c.run(&reference).detach();
        assert!(out.success(), "ctr run -d failed:\n{out}");
        let pid = c
            .wait_status("RUNNING", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} not RUNNING", c.id))
            .pid;
        (c, pid)
    };
    let (miss, miss_pid) = start("optimized-miss");
    let (hit, hit_pid) = start("optimized-hit");
    let threads = (
        proc_status(miss_pid, "Threads"),
        proc_status(hit_pid, "Threads"),
    );
    for c in [&miss, &hit] {
        let _ = c.kill(Some("SIGKILL"));
        let _ = c.wait_status("STOPPED", Duration::from_secs(10));
    }
    assert!(!threads.1.is_empty(), "no status for the worker {hit_pid}");
    assert_eq!(
        threads.0, threads.1,
        "threads of the worker that compiled vs the one that mapped the artifact"
    );
}
