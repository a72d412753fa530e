//! The worker: one process per container, forked by the zygote.
//!
//! Setup happens at Create, in the order the kernel needs: join the cgroup first (so
//! everything after, compile included, is accounted to the container; on cgroup v2 the zygote
//! has already cloned the worker into it, and there is nothing to join), bind stdio, load the
//! module (as root, while the host's cache directory is still reachable), open the preopened
//! directories, then join namespaces and drop to the container's user. The worker then tells
//! the shim it is ready and waits: guest code runs only after containerd's Start, as with
//! runc's create/start split, so that tools may set the container up between the two using its
//! real pid.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::debug;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

use crate::protocol::{START_BYTE, SpawnRequest, WorkerReport};
use crate::{EXIT_SETUP_FAILED, run};

/// Runs the worker to completion and returns its exit status.
pub(crate) fn main(engine: &wasmtime::Engine, req: SpawnRequest, chan: OwnedFd) -> i32 {
    // The zygote blocks SIGCHLD for its signalfd; a worker starts with a clean mask.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let (Some(path), Some(redirect)) = (&req.log_path, crate::LOG_REDIRECT.get()) {
        redirect(&req.plan.id, path);
    }
    let mut chan = UnixStream::from(chan);
    let id = req.plan.id.clone();
    let prepared = match setup(engine, &req) {
        Ok(p) => p,
        Err(error) => {
            report(&mut chan, &WorkerReport::Failed { error });
            return EXIT_SETUP_FAILED;
        }
    };
    report(
        &mut chan,
        &WorkerReport::Ready {
            cache: prepared.cache.clone(),
            load_us: prepared.load_us,
        },
    );
    let mut byte = [0u8; 1];
    match chan.read(&mut byte) {
        Ok(1) if byte[0] == START_BYTE => {}
        _ => {
            debug!("worker {id}: released without a start; exiting");
            return EXIT_SETUP_FAILED;
        }
    }
    drop(chan);
    run::run(prepared)
}

fn report(chan: &mut UnixStream, r: &WorkerReport) {
    if let Ok(mut line) = serde_json::to_vec(r) {
        line.push(b'\n');
        let _ = chan.write_all(&line);
    }
}

fn setup(engine: &wasmtime::Engine, req: &SpawnRequest) -> Result<run::Prepared, String> {
    let plan = &req.plan;
    let t0 = Instant::now();
    let pid = std::process::id().to_string();
    for procs in &req.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    let t_cgroup = t0.elapsed();
    crate::stdio::install(&req.stdio)?;
    debug!(
        "worker {}: joined cgroup in {t_cgroup:?}, stdio bound at {:?}",
        plan.id,
        t0.elapsed()
    );

    let started = Instant::now();
    let cache = kiln_cache::Cache::open(&req.cache_root, engine);
    let wasm = std::fs::read(&plan.module_path).map_err(|source| {
        describe_load_error(
            plan,
            kiln_cache::CacheError::Read {
                path: plan.module_path.clone(),
                source,
            },
        )
    })?;
    let (module, outcome) = match cache.lookup(engine, &wasm) {
        Some(m) => (m, kiln_cache::Outcome::Hit),
        None => {
            let baseline = (cache.dir().is_some() && baseline_first_start())
                .then(|| {
                    let b = crate::compile::Baseline {
                        engine,
                        cache: &cache,
                        home_cgroup_procs: &req.home_cgroup_procs,
                    };
                    crate::compile::baseline_first_start(&b, &wasm)
                })
                .flatten();
            match baseline {
                Some(m) => (m, kiln_cache::Outcome::Baseline),
                None => cache
                    .load_bytes_with(engine, &wasm, crate::compile::in_child)
                    .map_err(|e| describe_load_error(plan, e))?,
            }
        }
    };
    drop(wasm);
    let load_us = started.elapsed().as_micros() as u64;
    debug!(
        "worker {}: module {} loaded ({outcome:?}) in {load_us} us",
        plan.id,
        plan.module_path.display()
    );
    let prepared = run::prepare(module, plan, format!("{outcome:?}").to_lowercase(), load_us)?;

    for ns in plan.namespaces.iter().filter(|n| n.kind == "user") {
        join(&ns.kind, &ns.path)?;
    }
    for ns in plan
        .namespaces
        .iter()
        .filter(|n| n.kind != "user" && n.kind != "pid")
    {
        join(&ns.kind, &ns.path)?;
    }
    set_user(plan)?;
    Ok(prepared)
}

/// `KILN_FIRST_START` in containerd's environment: `baseline` (the default) starts a module
/// that is not in the compile cache with the baseline compiler's code, for the rest of that
/// container's life; `optimized` makes that start wait for the optimizing compile instead.
const FIRST_START_ENV: &str = "KILN_FIRST_START";

fn baseline_first_start() -> bool {
    match std::env::var(FIRST_START_ENV).as_deref() {
        Ok("optimized") => false,
        Ok("baseline") | Ok("") | Err(_) => true,
        Ok(other) => {
            log::warn!("{FIRST_START_ENV}={other:?} is not baseline or optimized; using baseline");
            true
        }
    }
}

fn describe_load_error(plan: &kiln_plan::Plan, e: kiln_cache::CacheError) -> String {
    let is_component = std::fs::File::open(&plan.module_path)
        .and_then(|mut f| {
            let mut head = [0u8; 8];
            f.read_exact(&mut head).map(|()| head)
        })
        .map(|h| h[4..8] != [1, 0, 0, 0])
        .unwrap_or(false);
    let guest = plan.args.first().cloned().unwrap_or_default();
    if is_component {
        format!(
            "{guest} is a WebAssembly component; Kiln runs WASI preview 1 core modules \
             (build for wasm32-wasip1)"
        )
    } else {
        format!("cannot load {guest}: {e}")
    }
}

fn join(kind: &str, path: &std::path::Path) -> Result<(), String> {
    let flag = match kind {
        "network" => CloneFlags::CLONE_NEWNET,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        "uts" => CloneFlags::CLONE_NEWUTS,
        "mount" => CloneFlags::CLONE_NEWNS,
        "user" => CloneFlags::CLONE_NEWUSER,
        "cgroup" => CloneFlags::CLONE_NEWCGROUP,
        other => {
            return Err(format!(
                "joining a {other} namespace is not supported by Kiln"
            ));
        }
    };
    let f = std::fs::File::open(path)
        .map_err(|e| format!("open {kind} namespace {}: {e}", path.display()))?;
    setns(f.as_fd(), flag).map_err(|e| format!("join {kind} namespace {}: {e}", path.display()))
}

fn set_user(plan: &kiln_plan::Plan) -> Result<(), String> {
    let u = &plan.user;
    if let Some(mask) = u.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
            mask as libc::mode_t,
        ));
    }
    let me = Uid::effective();
    if me.is_root() {
        let groups: Vec<Gid> = u
            .additional_gids
            .iter()
            .map(|g| Gid::from_raw(*g))
            .collect();
        setgroups(&groups).map_err(|e| format!("setgroups {:?}: {e}", u.additional_gids))?;
        setgid(Gid::from_raw(u.gid)).map_err(|e| format!("setgid {}: {e}", u.gid))?;
        setuid(Uid::from_raw(u.uid)).map_err(|e| format!("setuid {}: {e}", u.uid))?;
    } else if me.as_raw() != u.uid {
        return Err(format!(
            "cannot run as uid {}: the shim runs as uid {} without privileges",
            u.uid,
            me.as_raw()
        ));
    }
    // Always: the guest has no business gaining privileges, whatever the spec says.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
