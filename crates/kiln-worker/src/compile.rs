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
use std::os::fd::{AsRawFd, RawFd};

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
    compile_in_child(engine, wasm, &[])
}

/// Forks a child that compiles `wasm` with `engine` and sends the artifact (or the compiler's
/// reason for refusing the module) back through a pipe; waits for it. The child dies with the
/// worker, and first closes its copies of `close_in_child` (descriptors whose other end must
/// see the worker's copy alone). The caller guarantees the worker is single-threaded.
fn compile_in_child(
    engine: &Engine,
    wasm: &[u8],
    close_in_child: &[RawFd],
) -> Result<Vec<u8>, CacheError> {
    let (read_end, write_end) = pipe().map_err(|e| CacheError::Compiler(format!("pipe: {e}")))?;
    // SAFETY: the caller guarantees the worker is single-threaded, so the child is a complete
    // copy.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read_end);
            // SAFETY: closing this child's copies of the parent's descriptors; prctl with
            // integer arguments: the compile is part of this worker's start and dies with it.
            unsafe {
                for &fd in close_in_child {
                    libc::close(fd);
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            let mut out = File::from(write_end);
            let code = match engine.precompile_module(wasm) {
                Ok(artifact) if send_artifact(&mut out, &artifact) => 0,
                Ok(_) => 3,
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
            decode(msg, read.is_ok(), waitpid(child, None))
        }
        Err(e) => Err(CacheError::Compiler(format!("fork: {e}"))),
    }
}

fn decode(
    msg: Vec<u8>,
    read_ok: bool,
    status: nix::Result<WaitStatus>,
) -> Result<Vec<u8>, CacheError> {
    match (msg.first().copied(), status) {
        (Some(REJECTED), _) => parse(msg),
        (Some(ARTIFACT), Ok(WaitStatus::Exited(_, 0))) if read_ok => parse(msg),
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

/// A child's whole message: the artifact, once its announced length has all arrived, or the
/// compiler's reason for refusing the module.
fn parse(mut msg: Vec<u8>) -> Result<Vec<u8>, CacheError> {
    match msg.first().copied() {
        Some(REJECTED) => Err(CacheError::Compile(wasmtime::Error::msg(
            String::from_utf8_lossy(&msg[1..]).into_owned(),
        ))),
        Some(ARTIFACT) if msg.len() >= 9 => {
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
        _ => Err(CacheError::Compiler("sent nothing".to_string())),
    }
}

/// What a first start with the baseline compiler needs besides the module.
pub struct Baseline<'a> {
    /// The optimizing engine, whose artifact goes into the cache.
    pub engine: &'a Engine,
    /// The cache to fill.
    pub cache: &'a kiln_cache::Cache,
    /// The `cgroup.procs` files of the shim's own cgroups, where the background compile moves
    /// to once the container's own work is done.
    pub home_cgroup_procs: &'a [std::path::PathBuf],
}

/// A first start of a module that is not in the cache: compiles it with the baseline engine
/// in a child and returns that module; meanwhile a second child leaves the container's cgroup,
/// compiles the module with the optimizing engine at low priority and stores it in the cache,
/// so the next start maps it.
///
/// The baseline compile is the container's work and is accounted to it; the cache fill is the
/// node's (every later start of the module on the node profits), and it must outlive a
/// container that exits before the fill is done (a short job would otherwise never get its
/// module cached), so it runs in the shim's cgroup, like an image pull runs in containerd's.
/// The worker does not start the guest before the fill has left the container's cgroup: a
/// guest that exits at once would otherwise have its cgroup, fill included, killed by Delete.
/// A concurrent first start of the same module finds the fill lock held and skips the fill.
///
/// `None` when the baseline path is not possible (a worker with threads, the baseline engine
/// or compiler refusing the module); the caller then compiles the usual way, which also gives
/// the error message for an invalid module.
pub fn baseline_first_start(b: &Baseline<'_>, wasm: &[u8]) -> Option<wasmtime::Module> {
    if crate::zygote::thread_count() != 1 {
        return None;
    }
    let baseline = match crate::engine::new_baseline_engine() {
        Ok(e) => e,
        Err(e) => {
            log::warn!("baseline compiler unavailable: {e:#}");
            return None;
        }
    };
    if crate::zygote::thread_count() != 1 {
        // Building an engine starts no thread today; if a Wasmtime upgrade changed that,
        // forking below would be unsound.
        log::warn!("the baseline engine started a thread; compiling without it");
        return None;
    }
    let (fill_read, fill_write) = pipe().ok()?;
    // Closed by the worker once it has the baseline module: the fill's compile then no longer
    // competes with the one the start is waiting for.
    let (go_read, go_write) = pipe().ok()?;
    // SAFETY: the worker is single-threaded (checked above), so the child is a complete copy.
    let filler = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(fill_read);
            drop(go_write);
            let code = fill_cache(b, wasm, File::from(fill_write), File::from(go_read));
            // SAFETY: leaving the forked child without the worker's destructors.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(_) => return None,
    };
    drop(fill_write);
    drop(go_read);
    // Still single-threaded: the filler is a separate process.
    let compiled = compile_in_child(
        &baseline,
        wasm,
        &[fill_read.as_raw_fd(), go_write.as_raw_fd()],
    );
    drop(go_write);
    let artifact = match compiled {
        Ok(a) => a,
        Err(e) => {
            log::info!("the baseline compiler did not take the module ({e}); compiling fully");
            // The full compile that follows stores the artifact itself.
            let _ = nix::sys::signal::kill(filler, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(filler, None);
            return None;
        }
    };
    // Wait until the filler is out of the container's cgroup (it closes its end then, or
    // when it gives up). It is not waited for otherwise: the shim, as subreaper, reaps it if
    // it outlives this worker.
    let mut moved = Vec::new();
    let _ = File::from(fill_read).read_to_end(&mut moved);
    if moved.is_empty() {
        log::warn!("the background compile could not leave the container's cgroup; not filling");
    }
    // SAFETY: produced just now by `baseline`'s precompile_module in our child, and received
    // whole (length and exit status checked by `decode`).
    unsafe { wasmtime::Module::deserialize(&baseline, &artifact) }
        .map_err(|e| log::warn!("baseline artifact rejected: {e:#}"))
        .ok()
}

fn send_artifact(out: &mut File, artifact: &[u8]) -> bool {
    let mut head = vec![ARTIFACT];
    head.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
    out.write_all(&head)
        .and_then(|()| out.write_all(artifact))
        .is_ok()
}

/// Renames this process (its `comm` and its command line): the fill outlives the container it
/// was forked for, and must not look like that container's shim in `ps` or to tools that find
/// a container's processes by the id in their command line (it inherited the shim's argv).
fn retitle(title: &str) {
    if let Ok(name) = std::ffi::CString::new(&title.as_bytes()[..title.len().min(15)]) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    // /proc/self/stat fields 48 and 49 (after the parenthesised comm) are the bounds of the
    // argv area that /proc/self/cmdline shows.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): field N is rest[N - 3].
    let (Some(start), Some(end)) = (
        fields.get(45).and_then(|f| f.parse::<usize>().ok()),
        fields.get(46).and_then(|f| f.parse::<usize>().ok()),
    ) else {
        return;
    };
    if end <= start {
        return;
    }
    let len = end - start;
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 1);
    // SAFETY: [start, end) is this process's own argv area, mapped and writable (it is on the
    // initial stack); nothing in this single-threaded child reads argv afterwards.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..n].copy_from_slice(&bytes[..n]);
        area[n..].fill(0);
    }
}

/// The cache fill, in its own child: leave the container's cgroup (then say so on `moved`),
/// wait until the worker has its baseline module (`go` closes), compile with the optimizing
/// engine and store the artifact. Started alongside the baseline compile, the fill made it
/// about twice as slow on a 2-core node (0.59 s instead of 0.31 s for a 1.9 MB module).
fn fill_cache(b: &Baseline<'_>, wasm: &[u8], mut moved: File, mut go: File) -> i32 {
    // Let go of everything the worker holds for its container (stdio FIFOs, the channel to the
    // shim, the log pipe): the container's output must end when its worker does, and the shim
    // must see the worker's channel close when the worker exits.
    let keep = [moved.as_raw_fd(), go.as_raw_fd()];
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| !keep.contains(fd)) {
        // SAFETY: closing descriptors this child owns copies of; nothing in it uses them.
        unsafe { libc::close(fd) };
    }
    // SAFETY: setpriority with integer arguments: the fill yields to the containers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    retitle(&format!("kiln-cache-fill {}", kiln_cache::Cache::key(wasm)));
    let pid = std::process::id().to_string();
    for procs in b.home_cgroup_procs {
        if std::fs::write(procs, &pid).is_err() {
            // Still in the container's cgroup: its deletion would kill the fill halfway.
            return 4;
        }
    }
    let _ = moved.write_all(b"1");
    drop(moved);
    // Wait for the worker to have its baseline module (or to be gone).
    let _ = go.read_to_end(&mut Vec::new());
    let Some(_lock) = b.cache.try_lock_fill(wasm) else {
        return 0;
    };
    if b.cache.lookup(b.engine, wasm).is_some() {
        return 0;
    }
    match b.engine.precompile_module(wasm) {
        Ok(artifact) => match b.cache.store_artifact(wasm, &artifact) {
            Ok(()) => 0,
            Err(_) => 5,
        },
        Err(_) => 6,
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
