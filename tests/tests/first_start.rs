//! The first start of a module that is not in the compile cache (the default,
//! `KILN_FIRST_START=baseline`): the container runs code from the baseline compiler at once,
//! and the optimized artifact reaches the cache in the background, even when the container is
//! gone before that compile ends.

use std::time::Duration;

use kiln_e2e::{kiln, wait_until};

#[test]
fn a_first_start_runs_at_once_and_the_cache_is_filled_after_the_container_is_gone() {
    let k = kiln();
    let (reference, key) = k.import_unique("exitcode", "first-start");
    assert!(
        k.cached_artifact(&key).is_none(),
        "unique module already cached"
    );
    let c = k.container("first-start");
    let out = c.run(&reference).args(["/exitcode.wasm", "5"]).output();
    assert_eq!(out.code(), 5, "{out}");
    // `ctr run --rm` has deleted the container, killed everything in its cgroup and unmounted
    // its rootfs: the fill has left the cgroup and works from the bytes it already has.
    assert!(c.task().is_none(), "the container is gone");
    let artifact = wait_until(Duration::from_secs(120), || k.cached_artifact(&key))
        .expect("the optimized artifact reaches the cache after a baseline first start");
    let written = std::fs::metadata(&artifact).and_then(|m| m.modified()).ok();

    // The next start maps that artifact: nothing is compiled or rewritten.
    let c = k.container("second-start");
    let out = c.run(&reference).args(["/exitcode.wasm", "6"]).output();
    assert_eq!(out.code(), 6, "{out}");
    let after = std::fs::metadata(&artifact).and_then(|m| m.modified()).ok();
    assert_eq!(written, after, "the cached artifact was rewritten");
    let leftovers: Vec<_> = std::fs::read_dir(artifact.parent().expect("dir"))
        .expect("readdir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
