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
//! environment turns the allowlist off (a spec's own profile is always applied).

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

/// Compiles Kiln's allowlist.
pub fn default_filter() -> Result<Filter> {
    let err = |e: libseccomp::error::SeccompError| Error::Seccomp(e.to_string());
    let mut ctx = ScmpFilterContext::new(ScmpAction::Errno(libc::ENOSYS)).map_err(err)?;
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
