//! `KILN_FIRST_START=optimized`: the first start of a module that is not in the compile cache
//! waits for the optimizing compile, so the artifact is in the cache when the container ends.

use kiln_e2e::kiln_with_env;

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
