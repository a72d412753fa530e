//! Compiling a module that is not in the cache, by processes that hold nothing of value.
//!
//! A module is untrusted input to the compiler. A cache miss is therefore compiled by a child
//! that first becomes less than the guest: the container's user, no capabilities at all, the
//! container's rlimits and seccomp filter, no_new_privs, chrooted into an empty read-only
//! tmpfs, holding no descriptor but the pipe it answers on (no channel to the shim, no stdio
//! FIFOs, no cache directory). It is also a child because of memory: a worker that compiled
//! itself would keep Cranelift's freed heap and the parallel compiler's threads for its
//! container's whole life (11 MiB of PSS against 2 MiB for one that mapped an artifact).
//!
//! The compiled bytes are stored by the privileged side, under the key *it* computed from the
//! module before any compiler ran: the **keeper**, forked from the worker while it is still
//! root, which keeps only the module, the cache and its pipes. A compiler subverted by a
//! malicious module can at worst make the artifact of that same module bad, which only
//! containers of that module load (and which runs with the same confinement as its guest).
//!
//! Two ways to start a module that is not cached, chosen by `KILN_FIRST_START`:
//! * `baseline` (default): the worker's compile child uses Winch, a single-pass compiler, so
//!   this start does not wait for Cranelift; the keeper leaves the container's cgroup for the
//!   cache-fill cgroup (CPU and memory limited, see [`FillLimits`]) and, once the worker has
//!   its module, runs a Cranelift compile child of its own and stores the result, so that
//!   every later start maps optimized code. The fill outlives a container that ends first.
//! * `optimized`: the worker's compile child uses Cranelift; the keeper stores its artifact.
//!
//! The children are forked while the worker is single-threaded (its whole setup is).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use kiln_cache::{Cache, CacheError, Key, Kind};
use kiln_plan::{CapabilitySets, Rlimit, User};
use kiln_sandbox::identity::{Final, finish};
use kiln_sandbox::seccomp::Filter;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// First byte of a compile child's answer: an artifact follows (engine byte, length, bytes).
const ARTIFACT: u8 = 0;
/// First byte of a compile child's answer: the compiler's reason for refusing the module.
const REJECTED: u8 = 1;

/// Which compiler produced an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compiler {
    /// Cranelift, with the zygote's engine configuration (what the cache holds).
    Optimizing,
    /// Winch, with [`crate::engine::new_baseline_engine`]'s configuration.
    Baseline,
}

/// What a compile child becomes before it reads the module.
pub(crate) struct Confinement<'a> {
    /// Its identity (in the namespace it is in).
    pub user: User,
    /// The container's rlimits.
    pub rlimits: &'a [Rlimit],
    /// The container's seccomp filter.
    pub seccomp: Option<&'a Filter>,
    /// The empty directory it is chrooted into.
    pub root: RawFd,
    /// The namespaces the container's plan skipped, which the guard stands in for.
    pub skipped: &'a [String],
}

/// The namespace guard for the calling process, if the plan skipped a pid or network
/// namespace.
pub(crate) fn guard_for(skipped: &[String]) -> Option<Filter> {
    let signals = skipped.iter().any(|k| k == "pid");
    let sockets = skipped.iter().any(|k| k == "network");
    (signals || sockets).then(|| kiln_sandbox::seccomp::guard(std::process::id(), signals, sockets))
}

/// Closes every descriptor but `keep`. Runs in a freshly forked child that still sees
/// `/proc`; if it does not, falls back to closing a generous range.
fn close_all_but(keep: &[RawFd]) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (0..4096).collect(),
    };
    for fd in fds.into_iter().filter(|fd| !keep.contains(fd)) {
        // SAFETY: closing this child's copies; nothing in it uses them afterwards.
        unsafe { libc::close(fd) };
    }
}

fn set_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// A compile child that has been started.
pub(crate) struct Compile {
    pid: Pid,
    answer: File,
}

impl Compile {
    /// Forks a child that confines itself as `conf` says, compiles `wasm` as a `kind` (Winch
    /// first when `baseline`, Cranelift if Winch refuses it or when not `baseline`) and sends
    /// the artifact back. The caller must be single-threaded; it may do other work before
    /// [`Compile::wait`].
    pub(crate) fn start(
        engine: &wasmtime::Engine,
        wasm: &[u8],
        kind: Kind,
        baseline: bool,
        conf: &Confinement<'_>,
    ) -> Result<Compile, CacheError> {
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| CacheError::Compiler(format!("pipe: {e}")))?;
        // SAFETY: the caller guarantees the process is single-threaded, so the child is a
        // complete copy.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(read_end);
                let out = write_end.as_raw_fd();
                close_all_but(&[out, conf.root]);
                let code = child(engine, wasm, kind, baseline, conf, File::from(write_end));
                // SAFETY: leaving the forked child without the worker's destructors.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(write_end);
                Ok(Compile {
                    pid: child,
                    answer: File::from(read_end),
                })
            }
            Err(e) => Err(CacheError::Compiler(format!("fork: {e}"))),
        }
    }

    /// The artifact and which compiler made it.
    pub(crate) fn wait(mut self) -> Result<(Vec<u8>, Compiler), CacheError> {
        let mut msg = Vec::new();
        let read = self.answer.read_to_end(&mut msg);
        decode(msg, read.is_ok(), waitpid(self.pid, None))
    }
}

fn precompile(engine: &wasmtime::Engine, wasm: &[u8], kind: Kind) -> wasmtime::Result<Vec<u8>> {
    match kind {
        Kind::Module => engine.precompile_module(wasm),
        Kind::Component => engine.precompile_component(wasm),
    }
}

fn child(
    engine: &wasmtime::Engine,
    wasm: &[u8],
    kind: Kind,
    baseline: bool,
    conf: &Confinement<'_>,
    mut out: File,
) -> i32 {
    let none = CapabilitySets::default();
    // SAFETY: the root descriptor was kept open for this; the child owns its copy.
    let root = unsafe { std::os::fd::BorrowedFd::borrow_raw(conf.root) };
    let guard = guard_for(conf.skipped);
    let confined = finish(
        &kiln_sandbox::Linux,
        &Final {
            user: &conf.user,
            caps: &none,
            rlimits: conf.rlimits,
            root,
            seccomp: conf.seccomp,
            guard: guard.as_ref(),
        },
    );
    // SAFETY: the chroot holds the directory now; this child's copy of the descriptor goes.
    unsafe { libc::close(conf.root) };
    if let Err(e) = confined {
        let _ = out.write_all(&[REJECTED]);
        let _ = out.write_all(format!("could not confine the compiler: {e}").as_bytes());
        return 4;
    }
    // Changing credentials cleared any parent-death signal; the compile belongs to its parent.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    set_name(c"kiln-compile");
    let mut result = None;
    if baseline
        && let Ok(b) = crate::engine::new_baseline_engine()
        && let Ok(a) = precompile(&b, wasm, kind)
    {
        // Winch does not take every module; Cranelift may take the rest.
        result = Some((a, Compiler::Baseline));
    }
    let result = match result {
        Some(r) => Ok(r),
        None => precompile(engine, wasm, kind).map(|a| (a, Compiler::Optimizing)),
    };
    match result {
        Ok((artifact, compiler)) => {
            let mut head = vec![ARTIFACT, u8::from(compiler == Compiler::Baseline)];
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
    }
}

fn decode(
    msg: Vec<u8>,
    read_ok: bool,
    status: nix::Result<WaitStatus>,
) -> Result<(Vec<u8>, Compiler), CacheError> {
    match (msg.first().copied(), status) {
        (Some(REJECTED), _) => Err(rejected(&msg)),
        (Some(ARTIFACT), Ok(WaitStatus::Exited(_, 0))) if read_ok => parse(msg),
        (_, Ok(WaitStatus::Signaled(_, sig, _))) => Err(CacheError::Compiler(format!(
            "killed by {sig}{}",
            if sig == nix::sys::signal::Signal::SIGKILL {
                " (out of memory within the container's memory limit?)"
            } else if sig == nix::sys::signal::Signal::SIGSYS {
                " (a system call the seccomp profile forbids)"
            } else {
                ""
            }
        ))),
        (_, status) => Err(CacheError::Compiler(format!(
            "ended without an artifact ({status:?})"
        ))),
    }
}

fn rejected(msg: &[u8]) -> CacheError {
    let text = String::from_utf8_lossy(&msg[1..]).into_owned();
    if text.starts_with("could not confine") {
        CacheError::Compiler(text)
    } else {
        CacheError::Compile(wasmtime::Error::msg(text))
    }
}

/// A child's whole answer: the artifact, once its announced length has all arrived.
fn parse(mut msg: Vec<u8>) -> Result<(Vec<u8>, Compiler), CacheError> {
    if msg.len() < 10 {
        return Err(CacheError::Compiler("sent a short answer".to_string()));
    }
    let compiler = if msg[1] == 1 {
        Compiler::Baseline
    } else {
        Compiler::Optimizing
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(&msg[2..10]);
    let len = u64::from_le_bytes(len);
    if msg.len() as u64 - 10 != len {
        return Err(CacheError::Compiler(format!(
            "sent {} of {len} artifact bytes",
            msg.len() - 10
        )));
    }
    msg.drain(..10);
    Ok((msg, compiler))
}

/// The cache fill's cgroup limits, from containerd's environment: `KILN_FILL_CPUS` (CPUs, may
/// be fractional; default 1) and `KILN_FILL_MEMORY` (bytes; default 1 GiB). Every cache fill
/// of the node shares the cgroup `/kiln/cache-fill`, so these bound them together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FillLimits {
    /// CPUs.
    pub cpus: f64,
    /// Bytes.
    pub memory: i64,
}

impl FillLimits {
    pub(crate) fn from_env() -> FillLimits {
        let cpus = std::env::var("KILN_FILL_CPUS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|c| *c > 0.0)
            .unwrap_or(1.0);
        let memory = std::env::var("KILN_FILL_MEMORY")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|m| *m > 0)
            .unwrap_or(1 << 30);
        FillLimits { cpus, memory }
    }

    fn resources(self) -> kiln_cgroups::Resources {
        const PERIOD: u64 = 100_000;
        kiln_cgroups::Resources {
            memory_limit: Some(self.memory),
            cpu_quota: Some((self.cpus * PERIOD as f64) as i64),
            cpu_period: Some(PERIOD),
            ..kiln_cgroups::Resources::default()
        }
    }
}

/// The cgroup every cache fill of the node runs in.
pub(crate) const FILL_CGROUP: &str = "/kiln/cache-fill";

/// The keeper of a cache miss (see the module docs), as the worker holds it.
pub(crate) struct Keeper {
    pid: Pid,
    ctl: File,
    /// Baseline mode: closes once the keeper has left the container's cgroup.
    moved: Option<File>,
}

/// What the keeper needs.
pub(crate) struct KeeperArgs<'a> {
    /// The optimizing engine.
    pub engine: &'a wasmtime::Engine,
    /// The cache to fill.
    pub cache: &'a Cache,
    /// The binary.
    pub wasm: &'a [u8],
    /// Its cache key, computed by the worker before any compiler ran.
    pub key: &'a Key,
    /// Module or component.
    pub kind: Kind,
    /// Baseline mode: fill in the background; otherwise store what the worker sends.
    pub baseline: bool,
    /// Its compile child's confinement (identity mapped to the host's ids: the keeper stays in
    /// the host's namespaces).
    pub confinement: Confinement<'a>,
}

const GO: u8 = b'g';

impl Keeper {
    /// Forks the keeper. The worker must be root, single-threaded, and not yet in the
    /// container's namespaces.
    pub(crate) fn spawn(args: &KeeperArgs<'_>) -> Result<Keeper, String> {
        let (ctl_read, ctl_write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        let (moved_read, moved_write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        // SAFETY: the worker is single-threaded during setup (checked by the caller).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                drop(ctl_write);
                drop(moved_read);
                close_all_but(&[
                    ctl_read.as_raw_fd(),
                    moved_write.as_raw_fd(),
                    args.confinement.root,
                ]);
                let code = keeper_main(args, File::from(ctl_read), File::from(moved_write));
                // SAFETY: leaving the forked child without the worker's destructors.
                unsafe { libc::_exit(code) }
            }
            Ok(ForkResult::Parent { child }) => Ok(Keeper {
                pid: child,
                ctl: File::from(ctl_write),
                moved: args.baseline.then(|| File::from(moved_read)),
            }),
            Err(e) => Err(format!("fork the cache keeper: {e}")),
        }
    }

    /// Baseline mode: the worker has its module; the keeper may start the optimizing compile.
    /// Returns once the keeper is out of the container's cgroup (or gave up); the guest must
    /// not start before, or a guest that exits at once would have the fill killed with its
    /// cgroup.
    pub(crate) fn go(mut self) -> bool {
        let moved = match self.moved.take() {
            Some(mut m) => {
                let mut buf = Vec::new();
                let _ = m.read_to_end(&mut buf);
                !buf.is_empty()
            }
            None => false,
        };
        if moved {
            let _ = self.ctl.write_all(&[GO]);
        } else {
            log::warn!("the cache fill could not leave the container's cgroup; not filling");
        }
        moved
    }

    /// Optimized mode: hands the artifact over and waits until it is stored.
    pub(crate) fn store(mut self, artifact: &[u8]) -> bool {
        let mut head = vec![b'a'];
        head.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
        let sent = self
            .ctl
            .write_all(&head)
            .and_then(|()| self.ctl.write_all(artifact))
            .is_ok();
        drop(self.ctl);
        matches!(waitpid(self.pid, None), Ok(WaitStatus::Exited(_, 0))) && sent
    }
}

/// The keeper: root, outside the container's namespaces, holding only its pipes and the empty
/// root its compile child is chrooted into.
fn keeper_main(args: &KeeperArgs<'_>, mut ctl: File, mut moved: File) -> i32 {
    retitle(&format!("kiln-cache-fill {}", args.key));
    if args.baseline {
        // SAFETY: setpriority with integer arguments: the fill yields to the containers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if join_fill_cgroup().is_err() {
            // Still in the container's cgroup: its deletion would kill the fill halfway.
            return 4;
        }
        let _ = moved.write_all(b"1");
    }
    drop(moved);
    let mut kind = [0u8; 1];
    if ctl.read_exact(&mut kind).is_err() {
        return 0;
    }
    match kind[0] {
        GO => {
            let Some(_lock) = args.cache.try_lock_fill(args.key) else {
                return 0;
            };
            if args.cache.artifact(args.key, args.kind).is_some() {
                return 0;
            }
            let compiled =
                Compile::start(args.engine, args.wasm, args.kind, false, &args.confinement)
                    .and_then(Compile::wait);
            match compiled {
                Ok((artifact, Compiler::Optimizing)) => store(args, &artifact),
                _ => 6,
            }
        }
        b'a' => {
            let mut len = [0u8; 8];
            if ctl.read_exact(&mut len).is_err() {
                return 5;
            }
            let mut artifact = vec![0u8; u64::from_le_bytes(len) as usize];
            if ctl.read_exact(&mut artifact).is_err() {
                return 5;
            }
            store(args, &artifact)
        }
        _ => 5,
    }
}

fn store(args: &KeeperArgs<'_>, artifact: &[u8]) -> i32 {
    match args.cache.store(args.key, args.kind, artifact) {
        Ok(()) => 0,
        Err(_) => 5,
    }
}

/// Moves the calling process into the node's cache-fill cgroup, creating it with its limits.
fn join_fill_cgroup() -> Result<(), String> {
    let layout = kiln_cgroups::Layout::detect().map_err(|e| e.to_string())?;
    let limits = FillLimits::from_env();
    let cg = kiln_cgroups::Cgroup::create(&layout, FILL_CGROUP, FILL_CGROUP, &limits.resources())
        .map_err(|e| e.to_string())?;
    cg.add_pid(std::process::id() as i32)
        .map_err(|e| e.to_string())
}

/// Renames this process (its `comm` and its command line): the fill outlives the container it
/// was forked for, and must not look like that container's shim in `ps` or to tools that find
/// a container's processes by the id in their command line (it inherited the shim's argv).
fn retitle(title: &str) {
    if let Ok(name) = std::ffi::CString::new(&title.as_bytes()[..title.len().min(15)]) {
        set_name(&name);
    }
    crate::process::set_cmdline(title);
}

/// An empty, read-only directory for a compile child's root.
pub(crate) fn empty_root() -> Result<OwnedFd, String> {
    kiln_sandbox::mounts::device_dir(&[]).map_err(|e| format!("empty root for the compiler: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn exited(code: i32) -> nix::Result<WaitStatus> {
        Ok(WaitStatus::Exited(Pid::from_raw(1), code))
    }

    fn answer(compiler: u8, len: u64, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![ARTIFACT, compiler];
        msg.extend_from_slice(&len.to_le_bytes());
        msg.extend_from_slice(body);
        msg
    }

    #[test]
    fn a_whole_artifact_is_returned_with_its_compiler() {
        let (a, c) = decode(answer(1, 3, b"abc"), true, exited(0)).expect("artifact");
        assert_eq!((a.as_slice(), c), (&b"abc"[..], Compiler::Baseline));
        let (_, c) = decode(answer(0, 3, b"abc"), true, exited(0)).expect("artifact");
        assert_eq!(c, Compiler::Optimizing);
    }

    #[test]
    fn a_short_or_unfinished_artifact_is_an_error() {
        let err = decode(answer(0, 4, b"abc"), true, exited(0)).unwrap_err();
        assert!(err.to_string().contains("3 of 4"), "{err}");
        // A whole message from a child that did not exit 0 is not trusted either.
        assert!(decode(answer(0, 3, b"abc"), true, exited(3)).is_err());
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

    #[test]
    fn fill_limits_default_and_read_the_environment() {
        let l = FillLimits::from_env();
        assert!(l.cpus > 0.0 && l.memory > 0);
        let r = FillLimits {
            cpus: 0.5,
            memory: 256 << 20,
        }
        .resources();
        assert_eq!((r.cpu_quota, r.cpu_period), (Some(50_000), Some(100_000)));
        assert_eq!(r.memory_limit, Some(256 << 20));
    }
}
