use super::*;

const WAT: &str = r#"(module (func (export "answer") (result i32) i32.const 42))"#;

fn engine() -> Engine {
    Engine::default()
}

fn answer(engine: &Engine, module: &Module) -> i32 {
    let mut store = wasmtime::Store::new(engine, ());
    let instance = wasmtime::Instance::new(&mut store, module, &[]).expect("instantiate");
    let f = instance
        .get_typed_func::<(), i32>(&mut store, "answer")
        .expect("export");
    f.call(&mut store, ()).expect("call")
}

fn entry(cache: &Cache, wasm: &[u8], ext: &str) -> PathBuf {
    let key = hex::encode(Sha256::digest(wasm));
    cache.dir().expect("enabled").join(format!("{key}.{ext}"))
}

#[test]
fn compiles_once_then_maps() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let (m, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Miss);
    assert_eq!(answer(&engine, &m), 42);
    assert!(entry(&cache, &wasm, ARTIFACT_EXT).is_file());
    let (m, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Hit);
    assert_eq!(answer(&engine, &m), 42);
    // The directory holds nothing but the entry and its checksum (no temp files left).
    let names: Vec<_> = fs::read_dir(cache.dir().expect("dir"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_corrupt_entry_is_recompiled_not_loaded() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    cache.load_bytes(&engine, &wasm).expect("load");
    let artifact = entry(&cache, &wasm, ARTIFACT_EXT);
    let mut data = fs::read(&artifact).expect("read");
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&artifact, &data).expect("write");
    let (m, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Replaced);
    assert_eq!(answer(&engine, &m), 42);
    let (_, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Hit);
}

#[test]
fn a_foreign_entry_with_a_matching_checksum_is_rejected_by_wasmtime() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let garbage = b"\x7fELF not really an artifact".to_vec();
    fs::write(entry(&cache, &wasm, ARTIFACT_EXT), &garbage).expect("write");
    fs::write(entry(&cache, &wasm, SUM_EXT), checksum(&garbage)).expect("write");
    let (m, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Replaced);
    assert_eq!(answer(&engine, &m), 42);
}

#[test]
fn a_missing_checksum_is_treated_as_corrupt() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    cache.load_bytes(&engine, &wasm).expect("load");
    fs::remove_file(entry(&cache, &wasm, SUM_EXT)).expect("rm");
    let (_, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Replaced);
}

#[test]
fn invalid_modules_are_errors() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let cache = Cache::open(root.path(), &engine);
    let wasm = wat::parse_str(WAT).expect("wat");
    let truncated = &wasm[..wasm.len() - 3];
    let e = cache.load_bytes(&engine, truncated).expect_err("truncated");
    assert!(matches!(e, CacheError::Compile(_)), "{e}");
    // A precompiled artifact is not accepted as a module: images never ship machine code.
    let precompiled = engine.precompile_module(&wasm).expect("precompile");
    assert!(cache.load_bytes(&engine, &precompiled).is_err());
}

#[test]
fn an_open_directory_is_tightened_and_a_foreign_one_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let cache = Cache::open(root.path(), &engine);
    assert!(cache.dir().is_some());
    let mode = fs::metadata(root.path()).expect("meta").mode();
    assert_eq!(mode & 0o777, 0o700);

    if unsafe { libc::geteuid() } == 0 {
        let other = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(other.path(), Some(65534), Some(65534)).expect("chown");
        let cache = Cache::open(other.path(), &engine);
        assert!(
            cache.dir().is_none(),
            "a directory owned by nobody must not be used"
        );
        let wasm = wat::parse_str(WAT).expect("wat");
        let (_, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
        assert_eq!(outcome, Outcome::Uncached);
    }
}

#[test]
fn creates_missing_parents_of_the_root() {
    // A fresh node has no /var/lib/kiln: the cache must still work from the first start.
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("var/lib/kiln/cache");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(&root, &engine);
    assert!(cache.dir().is_some(), "caching must be on");
    let (_, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Miss);
    let (_, outcome) = cache.load_bytes(&engine, &wasm).expect("load");
    assert_eq!(outcome, Outcome::Hit);
    let mode = fs::metadata(&root).expect("root").mode() & 0o777;
    assert_eq!(mode, 0o700);
}
