//! Which module a rootfs file holds, remembered, so a warm start need not read and hash it.
//!
//! A module in a rootfs has no digest anyone vouches for: its cache key is the sha256 of its
//! bytes, and reading and hashing a 2 MB module costs several milliseconds on every start
//! (sha256 in software: these nodes have no SHA-NI). Containers of one image share the very
//! same file, in the image's snapshot, so the key can be remembered against that file.
//!
//! The entry's name is the file's identity, (device, inode, size, mtime, ctime), and its
//! content the key. It must not be possible to make the index name a module the file does not
//! hold, since the key selects machine code to run:
//!
//! * Any write to a file, and any change of its metadata (including `utimes`, which forges
//!   mtime), sets its ctime to the current time, and nothing but a change of the host's clock
//!   (root on the host) sets ctime to a chosen value. A file whose content changed therefore
//!   has a new ctime, and an inode freed and reused by another file has the ctime of that
//!   file's creation.
//! * Timestamps are coarse (a filesystem tick), so a file changed again within the tick of its
//!   last change would keep its ctime. An identity is therefore recorded only once its ctime is
//!   more than [`SETTLED`] in the past (git's rule against "racily clean" entries): a change
//!   after that sets a later ctime.
//! * The device must identify the filesystem the inode lives on. On an overlay rootfs every
//!   file reports the overlay mount's own device, which is new for each container; with all of
//!   its layers on one filesystem, overlay reports the layer file's real inode number, so the
//!   caller passes that filesystem's device (the shim checks the layers; `Dev`).
//! * Entries live in the cache root, which only root can write, and are written before the
//!   guest runs (by Kiln's own code in the worker, still holding its privileges).
//!
//! An entry is a small file, written to a temporary name and renamed into place, so concurrent
//! workers agree without locks. Nothing removes entries: there is one per distinct module file
//! on the node (a few per image), and a stale one is never matched again.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::Key;

/// How old a file's last change must be before its identity is recorded.
pub const SETTLED: Duration = Duration::from_secs(1);

/// A file's identity, as far as its content goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    /// The identity of the file `meta` describes, on the filesystem `dev` (see the module
    /// docs: not always `meta.dev()`).
    pub fn new(meta: &fs::Metadata, dev: u64) -> FileId {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileId {
            dev,
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn name(&self) -> String {
        format!(
            "{:x}-{:x}-{:x}-{}-{}",
            self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns
        )
    }

    /// Whether the file's last change is more than [`SETTLED`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let now_ns = match now.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(_) => return false,
        };
        now_ns - self.ctime_ns > SETTLED.as_nanos() as i128
    }
}

/// The index, in the cache root.
#[derive(Debug, Clone)]
pub struct Index {
    dir: Option<PathBuf>,
}

impl Index {
    /// Opens (creating it if needed) the index under the cache `root`. Never fails: a
    /// directory that cannot be used is logged, and every module is then read and hashed.
    pub fn open(root: &Path) -> Index {
        let dir = root.join("index");
        match crate::prepare_dir(root).and_then(|()| crate::prepare_dir(&dir)) {
            Ok(()) => Index { dir: Some(dir) },
            Err(e) => {
                log::warn!("module index {} unusable: {e}", dir.display());
                Index { dir: None }
            }
        }
    }

    /// An index that remembers nothing.
    pub fn disabled() -> Index {
        Index { dir: None }
    }

    /// The key recorded for the file `id`, if any.
    pub fn lookup(&self, id: &FileId) -> Option<Key> {
        let path = self.dir.as_ref()?.join(id.name());
        let text = fs::read_to_string(path).ok()?;
        Key::from_digest(&format!("sha256:{}", text.trim()))
    }

    /// Records that the file `id` holds the binary `key`, if its last change is settled at
    /// `now`. Returns whether it was recorded.
    pub fn record(&self, id: &FileId, key: &Key, now: SystemTime) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        if !id.settled(now) {
            return false;
        }
        match crate::write_atomic(&dir.join(id.name()), key.as_str().as_bytes()) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("record {} in the module index: {e}", id.name());
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, FileId) {
        let path = dir.join(name);
        fs::write(&path, data).expect("write");
        let meta = fs::metadata(&path).expect("stat");
        let id = FileId::new(&meta, meta.dev());
        (path, id)
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(5)
    }

    #[test]
    fn a_settled_file_is_found_again_by_its_identity() {
        let root = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&root.path().join("cache"));
        let (_, id) = file(root.path(), "m.wasm", b"\0asm\x01\0\0\0");
        let key = Key::of(b"\0asm\x01\0\0\0");
        assert_eq!(index.lookup(&id), None);
        assert!(index.record(&id, &key, later()));
        assert_eq!(index.lookup(&id), Some(key));
    }

    #[test]
    fn a_file_changed_within_the_last_second_is_not_recorded() {
        let root = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&root.path().join("cache"));
        let (_, id) = file(root.path(), "m.wasm", b"\0asm\x01\0\0\0");
        assert!(!index.record(&id, &Key::of(b"x"), SystemTime::now()));
        assert_eq!(index.lookup(&id), None);
    }

    #[test]
    fn any_change_to_the_file_makes_it_another_identity() {
        let root = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&root.path().join("cache"));
        let (path, id) = file(root.path(), "m.wasm", b"\0asm\x01\0\0\0");
        assert!(index.record(&id, &Key::of(b"\0asm\x01\0\0\0"), later()));
        let meta = fs::metadata(&path).expect("stat");
        // Same size and, forged back with utimes, the same mtime: ctime still moves on.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&path, b"\0asm\x01\0\0\x01").expect("rewrite");
        let f = fs::File::options().write(true).open(&path).expect("open");
        f.set_modified(meta.modified().expect("mtime"))
            .expect("utimes");
        drop(f);
        let now = fs::metadata(&path).expect("stat");
        assert_eq!(now.size(), meta.size());
        assert_eq!(now.mtime_nsec(), meta.mtime_nsec());
        let id2 = FileId::new(&now, now.dev());
        assert_ne!(id, id2);
        assert_eq!(index.lookup(&id2), None);
        // A file that replaced it under the same name is another inode, or the same inode
        // with a later ctime.
        fs::remove_file(&path).expect("rm");
        let (_, id3) = file(root.path(), "m.wasm", b"\0asm\x01\0\0\0");
        assert_ne!(id, id3);
        assert_eq!(index.lookup(&id3), None);
    }

    #[test]
    fn the_device_given_is_part_of_the_identity() {
        let root = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&root.path().join("cache"));
        let (path, id) = file(root.path(), "m.wasm", b"\0asm\x01\0\0\0");
        assert!(index.record(&id, &Key::of(b"\0asm\x01\0\0\0"), later()));
        let meta = fs::metadata(&path).expect("stat");
        let elsewhere = FileId::new(&meta, meta.dev() + 1);
        assert_eq!(index.lookup(&elsewhere), None);
    }

    #[test]
    fn a_disabled_index_remembers_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let index = Index::disabled();
        let (_, id) = file(root.path(), "m.wasm", b"x");
        assert!(!index.record(&id, &Key::of(b"x"), later()));
        assert_eq!(index.lookup(&id), None);
    }
}
