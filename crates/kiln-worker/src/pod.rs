//! The pod sandbox: what the CRI's "pause" container is for a Kiln pod, without a native
//! pause binary.
//!
//! It holds the pod's cgroup and the namespaces the pod's containers join (the CRI creates the
//! network namespace and passes its path; ipc and uts are created here, with the pod's
//! hostname and sysctls), drops to its spec's identity like any worker, and then only waits:
//! for SIGTERM or SIGINT, after which it exits 0, as pause does, or for SIGKILL.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use log::debug;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

use crate::protocol::{START_BYTE, SpawnRequest, WorkerReport};
use crate::status::EXIT_SETUP_FAILED;

fn setup(req: &SpawnRequest) -> Result<(), String> {
    let plan = &req.plan;
    let pid = std::process::id().to_string();
    for procs in &req.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    if let Some(adj) = plan.sandbox.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("set oom_score_adj to {adj}: {e}"))?;
    }
    crate::stdio::install(&req.stdio)?;
    let root = crate::compile::empty_root()?;
    kiln_sandbox::namespaces::enter(&plan.namespaces, &plan.sandbox).map_err(|e| e.to_string())?;
    let guard = crate::compile::guard_for(&plan.sandbox.skipped);
    kiln_sandbox::identity::finish(
        &kiln_sandbox::Linux,
        &kiln_sandbox::identity::Final {
            user: &plan.user,
            caps: &plan.sandbox.capabilities,
            rlimits: &plan.sandbox.rlimits,
            root: root.as_fd(),
            seccomp: req.seccomp.as_ref(),
            guard: guard.as_ref(),
        },
    )
    .map_err(|e| e.to_string())
}

/// Runs the sandbox to its end and returns its exit status.
pub(crate) fn main(req: SpawnRequest, chan: OwnedFd) -> i32 {
    let mut chan = UnixStream::from(chan);
    let report = match setup(&req) {
        Ok(()) => WorkerReport::Ready {
            cache: "none".to_string(),
            load_us: 0,
        },
        Err(error) => WorkerReport::Failed { error },
    };
    let failed = matches!(report, WorkerReport::Failed { .. });
    if let Ok(mut line) = serde_json::to_vec(&report) {
        line.push(b'\n');
        let _ = chan.write_all(&line);
    }
    if failed {
        return EXIT_SETUP_FAILED;
    }
    let mut byte = [0u8; 1];
    match chan.read(&mut byte) {
        Ok(1) if byte[0] == START_BYTE => {}
        _ => return EXIT_SETUP_FAILED,
    }
    drop(chan);
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        return EXIT_SETUP_FAILED;
    }
    loop {
        match set.wait() {
            Ok(sig) => {
                debug!("pod sandbox {}: {sig}; exiting", req.plan.id);
                return 0;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return EXIT_SETUP_FAILED,
        }
    }
}
