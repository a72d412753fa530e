//! Seccomp filters: the spec's profile, or Kiln's own allowlist when the spec has none.
//!
//! A profile is compiled to BPF by libseccomp in the shim, at Create (a profile that cannot be
//! compiled fails Create with the reason, instead of a worker dying half set up), and the
//! worker only loads the bytes with `seccomp(2)`, as the very last step of its setup.
//!
//! Kiln's allowlist ([`DEFAULT_ALLOWED`]) is what a worker does after that point: Wasmtime
//! running code (memory mapping and protection, signal handling for traps, futexes for its
//! threads), WASI preview 1 and 2 (files through the preopened directories, clocks, random
//! numbers, polling, and sockets for components), the tokio runtime WASI uses, and the compile
//! children of a cache miss (fork, threads, pipes). Everything else fails with ENOSYS, which
//! libraries take as "not available here" and fall back from (`openat2`, `clone3`,
//! `process_madvise`); it never kills the worker. `KILN_SECCOMP=off` in containerd's
//! environment turns the allowlist off, `KILN_SECCOMP=log` logs what it would refuse instead
//! of refusing it (a spec's own profile is always applied).

use std::io;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use log::debug;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use crate::{Error, Result, check};

/// A compiled filter: BPF instructions (`struct sock_filter`, 8 bytes each) and the
/// `SECCOMP_FILTER_FLAG_*` flags to load it with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// The program.
    pub bpf: Vec<u8>,
    /// Flags for `seccomp(SECCOMP_SET_MODE_FILTER, flags, …)`.
    pub flags: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const u8,
}

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;
const SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: u32 = 32;

impl Filter {
    /// Loads the filter into the calling thread (and so into every process it forks). Needs
    /// no_new_privs or CAP_SYS_ADMIN.
    pub fn load(&self) -> io::Result<()> {
        if self.bpf.is_empty() || !self.bpf.len().is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a seccomp program of {} bytes", self.bpf.len()),
            ));
        }
        let prog = SockFprog {
            len: (self.bpf.len() / 8) as libc::c_ushort,
            filter: self.bpf.as_ptr(),
        };
        // SAFETY: `prog` points to `len` sock_filter entries that live for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                self.flags as libc::c_ulong,
                &prog as *const SockFprog,
            )
        };
        check(ret).map(drop)
    }
}

/// The system calls Kiln's allowlist lets a worker make (see the module docs). Names unknown
/// to the running architecture are skipped.
pub const DEFAULT_ALLOWED: &[&str] = &[
    // memory: Wasmtime maps, protects and resets linear memory and code; glibc's allocator
    "brk",
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "madvise",
    "msync",
    "mincore",
    "memfd_create",
    "membarrier",
    // threads and synchronisation (tokio, the parallel compiler, glibc)
    "clone",
    "clone3",
    "futex",
    "futex_waitv",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "set_tid_address",
    "sched_yield",
    "sched_getaffinity",
    "gettid",
    "getpid",
    "getppid",
    "exit",
    "exit_group",
    "wait4",
    "waitid",
    "restart_syscall",
    "arch_prctl",
    "prctl",
    // signals: Wasmtime's trap handling, and re-raising a fatal signal
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "sigaltstack",
    "kill",
    "tgkill",
    "tkill",
    // time and randomness (wasi:clocks, wasi:random)
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "time",
    "times",
    "getrandom",
    // descriptors and polling (tokio, WASI poll_oneoff and streams)
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "pipe",
    "pipe2",
    "fcntl",
    "ioctl",
    "lseek",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd",
    "eventfd2",
    // files through the preopened directories (WASI filesystem)
    "openat",
    "openat2",
    "open",
    "newfstatat",
    "fstat",
    "stat",
    "lstat",
    "statx",
    "fstatfs",
    "statfs",
    "getdents64",
    "readlinkat",
    "readlink",
    "faccessat",
    "faccessat2",
    "access",
    "mkdirat",
    "mkdir",
    "unlinkat",
    "unlink",
    "rmdir",
    "renameat",
    "renameat2",
    "rename",
    "linkat",
    "link",
    "symlinkat",
    "symlink",
    "fsync",
    "fdatasync",
    "ftruncate",
    "truncate",
    "fallocate",
    "utimensat",
    "fadvise64",
    "flock",
    "getcwd",
    "chdir",
    "fchdir",
    // sockets (wasi:sockets for components, wasi:http servers)
    "socket",
    "socketpair",
    "bind",
    "listen",
    "accept",
    "accept4",
    "connect",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "shutdown",
    // identity and limits, read only
    "uname",
    "sysinfo",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getgroups",
    "getresuid",
    "getresgid",
    "capget",
    "getrlimit",
    "prlimit64",
    "getrusage",
];

/// `struct sock_filter`: one classic BPF instruction.
fn insn(code: u16, jt: u8, jf: u8, k: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..2].copy_from_slice(&code.to_ne_bytes());
    b[2] = jt;
    b[3] = jf;
    b[4..].copy_from_slice(&k.to_ne_bytes());
    b
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_00b7;

/// The calls that reach other processes by pid.
const BY_PID: [libc::c_long; 4] = [
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
];
/// The calls that reach other processes in ways a pid check cannot confine.
const OTHER_PROCESSES: [libc::c_long; 9] = [
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pidfd_getfd,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_process_madvise,
];
/// The call that makes sockets that can reach something. `socketpair(2)` stays allowed: it
/// makes only a connected pair of local sockets (tokio's signal driver uses one).
const NEW_SOCKETS: [libc::c_long; 1] = [libc::SYS_socket];

/// The guard for the namespaces Kiln does not create (see `kiln_plan::Sandbox::skipped`):
/// with `signals`, the process (whose pid is `pid`) may signal only itself and cannot reach
/// another process at all; with `sockets`, it cannot make a socket. Stacked on top of the main
/// filter, it makes a worker taken over beyond Wasm unable to use the pid and network
/// namespaces it shares with the node. Written as BPF here because it depends on the
/// worker's pid, known only in the worker.
pub fn guard(pid: u32, signals: bool, sockets: bool) -> Filter {
    let mut by_pid: Vec<libc::c_long> = Vec::new();
    let mut denied: Vec<libc::c_long> = Vec::new();
    if signals {
        by_pid.extend(BY_PID);
        denied.extend(OTHER_PROCESSES);
    }
    if sockets {
        denied.extend(NEW_SOCKETS);
    }
    let compares = by_pid.len() + denied.len();
    // Layout: [0] load arch, [1] native? skip, [2] allow, [3] load nr, [4..4+n] compares,
    // [4+n] allow, then the self check (5 instructions), then deny.
    let self_at = 4 + compares + 1;
    let deny_at = self_at + 5;
    let mut prog: Vec<[u8; 8]> = vec![
        insn(BPF_LD_W_ABS, 0, 0, 4),
        insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_NATIVE),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        insn(BPF_LD_W_ABS, 0, 0, 0),
    ];
    for (i, nr) in by_pid.iter().chain(&denied).enumerate() {
        let here = 4 + i;
        let target = if i < by_pid.len() { self_at } else { deny_at };
        prog.push(insn(BPF_JEQ_K, (target - here - 1) as u8, 0, *nr as u32));
    }
    prog.push(insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
    // The first argument (pid or tgid) must be this process: low word, then high word.
    prog.push(insn(BPF_LD_W_ABS, 0, 0, 16));
    prog.push(insn(BPF_JEQ_K, 0, 3, pid));
    prog.push(insn(BPF_LD_W_ABS, 0, 0, 20));
    prog.push(insn(BPF_JEQ_K, 0, 1, 0));
    prog.push(insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW));
    prog.push(insn(
        BPF_RET_K,
        0,
        0,
        SECCOMP_RET_ERRNO | libc::EPERM as u32,
    ));
    Filter {
        bpf: prog.concat(),
        flags: 0,
    }
}

/// Compiles Kiln's allowlist.
pub fn default_filter() -> Result<Filter> {
    allowlist(ScmpAction::Errno(libc::ENOSYS))
}

/// Kiln's allowlist in audit mode: what it would refuse is allowed and logged by the kernel
/// (an audit record of type 1326, `SECCOMP`, in the kernel log), for finding what a workload
/// needs before it is refused.
pub fn audit_filter() -> Result<Filter> {
    allowlist(ScmpAction::Log)
}

fn allowlist(otherwise: ScmpAction) -> Result<Filter> {
    let err = |e: libseccomp::error::SeccompError| Error::Seccomp(e.to_string());
    let mut ctx = ScmpFilterContext::new(otherwise).map_err(err)?;
    for name in DEFAULT_ALLOWED {
        match ScmpSyscall::from_name(name) {
            Ok(s) => {
                ctx.add_rule(ScmpAction::Allow, s).map_err(err)?;
            }
            Err(_) => debug!("seccomp: {name} does not exist on this architecture"),
        }
    }
    export(&ctx, 0)
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction> {
    use LinuxSeccompAction::*;
    Ok(match a {
        ScmpActKill | ScmpActKillThread => ScmpAction::KillThread,
        ScmpActKillProcess => ScmpAction::KillProcess,
        ScmpActTrap => ScmpAction::Trap,
        // The runtime spec's default errno is EPERM.
        ScmpActErrno => ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32),
        ScmpActTrace => ScmpAction::Trace(errno.unwrap_or(libc::EPERM as u32) as u16),
        ScmpActLog => ScmpAction::Log,
        ScmpActAllow => ScmpAction::Allow,
        ScmpActNotify => {
            return Err(Error::Seccomp(
                "SCMP_ACT_NOTIFY needs a seccomp agent, which Kiln does not support".to_string(),
            ));
        }
    })
}

fn op(o: LinuxSeccompOperator, value_two: Option<u64>) -> ScmpCompareOp {
    use LinuxSeccompOperator::*;
    match o {
        ScmpCmpNe => ScmpCompareOp::NotEqual,
        ScmpCmpLt => ScmpCompareOp::Less,
        ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        ScmpCmpEq => ScmpCompareOp::Equal,
        ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        ScmpCmpGt => ScmpCompareOp::Greater,
        ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(value_two.unwrap_or(0)),
    }
}

/// Compiles the spec's `linux.seccomp` profile. Syscall names the running architecture does
/// not know are skipped, as runc skips them (profiles list every architecture's names).
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter> {
    let err = |e: libseccomp::error::SeccompError| Error::Seccomp(e.to_string());
    if profile.listener_path().is_some() {
        return Err(Error::Seccomp(
            "listenerPath (a seccomp agent) is not supported by Kiln".to_string(),
        ));
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(err)?;
    for arch in profile.architectures().iter().flatten() {
        let name = serde_json::to_value(arch)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let arch: ScmpArch = name
            .parse()
            .map_err(|_| Error::Seccomp(format!("unknown architecture {name}")))?;
        if arch != ScmpArch::native() {
            ctx.add_arch(arch).map_err(err)?;
        }
    }
    let mut flags = 0;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            }
        };
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            // libseccomp refuses a rule whose action is the default one; it would be a no-op.
            continue;
        }
        let conditions: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| ScmpArgCompare::new(a.index() as u32, op(a.op(), a.value_two()), a.value()))
            .collect();
        for name in rule.names() {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                debug!("seccomp: skipping {name}, unknown on this architecture");
                continue;
            };
            if conditions.is_empty() {
                ctx.add_rule(act, syscall)
            } else {
                ctx.add_rule_conditional(act, syscall, &conditions)
            }
            .map_err(|e| Error::Seccomp(format!("rule for {name}: {e}")))?;
        }
    }
    export(&ctx, flags)
}

/// Exports the program. libseccomp 2.5 (Debian 12's) writes BPF only to a descriptor, so it
/// goes through a memfd.
fn export(ctx: &ScmpFilterContext, flags: u32) -> Result<Filter> {
    // SAFETY: memfd_create with a static name; the descriptor is owned at once.
    let fd = unsafe {
        let fd = libc::memfd_create(c"kiln-seccomp".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(Error::Sys {
                what: "memfd_create for the seccomp program".to_string(),
                source: io::Error::last_os_error(),
            });
        }
        OwnedFd::from_raw_fd(fd)
    };
    ctx.export_bpf(&fd)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    let mut file = std::fs::File::from(fd);
    let mut bpf = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut bpf))
        .map_err(|source| Error::Sys {
            what: format!("read the seccomp program back (fd {})", file.as_raw_fd()),
            source,
        })?;
    Ok(Filter { bpf, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that loads `filter` (setting no_new_privs first), calls `probe` and exits
    /// with the errno it got (0 for success). The child makes only async-signal-safe calls.
    fn errno_in_child(filter: &Filter, probe: fn() -> libc::c_long) -> i32 {
        // SAFETY: the child calls prctl, seccomp, the probe and _exit only.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter.load().is_err() {
                    libc::_exit(250);
                }
                let ret = probe();
                libc::_exit(if ret < 0 {
                    *libc::__errno_location()
                } else {
                    0
                })
            },
            pid => {
                let mut status = 0;
                // SAFETY: our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status}");
                let code = libc::WEXITSTATUS(status);
                assert_ne!(code, 250, "the filter did not load");
                code
            }
        }
    }

    fn getpid() -> libc::c_long {
        // SAFETY: a raw getpid.
        unsafe { libc::syscall(libc::SYS_getpid) }
    }

    fn mkdirat() -> libc::c_long {
        // SAFETY: mkdirat of a path that exists: EEXIST when allowed.
        unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, c"/".as_ptr(), 0o755) }
    }

    fn acct() -> libc::c_long {
        // SAFETY: acct(NULL) turns accounting off; denied by the allowlist before the kernel
        // sees it.
        unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) }
    }

    #[test]
    fn the_allowlist_allows_what_wasm_needs_and_fails_the_rest_with_enosys() {
        let filter = default_filter().expect("compile");
        assert_eq!(errno_in_child(&filter, getpid), 0);
        assert_eq!(errno_in_child(&filter, mkdirat), libc::EEXIST);
        assert_eq!(errno_in_child(&filter, acct), libc::ENOSYS);
    }

    #[test]
    fn the_audit_allowlist_lets_through_what_the_allowlist_refuses() {
        let filter = audit_filter().expect("compile");
        assert_eq!(errno_in_child(&filter, getpid), 0);
        assert_ne!(
            errno_in_child(&filter, acct),
            libc::ENOSYS,
            "logged, not refused"
        );
    }

    #[test]
    fn a_spec_profile_denies_what_it_lists() {
        let profile: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
            "syscalls": [
                {"names": ["mkdirat", "mkdir", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
            ]
        }))
        .expect("profile");
        let filter = compile(&profile).expect("compile");
        assert_eq!(errno_in_child(&filter, getpid), 0);
        assert_eq!(errno_in_child(&filter, mkdirat), libc::EACCES);
    }

    fn kill_init() -> libc::c_long {
        // SAFETY: signal 0 only checks that the signal could be sent.
        unsafe { libc::syscall(libc::SYS_kill, 1, 0) }
    }

    fn kill_self() -> libc::c_long {
        // SAFETY: signal 0 to ourselves.
        unsafe { libc::syscall(libc::SYS_kill, libc::getpid(), 0) }
    }

    fn raise_self() -> libc::c_long {
        // SAFETY: signal 0 to our own thread, through tgkill (what raise(3) uses).
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) }
    }

    fn socket() -> libc::c_long {
        // SAFETY: a socket that is leaked at once by the exiting child.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) }
    }

    /// The guard is generated for the child's own pid, so it is built in the child: a copy of
    /// the guard for another pid would refuse the child's own signals.
    fn guarded(signals: bool, sockets: bool, probe: fn() -> libc::c_long) -> i32 {
        // SAFETY: the child only builds a small Vec, makes raw syscalls and exits.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if guard(libc::getpid() as u32, signals, sockets)
                    .load()
                    .is_err()
                {
                    libc::_exit(250);
                }
                let ret = probe();
                libc::_exit(if ret < 0 {
                    *libc::__errno_location()
                } else {
                    0
                })
            },
            pid => {
                let mut status = 0;
                // SAFETY: our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status}");
                let code = libc::WEXITSTATUS(status);
                assert_ne!(code, 250, "the guard did not load");
                code
            }
        }
    }

    #[test]
    fn the_guard_lets_a_process_signal_only_itself_and_make_no_socket() {
        assert_eq!(guarded(true, true, kill_init), libc::EPERM, "signal pid 1");
        assert_eq!(guarded(true, true, kill_self), 0, "signal itself");
        assert_eq!(guarded(true, true, raise_self), 0, "raise");
        assert_eq!(guarded(true, true, socket), libc::EPERM, "socket");
        assert_eq!(guarded(false, false, kill_init), 0, "no guard for signals");
        assert_eq!(guarded(true, false, socket), 0, "no guard for sockets");
    }

    #[test]
    fn notify_profiles_are_refused() {
        let profile: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdirat"], "action": "SCMP_ACT_NOTIFY"}]
        }))
        .expect("profile");
        let e = compile(&profile).expect_err("notify");
        assert!(e.to_string().contains("NOTIFY"), "{e}");
    }
}
