//! A module in a rootfs is read and hashed on its first start only: the module index
//! (kiln_cache::Index) then knows the image's snapshot file by its device, inode, size and
//! times, and later starts of containers of that image go by it.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use kiln_e2e::{Kiln, kiln_with_env};

fn k() -> &'static Kiln {
    // Debug: the worker says when it went by the index.
    kiln_with_env(&[("CONTAINERD_LOG_LEVEL", "debug")])
}

/// The index's entries that name the module `key`.
fn entries_for(k: &Kiln, key: &str) -> Vec<String> {
    std::fs::read_dir(k.dir.join("cache").join("index"))
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.trim() == key))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The file `name` in the overlay snapshots of containerd's root whose sha256 is `key`.
fn snapshot_file(k: &Kiln, name: &str, key: &str) -> Option<PathBuf> {
    use sha2::Digest;
    let snapshots = k
        .dir
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    std::fs::read_dir(snapshots).ok()?.flatten().find_map(|e| {
        let p = e.path().join("fs").join(name);
        let bytes = std::fs::read(&p).ok()?;
        (hex::encode(sha2::Sha256::digest(&bytes)) == key).then_some(p)
    })
}

#[test]
fn the_second_start_of_an_image_goes_by_its_snapshot_files_identity() {
    let k = k();
    let (reference, key) = k.import_unique("exitcode", "index");
    // A file changed in the last second is not recorded (its ctime could still repeat).
    std::thread::sleep(Duration::from_millis(1500));

    let first = k.container("index-first");
    let out = first.run(&reference).args(["/exitcode.wasm", "3"]).output();
    assert_eq!(out.code(), 3, "{out}");
    let entries = entries_for(k, &key);
    assert_eq!(entries.len(), 1, "index entries for {key}: {entries:?}");
    // The entry names the layer's file on the snapshotter's filesystem, not the overlay mount
    // (whose device is new for every container).
    let file = snapshot_file(k, "exitcode.wasm", &key).expect("the module in a snapshot");
    let meta = std::fs::metadata(&file).expect("stat");
    let prefix = format!("{:x}-{:x}-{:x}-", meta.dev(), meta.ino(), meta.size());
    assert!(
        entries[0].starts_with(&prefix),
        "entry {} is not {prefix}…",
        entries[0]
    );
    let said = |id: &str| {
        k.containerd_log_lines(id)
            .iter()
            .any(|l| l.contains("known from the module index"))
    };
    assert!(!said(&first.id), "the first start found it in the index");

    let second = k.container("index-second");
    let out = second
        .run(&reference)
        .args(["/exitcode.wasm", "4"])
        .output();
    assert_eq!(out.code(), 4, "{out}");
    assert!(
        said(&second.id),
        "the second start read the module again:\n{}",
        k.log_report(std::slice::from_ref(&second.id))
    );
    assert_eq!(entries_for(k, &key).len(), 1);
}
