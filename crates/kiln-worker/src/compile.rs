//! Compiling a module in a short-lived child of the worker.
//!
//! A worker lives as long as its container. If it compiled the module itself (a cache miss),
//! it would keep what compiling leaves behind for that whole life: Cranelift's freed heap,
//! which the allocator does not hand back, and the parallel compiler's thread pool. That was
//! 11 MiB of PSS per worker against 2 MiB for one that mapped a cached artifact. A child that
//! compiles, sends the artifact back through a pipe and exits takes all of it with it; the
//! worker then stores the artifact and maps it like any cache hit.
//!
//! The child is forked after the worker joined the container's cgroup, so the compilation is
//! still accounted to (and limited by) the container. Forking is only sound while the worker
//! has one thread, which is the case during setup; if it ever had more, the module is compiled
//! in the worker as before.

use std::fs::File;
use std::io::{Read, Write};

use kiln_cache::CacheError;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pipe};
use wasmtime::Engine;

/// First byte of the child's message: an artifact follows (length, then bytes).
const ARTIFACT: u8 = 0;
/// First byte of the child's message: Wasmtime's error text follows.
const REJECTED: u8 = 1;

/// Returns `engine.precompile_module(wasm)`, computed in a child process when possible.
pub fn in_child(engine: &Engine, wasm: &[u8]) -> Result<Vec<u8>, CacheError> {
    if crate::zygote::thread_count() != 1 {
        return engine.precompile_module(wasm).map_err(CacheError::Compile);
    }
    let (read_end, write_end) = pipe().map_err(|e| CacheError::Compiler(format!("pipe: {e}")))?;
    // SAFETY: the worker is single-threaded (checked above), so the child is a complete copy.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read_end);
            // SAFETY: prctl with integer arguments. A child whose worker was killed stops too.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let mut out = File::from(write_end);
            let code = match engine.precompile_module(wasm) {
                Ok(artifact) => {
                    let mut head = vec![ARTIFACT];
                    head.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
                    match out.write_all(&head).and_then(|()| out.write_all(&artifact)) {
                        Ok(()) => 0,
                        Err(_) => 3,
                    }
                }
                Err(e) => {
                    let mut msg = vec![REJECTED];
                    msg.extend_from_slice(format!("{e:#}").as_bytes());
                    let _ = out.write_all(&msg);
                    2
                }
            };
            // SAFETY: leaving the forked child without the worker's destructors.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            let mut msg = Vec::new();
            let read = File::from(read_end).read_to_end(&mut msg);
            let status = waitpid(child, None);
            decode(msg, read.is_ok(), status)
        }
        Err(e) => Err(CacheError::Compiler(format!("fork: {e}"))),
    }
}

fn decode(
    mut msg: Vec<u8>,
    read_ok: bool,
    status: nix::Result<WaitStatus>,
) -> Result<Vec<u8>, CacheError> {
    match (msg.first().copied(), status) {
        (Some(REJECTED), _) => Err(CacheError::Compile(wasmtime::Error::msg(
            String::from_utf8_lossy(&msg[1..]).into_owned(),
        ))),
        (Some(ARTIFACT), Ok(WaitStatus::Exited(_, 0))) if read_ok && msg.len() >= 9 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&msg[1..9]);
            let len = u64::from_le_bytes(len);
            if msg.len() as u64 - 9 != len {
                return Err(CacheError::Compiler(format!(
                    "sent {} of {len} artifact bytes",
                    msg.len() - 9
                )));
            }
            msg.drain(..9);
            Ok(msg)
        }
        (_, Ok(WaitStatus::Signaled(_, sig, _))) => Err(CacheError::Compiler(format!(
            "killed by {sig}{}",
            if sig == nix::sys::signal::Signal::SIGKILL {
                " (out of memory within the container's memory limit?)"
            } else {
                ""
            }
        ))),
        (_, status) => Err(CacheError::Compiler(format!(
            "ended without an artifact ({status:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    fn exited(code: i32) -> nix::Result<WaitStatus> {
        Ok(WaitStatus::Exited(Pid::from_raw(1), code))
    }

    #[test]
    fn a_whole_artifact_is_returned() {
        let mut msg = vec![ARTIFACT];
        msg.extend_from_slice(&3u64.to_le_bytes());
        msg.extend_from_slice(b"abc");
        assert_eq!(decode(msg, true, exited(0)).expect("artifact"), b"abc");
    }

    #[test]
    fn a_short_or_unfinished_artifact_is_an_error() {
        let mut msg = vec![ARTIFACT];
        msg.extend_from_slice(&4u64.to_le_bytes());
        msg.extend_from_slice(b"abc");
        let err = decode(msg.clone(), true, exited(0)).unwrap_err();
        assert!(err.to_string().contains("3 of 4"), "{err}");
        // A whole message from a child that did not exit 0 is not trusted either.
        let mut whole = msg;
        whole.push(b'd');
        assert!(decode(whole, true, exited(3)).is_err());
        let killed = Ok(WaitStatus::Signaled(
            Pid::from_raw(1),
            Signal::SIGKILL,
            false,
        ));
        let err = decode(Vec::new(), true, killed).unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn a_rejected_module_keeps_wasmtimes_reason() {
        let mut msg = vec![REJECTED];
        msg.extend_from_slice(b"magic header not detected");
        let err = decode(msg, true, exited(2)).unwrap_err();
        assert!(matches!(err, CacheError::Compile(_)));
        assert!(err.to_string().contains("magic header"), "{err}");
    }
}
