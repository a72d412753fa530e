//! Making a worker die of the fault signals others send it, as any process would.
//!
//! Wasmtime handles SIGSEGV, SIGILL and SIGFPE to turn a guest's faults into traps, and Rust's
//! runtime handles SIGSEGV and SIGBUS to report stack overflows. Neither looks at who sent the
//! signal: a `kill -SEGV` from outside is taken for a fault, found not to be one, and
//! swallowed (the container keeps running), or, if the guest happens to be running Wasm code,
//! reported as a trap. A handler installed over theirs tells the two apart by `si_code`: a
//! signal sent by a process (`SI_USER`, `SI_TKILL`, `SI_QUEUE`: not positive) is delivered
//! with its default action, so the worker dies of it and the container reports 128 + signal;
//! a fault raised by the kernel goes on to Wasmtime's handler as before.

use std::sync::atomic::{AtomicBool, Ordering};

const SIGNALS: [libc::c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE];

/// The handlers ours replaced, indexed like `SIGNALS`. Written once before any fork, read
/// only by the handler.
static mut PREVIOUS: [libc::sigaction; 4] = unsafe { std::mem::zeroed() };
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn index(sig: libc::c_int) -> Option<usize> {
    SIGNALS.iter().position(|s| *s == sig)
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let from_process = unsafe { (*info).si_code } <= 0;
    let Some(i) = index(sig) else {
        return;
    };
    if from_process {
        // SAFETY: async-signal-safe calls only: restore the default action, unblock the
        // signal, send it to this thread again; if that did not end the process, exit as it
        // would have.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
            libc::_exit(crate::status::signaled(sig));
        }
    }
    // SAFETY: PREVIOUS was filled before this handler could run and is never written again.
    let prev = unsafe { std::ptr::addr_of!(PREVIOUS[i]).read() };
    let action = prev.sa_sigaction;
    if action == libc::SIG_DFL {
        // A real fault with nobody to handle it: die of it when the instruction runs again.
        // SAFETY: async-signal-safe.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    } else if action != libc::SIG_IGN {
        if prev.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
            // signature; it is called on the same stack, with the same arguments, as the
            // kernel would have called it.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(action) };
            f(sig, info, ctx);
        } else {
            // SAFETY: as above, for a plain handler.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
            f(sig);
        }
    }
}

/// Installs the handler over whatever is there (Wasmtime's, after the engine exists). Called
/// once in the zygote, whose workers inherit it through fork.
pub fn install() -> std::io::Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for (i, sig) in SIGNALS.iter().enumerate() {
        // SAFETY: sigaction with valid structures; PREVIOUS is written before the handler is
        // installed for that signal, and only here.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = handler as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut new.sa_mask);
            let prev = std::ptr::addr_of_mut!(PREVIOUS[i]);
            if libc::sigaction(*sig, std::ptr::null(), prev) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::sigaction(*sig, &new, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process with Wasmtime's handlers and ours, killed with SIGSEGV from outside, dies of
    /// SIGSEGV; without ours it would survive the first one.
    #[test]
    fn a_fault_signal_sent_from_outside_kills_the_process() {
        let engine = wasmtime::Engine::default();
        drop(engine);
        install().expect("install");
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            // SAFETY: the child only sleeps until it is killed.
            match unsafe { libc::fork() } {
                0 => unsafe {
                    loop {
                        libc::pause();
                    }
                },
                pid => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(pid, sig) };
                    let mut status = 0;
                    let mut survived = true;
                    for _ in 0..200 {
                        // SAFETY: our own child.
                        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                            survived = false;
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    if survived {
                        // SAFETY: our own child, which swallowed the signal.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                            libc::waitpid(pid, &mut status, 0);
                        }
                        panic!("signal {sig} sent from outside was swallowed");
                    }
                    let died_of = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
                    let exited = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
                    assert!(
                        died_of == Some(sig) || exited == Some(128 + sig),
                        "signal {sig}: status {status:#x}"
                    );
                }
            }
        }
    }
}
