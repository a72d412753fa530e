//! Running commands with a deadline and capturing what they print.

use std::fmt;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long to wait for a command's pipes to reach end-of-file after it exited. Something else
/// holding them open (a daemon that inherited them) must not hang a test.
const PIPE_GRACE: Duration = Duration::from_secs(3);

/// `KILN_E2E_SLOW=N` multiplies every deadline of the harness (commands, and the waits of
/// [`wait_until`]) by N; default 1. The deadlines only catch hangs, and they are set for a real
/// node: a node whose CPUs are emulated (scripts/vm-v2.sh) runs everything 10–50 times slower.
pub fn slow_factor() -> u32 {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *FACTOR.get_or_init(|| {
        std::env::var("KILN_E2E_SLOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n >= 1)
            .unwrap_or(1)
    })
}

/// A deadline of the harness, scaled by [`slow_factor`].
pub fn deadline(timeout: Duration) -> Duration {
    timeout * slow_factor()
}

/// What a finished (or timed-out) command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmd: String,
    /// The exit status; `None` when killed by a signal (including our own timeout kill).
    pub status: Option<i32>,
    /// The signal that ended the process, if any.
    pub signal: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// The deadline passed and the process was killed.
    pub timed_out: bool,
    /// From spawn to exit.
    pub elapsed: Duration,
}

impl Output {
    /// The exit status, or -1 when there is none (signal, timeout).
    pub fn code(&self) -> i32 {
        self.status.unwrap_or(-1)
    }

    /// Exited with status 0 within the deadline.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status == Some(0)
    }

    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn expect_success(self) -> Output {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// stdout and stderr together, for "the message mentions X" checks.
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  command: {}", self.cmd)?;
        match (self.timed_out, self.status, self.signal) {
            (true, _, _) => writeln!(f, "  result:  TIMED OUT after {:?} (killed)", self.elapsed)?,
            (false, Some(s), _) => {
                writeln!(f, "  result:  exit status {s} after {:?}", self.elapsed)?
            }
            (false, None, Some(sig)) => writeln!(
                f,
                "  result:  killed by signal {sig} after {:?}",
                self.elapsed
            )?,
            (false, None, None) => writeln!(f, "  result:  unknown")?,
        }
        writeln!(f, "  stdout:  {}", indent(&self.stdout))?;
        write!(f, "  stderr:  {}", indent(&self.stderr))
    }
}

fn indent(s: &str) -> String {
    if s.is_empty() {
        return "(empty)".to_string();
    }
    s.trim_end().replace('\n', "\n           ")
}

/// Shell-like rendering of a command, for messages.
pub fn render(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '"', '\'', '\\']) {
            parts.push(format!("{a:?}"));
        } else {
            parts.push(a.into_owned());
        }
    }
    parts.join(" ")
}

/// A running command whose stdout and stderr are being collected.
pub struct Proc {
    cmd: String,
    child: Child,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<Vec<u8>>,
    started: Instant,
    /// Kept open for as long as the process runs (e.g. a pty master).
    _keep: Option<OwnedFd>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr piped. stdin is /dev/null unless the caller set it.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Proc> {
        Self::spawn_keep(&mut cmd, None)
    }

    fn spawn_keep(cmd: &mut Command, keep: Option<OwnedFd>) -> std::io::Result<Proc> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let rendered = render(cmd);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run `{rendered}`: {e}")))?;
        let out = collect(child.stdout.take());
        let err = collect(child.stderr.take());
        Ok(Proc {
            cmd: rendered,
            child,
            out,
            err,
            started,
            _keep: keep,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (without reaping the output).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `timeout` (scaled by [`slow_factor`]) for the process; kills it when the
    /// deadline passes.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + deadline(timeout);
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        let elapsed = self.started.elapsed();
        let take = |rx: &mpsc::Receiver<Vec<u8>>| match rx.recv_timeout(PIPE_GRACE) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => "<output pipe still open after the process exited>".to_string(),
        };
        let stdout = take(&self.out);
        let stderr = take(&self.err);
        use std::os::unix::process::ExitStatusExt;
        Output {
            cmd: self.cmd.clone(),
            status: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout,
            stderr,
            timed_out,
            elapsed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

impl Output {
    /// The result of a command that could not even be started.
    fn spawn_failed(e: &dyn std::fmt::Display) -> Output {
        Output {
            cmd: e.to_string(),
            status: None,
            signal: None,
            stdout: String::new(),
            stderr: e.to_string(),
            timed_out: false,
            elapsed: Duration::ZERO,
        }
    }
}

/// Runs `cmd` (stdin /dev/null) with a deadline.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null());
    match Proc::spawn(cmd) {
        Ok(p) => p.wait(timeout),
        Err(e) => Output::spawn_failed(&e),
    }
}

/// Runs `cmd` with a pseudo-terminal as its stdin (stdout and stderr stay pipes), as a user
/// typing `ctr run -t` in a terminal would.
pub fn run_with_tty(mut cmd: Command, timeout: Duration) -> Output {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two fds into the given ints; the other arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    cmd.stdin(Stdio::from(slave));
    match Proc::spawn_keep(&mut cmd, Some(master)) {
        Ok(p) => p.wait(timeout),
        Err(e) => Output::spawn_failed(&e),
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` (scaled by [`slow_factor`])
/// passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + deadline(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
