//! The guest's Wasm binary: where its bytes come from, and its compile-cache key.
//!
//! A module in the rootfs is read and hashed (its sha256 is its key), unless the module index
//! already knows the file (`kiln_cache::Index`: the same file of an image's snapshot, by an
//! identity that any change to it alters); then it is read only if it must be compiled. A module that is a layer
//! of the container's image is named by the layer's digest, which *is* that sha256: on a cache
//! hit its bytes are never needed, so the worker does not ask for them. On a miss it asks the
//! shim, which copies the layer out of containerd's content store into a memfd and passes the
//! descriptor over the worker's channel; the packet to the zygote stays small whatever the
//! module's size. The worker hashes what it got before anything compiles it, so a content
//! store (or shim) that hands over other bytes fails the start instead of filling the cache
//! entry of one module with another's code.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use kiln_cache::{CacheError, FileId, Index, Key};
use kiln_plan::{ModuleSource, Plan};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::protocol::{MODULE_BYTE, WorkerReport};

/// A guest binary whose bytes may not have been fetched yet.
pub(crate) struct Binary {
    /// Its compile-cache key.
    pub key: Key,
    bytes: Option<Vec<u8>>,
    /// Where the bytes come from when they are needed.
    from: From,
}

enum From {
    /// Already read.
    Read,
    /// A rootfs file whose key the module index knew.
    File(std::path::PathBuf),
    /// An image layer, from the shim.
    Layer(String),
}

impl Binary {
    /// The binary `plan` runs. A rootfs file is read and hashed at once unless `index` knows
    /// it (`fs_dev`: the filesystem its rootfs files are on, from the shim; see
    /// [`kiln_cache::Index`]); a layer is fetched only on [`Binary::fetch`].
    pub(crate) fn of(plan: &Plan, index: &Index, fs_dev: Option<u64>) -> Result<Binary, String> {
        match &plan.module {
            ModuleSource::File(path) => {
                let read_error = |source| {
                    describe(
                        plan,
                        CacheError::Read {
                            path: path.clone(),
                            source,
                        },
                    )
                };
                let mut file = std::fs::File::open(path).map_err(read_error)?;
                let id = file_id(plan, &file, fs_dev);
                if let Some(key) = id.as_ref().and_then(|id| index.lookup(id)) {
                    log::debug!(
                        "worker {}: module {key} known from the module index, not read",
                        plan.id
                    );
                    return Ok(Binary {
                        key,
                        bytes: None,
                        from: From::File(path.clone()),
                    });
                }
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map_err(read_error)?;
                let key = Key::of(&bytes);
                if let Some(id) = id
                    && index.record(&id, &key, std::time::SystemTime::now())
                {
                    log::debug!(
                        "worker {}: module {key} recorded in the module index",
                        plan.id
                    );
                }
                Ok(Binary {
                    key,
                    bytes: Some(bytes),
                    from: From::Read,
                })
            }
            ModuleSource::Layer { digest, .. } => Ok(Binary {
                key: Key::from_digest(digest).ok_or_else(|| {
                    format!("layer digest {digest:?} is not sha256:<64 lowercase hex digits>")
                })?,
                bytes: None,
                from: From::Layer(digest.clone()),
            }),
            ModuleSource::None => Err("the plan names no module".to_string()),
        }
    }

    /// The bytes, asking the shim for them over `chan` the first time for a layer.
    pub(crate) fn bytes(&mut self, plan: &Plan, chan: &mut UnixStream) -> Result<&[u8], String> {
        self.fetch(plan, chan)?;
        Ok(self.fetched())
    }

    /// The bytes if fetched (empty otherwise).
    pub(crate) fn fetched(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or_default()
    }

    /// Makes sure the bytes are here.
    pub(crate) fn fetch(&mut self, plan: &Plan, chan: &mut UnixStream) -> Result<(), String> {
        if self.bytes.is_some() {
            return Ok(());
        }
        let (bytes, what) = match &self.from {
            From::Read => return Ok(()),
            From::Layer(digest) => (
                fetch(chan, digest).map_err(|e| format!("layer {digest}: {e}"))?,
                digest.clone(),
            ),
            From::File(path) => (
                std::fs::read(path).map_err(|source| {
                    describe(
                        plan,
                        CacheError::Read {
                            path: path.clone(),
                            source,
                        },
                    )
                })?,
                format!("sha256:{} (the module index's entry for it)", self.key),
            ),
        };
        if !self.key.matches(&bytes) {
            return Err(describe(plan, CacheError::Digest(what)));
        }
        self.bytes = Some(bytes);
        Ok(())
    }

    /// Frees the bytes (the artifact is all that is needed once compiled).
    pub(crate) fn release(&mut self) {
        self.bytes = None;
    }
}

/// The identity the module index knows `file` by, if it can have one: a file on the rootfs
/// mount (not in a volume below it, whose device the shim did not check), when the shim named
/// the filesystem the rootfs's files are on.
fn file_id(plan: &Plan, file: &std::fs::File, fs_dev: Option<u64>) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let fs_dev = fs_dev?;
    let meta = file.metadata().ok()?;
    let root = std::fs::metadata(&plan.preopens.first()?.host).ok()?;
    (meta.is_file() && meta.dev() == root.dev()).then(|| FileId::new(&meta, fs_dev))
}

/// Asks the shim for the layer `digest` and reads it from the memfd it sends.
fn fetch(chan: &mut UnixStream, digest: &str) -> Result<Vec<u8>, String> {
    let mut line = serde_json::to_vec(&WorkerReport::NeedModule {
        digest: digest.to_string(),
    })
    .map_err(|e| e.to_string())?;
    line.push(b'\n');
    chan.write_all(&line)
        .map_err(|e| format!("ask the shim for it: {e}"))?;
    let mut file = std::fs::File::from(receive_fd(chan)?);
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("read it from the shim's memfd: {e}"))?;
    Ok(bytes)
}

/// Receives [`MODULE_BYTE`] and one descriptor.
fn receive_fd(chan: &UnixStream) -> Result<OwnedFd, String> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(
        chan.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receive it from the shim: {e}"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r);
        }
    }
    let n = msg.bytes;
    // SAFETY: descriptors just received with SCM_RIGHTS belong to this process.
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n != 1 || byte[0] != MODULE_BYTE || owned.len() != 1 {
        return Err("the shim did not send it".to_string());
    }
    Ok(owned.remove(0))
}

/// "cannot load GUEST: why", naming what the container runs.
pub(crate) fn describe(plan: &Plan, e: CacheError) -> String {
    let guest = plan.args.first().cloned().unwrap_or_default();
    format!("cannot load {guest}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};

    fn layer_plan(digest: &str, head: &[u8]) -> Plan {
        let spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/m.wasm"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"}, "linux": {}
        }))
        .expect("spec");
        let root = tempfile::tempdir().expect("tempdir");
        let layer = kiln_plan::ImageLayer {
            digest: digest.to_string(),
            media_type: "application/wasm".to_string(),
            size: head.len() as u64,
            head: head.to_vec(),
        };
        kiln_plan::plan_with_layer("t", &spec, root.path(), &kiln_plan::Host::default(), &layer)
            .expect("plan")
    }

    /// A memfd holding `bytes`, read from its start.
    fn memfd(bytes: &[u8]) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes).expect("write");
        std::io::Seek::rewind(&mut f).expect("rewind");
        f.into()
    }

    #[test]
    fn a_layer_is_fetched_from_the_shim_and_checked_against_its_digest() {
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        let digest = format!("sha256:{}", Key::of(&wasm));
        for (sent, ok) in [(wasm.clone(), true), (b"\0asm\x01\0\0\x01".to_vec(), false)] {
            let (mut worker, shim) = UnixStream::pair().expect("pair");
            let server = std::thread::spawn(move || {
                let mut line = String::new();
                let mut r = std::io::BufReader::new(&shim);
                std::io::BufRead::read_line(&mut r, &mut line).expect("read");
                let fd = memfd(&sent);
                sendmsg::<()>(
                    shim.as_raw_fd(),
                    &[std::io::IoSlice::new(&[MODULE_BYTE])],
                    &[ControlMessage::ScmRights(&[fd.as_raw_fd()])],
                    MsgFlags::empty(),
                    None,
                )
                .expect("send");
                line
            });
            let plan = layer_plan(&digest, &wasm);
            let mut b = Binary::of(&plan, &Index::disabled(), None).expect("binary");
            let got = b.bytes(&plan, &mut worker).map(|b| b.to_vec());
            let line = server.join().expect("server");
            assert!(
                line.contains("NeedModule") && line.contains(&digest),
                "{line}"
            );
            if ok {
                assert_eq!(got.expect("bytes"), wasm);
            } else {
                let e = got.expect_err("other bytes");
                assert!(e.contains("do not match its digest"), "{e}");
            }
        }
    }

    #[test]
    fn a_shim_that_sends_no_descriptor_fails_the_fetch() {
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        let digest = format!("sha256:{}", Key::of(&wasm));
        let (mut worker, mut shim) = UnixStream::pair().expect("pair");
        shim.write_all(&[MODULE_BYTE]).expect("write");
        let plan = layer_plan(&digest, &wasm);
        let mut b = Binary::of(&plan, &Index::disabled(), None).expect("binary");
        let e = b.fetch(&plan, &mut worker).expect_err("no fd");
        assert!(e.contains("did not send"), "{e}");
    }

    /// A plan running `/m.wasm` of a rootfs in `root` that holds `wasm`.
    fn file_plan(root: &std::path::Path, wasm: &[u8]) -> Plan {
        std::fs::write(root.join("m.wasm"), wasm).expect("write");
        let spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/m.wasm"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"}, "linux": {}
        }))
        .expect("spec");
        kiln_plan::plan("t", &spec, root, &kiln_plan::Host::default()).expect("plan")
    }

    #[test]
    fn a_rootfs_file_the_index_knows_is_not_read_until_its_bytes_are_needed() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let index = Index::open(cache.path());
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        let plan = file_plan(root.path(), &wasm);
        let dev = std::fs::metadata(root.path()).expect("stat").dev();
        let meta = std::fs::metadata(root.path().join("m.wasm")).expect("stat");
        // Too fresh to be recorded: read and hashed, and not remembered.
        let b = Binary::of(&plan, &index, Some(dev)).expect("binary");
        assert_eq!(b.fetched(), wasm.as_slice());
        assert_eq!(index.lookup(&FileId::new(&meta, dev)), None);
        // Recorded (as the first start after it settled would): the next start trusts it.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        assert!(index.record(&FileId::new(&meta, dev), &b.key, later));
        let mut b = Binary::of(&plan, &index, Some(dev)).expect("binary");
        assert_eq!(b.key, Key::of(&wasm));
        assert!(b.fetched().is_empty(), "an index hit read the module");
        let (mut chan, _other) = UnixStream::pair().expect("pair");
        assert_eq!(b.bytes(&plan, &mut chan).expect("bytes"), wasm.as_slice());
        // Without the shim's device the index is not consulted.
        let b = Binary::of(&plan, &index, None).expect("binary");
        assert_eq!(b.fetched(), wasm.as_slice());
    }

    #[test]
    fn bytes_that_do_not_match_the_indexed_key_fail_the_start() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let index = Index::open(cache.path());
        let plan = file_plan(root.path(), b"\0asm\x01\0\0\0");
        let dev = std::fs::metadata(root.path()).expect("stat").dev();
        let meta = std::fs::metadata(root.path().join("m.wasm")).expect("stat");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        assert!(index.record(&FileId::new(&meta, dev), &Key::of(b"other"), later));
        let mut b = Binary::of(&plan, &index, Some(dev)).expect("binary");
        let (mut chan, _other) = UnixStream::pair().expect("pair");
        let e = b.fetch(&plan, &mut chan).expect_err("mismatch");
        assert!(e.contains("do not match"), "{e}");
    }

    #[test]
    fn a_digest_that_is_not_sha256_is_refused() {
        let plan = layer_plan("sha512:abc", b"\0asm\x01\0\0\0");
        let e = Binary::of(&plan, &Index::disabled(), None)
            .err()
            .expect("refused");
        assert!(e.contains("sha512:abc"), "{e}");
    }
}
