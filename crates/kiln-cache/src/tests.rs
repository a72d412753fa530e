use super::*;

const WAT: &str = r#"(module (func (export "answer") (result i32) i32.const 42))"#;
const COMPONENT_WAT: &str = r#"(component (core module (func (export "f"))))"#;

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

fn entry(cache: &Cache, key: &Key, kind: Kind, ext: &str) -> PathBuf {
    cache
        .dir()
        .expect("enabled")
        .join(format!("{key}{}.{ext}", kind.suffix()))
}

fn stored(cache: &Cache, engine: &Engine, wasm: &[u8]) -> Key {
    let key = Key::of(wasm);
    let artifact = engine.precompile_module(wasm).expect("precompile");
    cache.store(&key, Kind::Module, &artifact).expect("store");
    key
}

#[test]
fn a_stored_artifact_is_mapped_and_nothing_else_is_left() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let key = Key::of(&wasm);
    assert!(cache.load_module(&engine, &key).is_none(), "empty cache");
    stored(&cache, &engine, &wasm);
    let m = cache.load_module(&engine, &key).expect("hit");
    assert_eq!(answer(&engine, &m), 42);
    // The directory holds nothing but the entry and its checksum (no temp files left).
    let names: Vec<_> = fs::read_dir(cache.dir().expect("dir"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_layer_digest_is_the_key_of_the_same_binary_as_a_file() {
    let wasm = wat::parse_str(WAT).expect("wat");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&wasm)));
    assert_eq!(Key::from_digest(&digest), Some(Key::of(&wasm)));
    assert!(Key::of(&wasm).matches(&wasm));
    assert!(!Key::of(&wasm).matches(b"other"));
    assert_eq!(Key::from_digest("sha512:abcd"), None);
    assert_eq!(
        Key::from_digest("sha256:../../etc"),
        None,
        "a key is only hex"
    );
    assert_eq!(
        Key::from_digest(&digest.to_uppercase().replace("SHA256", "sha256")),
        None
    );
}

#[test]
fn modules_and_components_have_separate_entries() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let cache = Cache::open(root.path(), &engine);
    let component = wat::parse_str(COMPONENT_WAT).expect("wat");
    let key = Key::of(&component);
    let artifact = engine.precompile_component(&component).expect("precompile");
    cache
        .store(&key, Kind::Component, &artifact)
        .expect("store");
    assert!(cache.load_component(&engine, &key).is_some());
    assert!(
        cache.artifact(&key, Kind::Module).is_none(),
        "not a module entry"
    );
    assert!(entry(&cache, &key, Kind::Component, ARTIFACT_EXT).is_file());
}

#[test]
fn a_corrupt_entry_is_a_miss_not_loaded() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let key = stored(&cache, &engine, &wasm);
    let artifact = entry(&cache, &key, Kind::Module, ARTIFACT_EXT);
    let mut data = fs::read(&artifact).expect("read");
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&artifact, &data).expect("write");
    assert!(
        cache.load_module(&engine, &key).is_none(),
        "a flipped bit is not loaded"
    );
    // Storing again replaces it.
    stored(&cache, &engine, &wasm);
    assert!(cache.load_module(&engine, &key).is_some());
}

#[test]
fn a_foreign_entry_with_a_matching_checksum_is_rejected_by_wasmtime() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let key = Key::of(&wasm);
    let garbage = b"\x7fELF not really an artifact".to_vec();
    fs::write(entry(&cache, &key, Kind::Module, ARTIFACT_EXT), &garbage).expect("write");
    fs::write(
        entry(&cache, &key, Kind::Module, SUM_EXT),
        checksum(&garbage),
    )
    .expect("write");
    assert!(cache.load_module(&engine, &key).is_none());
}

#[test]
fn a_missing_checksum_is_treated_as_corrupt() {
    let root = tempfile::tempdir().expect("tempdir");
    let engine = engine();
    let wasm = wat::parse_str(WAT).expect("wat");
    let cache = Cache::open(root.path(), &engine);
    let key = stored(&cache, &engine, &wasm);
    fs::remove_file(entry(&cache, &key, Kind::Module, SUM_EXT)).expect("rm");
    assert!(cache.artifact(&key, Kind::Module).is_none());
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

    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the test chowns"
    );
    let other = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(other.path(), Some(65534), Some(65534)).expect("chown");
    let cache = Cache::open(other.path(), &engine);
    assert!(
        cache.dir().is_none(),
        "a directory owned by nobody must not be used"
    );
    let wasm = wat::parse_str(WAT).expect("wat");
    let key = Key::of(&wasm);
    cache
        .store(&key, Kind::Module, b"x")
        .expect("a disabled cache stores nothing");
    assert!(cache.artifact(&key, Kind::Module).is_none());
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
    let key = stored(&cache, &engine, &wasm);
    assert!(cache.load_module(&engine, &key).is_some());
    let mode = fs::metadata(&root).expect("root").mode() & 0o777;
    assert_eq!(mode, 0o700);
}
