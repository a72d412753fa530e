//! Exit statuses as Linux shells report them, computed in one place: a process that exits with
//! `n` reports `n & 255`, one killed by signal `s` reports `128 + s`.

use nix::sys::wait::WaitStatus;

/// A container whose guest trapped (as an abort: 128 + SIGABRT).
pub const EXIT_TRAP: i32 = 134;
/// A worker that failed before running guest code.
pub const EXIT_SETUP_FAILED: i32 = 125;
/// A container killed with SIGKILL, or whose exit was lost (its zygote or shim died).
pub const EXIT_KILLED: i32 = 128 + libc::SIGKILL;

/// The status of a process killed by `signal`.
pub fn signaled(signal: i32) -> i32 {
    128 + signal
}

/// The status a guest's `exit(n)` reports: Linux keeps the low 8 bits.
pub fn exit_code(n: i32) -> i32 {
    n & 255
}

/// The status of a process that ended, from `waitpid`/`waitid`; `None` if it has not ended.
pub fn from_wait(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(exit_code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(signaled(sig as i32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn statuses_follow_the_shell() {
        let pid = Pid::from_raw(1);
        assert_eq!(from_wait(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            from_wait(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(from_wait(WaitStatus::StillAlive), None);
        assert_eq!(exit_code(256 + 7), 7);
        assert_eq!(exit_code(-1), 255);
        assert_eq!(EXIT_KILLED, 137);
    }
}
