//! The guest's Wasm binary: where its bytes come from, and its compile-cache key.
//!
//! A module in the rootfs is read and hashed (its sha256 is its key). A module that is a layer
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

use kiln_cache::{CacheError, Key};
use kiln_plan::{ModuleSource, Plan};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::protocol::{MODULE_BYTE, WorkerReport};

/// A guest binary whose bytes may not have been fetched yet.
pub(crate) struct Binary {
    /// Its compile-cache key.
    pub key: Key,
    bytes: Option<Vec<u8>>,
    digest: Option<String>,
}

impl Binary {
    /// The binary `plan` runs. Reads a rootfs file at once; a layer only on [`Binary::fetch`].
    pub(crate) fn of(plan: &Plan) -> Result<Binary, String> {
        match &plan.module {
            ModuleSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| {
                    describe(
                        plan,
                        CacheError::Read {
                            path: path.clone(),
                            source,
                        },
                    )
                })?;
                Ok(Binary {
                    key: Key::of(&bytes),
                    bytes: Some(bytes),
                    digest: None,
                })
            }
            ModuleSource::Layer { digest, .. } => Ok(Binary {
                key: Key::from_digest(digest).ok_or_else(|| {
                    format!("layer digest {digest:?} is not sha256:<64 lowercase hex digits>")
                })?,
                bytes: None,
                digest: Some(digest.clone()),
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
        if self.bytes.is_none() {
            let digest = self.digest.clone().unwrap_or_default();
            let bytes = fetch(chan, &digest).map_err(|e| format!("layer {digest}: {e}"))?;
            if !self.key.matches(&bytes) {
                return Err(describe(plan, CacheError::Digest(digest)));
            }
            self.bytes = Some(bytes);
        }
        Ok(())
    }

    /// Frees the bytes (the artifact is all that is needed once compiled).
    pub(crate) fn release(&mut self) {
        self.bytes = None;
    }
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
            let mut b = Binary::of(&plan).expect("binary");
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
        let mut b = Binary::of(&plan).expect("binary");
        let e = b.fetch(&plan, &mut worker).expect_err("no fd");
        assert!(e.contains("did not send"), "{e}");
    }

    #[test]
    fn a_digest_that_is_not_sha256_is_refused() {
        let plan = layer_plan("sha512:abc", b"\0asm\x01\0\0\0");
        let e = Binary::of(&plan).err().expect("refused");
        assert!(e.contains("sha512:abc"), "{e}");
    }
}
