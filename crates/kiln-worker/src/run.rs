//! Running the guest: instantiate the module with WASI preview 1 and call its entrypoint.
//!
//! Everything that can be checked without running guest code (imports, the entrypoint's
//! export and type) is checked in [`prepare`], at Create, so a wrong module fails `ctr run`
//! with a message instead of starting and dying. Exit statuses follow what users know from
//! runc: `proc_exit(n)` is n, returning from the entry is 0, a trap is 134 (as if aborted), and
//! signals are left to the kernel (so SIGTERM gives 143 and SIGKILL 137).

use std::io::Write;
use std::time::Instant;

use kiln_plan::Plan;
use log::debug;
use wasmtime::{ExternType, InstancePre, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::status::EXIT_TRAP;

/// Memory kept back from a container's memory limit for the worker itself (runtime, stacks,
/// page tables), so that a guest's `memory.grow` fails inside the guest before the kernel's
/// OOM killer sees the cgroup reach its limit.
const RUNTIME_RESERVE: u64 = 16 << 20;

/// Per-store state: the WASI context and the memory limiter.
pub(crate) struct Host {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// A container ready to run: everything checked, nothing executed.
pub(crate) struct Prepared {
    id: String,
    entry: String,
    pre: InstancePre<Host>,
    wasi: WasiP1Ctx,
    memory_cap: Option<usize>,
}

/// The cap on a guest's linear memory for a container memory limit.
pub fn memory_cap(limit: Option<i64>) -> Option<usize> {
    let limit = u64::try_from(limit?).ok().filter(|l| *l > 0)?;
    let reserve = RUNTIME_RESERVE.min(limit / 2);
    usize::try_from(limit - reserve).ok()
}

/// The guest's WASI context: args, env, stdio, and its directories, each opened through the
/// worker's detached mount of it (`dirs`, index-aligned with `plan.preopens`), plus its `/dev`
/// and its working directory. Called before the worker is chrooted: the directories are
/// opened by `/proc/self/fd` path, the one way wasmtime-wasi takes a preopen.
pub(crate) fn wasi_ctx(plan: &Plan, dirs: &crate::worker::Dirs) -> Result<WasiP1Ctx, String> {
    let mut b = WasiCtxBuilder::new();
    b.args(&plan.args);
    b.envs(&plan.env);
    b.inherit_stdio();
    // File I/O on the guest's own thread: a worker runs one guest, there is nothing to gain
    // from handing each read to a thread pool.
    b.allow_blocking_current_thread(true);
    add_preopens(&mut b, plan, dirs, true)?;
    Ok(b.build_p1())
}

fn perms(read_only: bool) -> FsPerms {
    if read_only {
        FsPerms::ReadOnly
    } else {
        FsPerms::ReadWrite
    }
}

/// Adds the guest's directories to `b`, each through the worker's detached mount of it (by its
/// `/proc/self/fd` path, so before the worker is chrooted), its `/dev`, and (`dot_cwd`) its
/// working directory as the preopen `.` that wasi-libc resolves relative paths through. The
/// working directory is created when missing, as runc creates it.
pub(crate) fn add_preopens(
    b: &mut WasiCtxBuilder,
    plan: &Plan,
    dirs: &crate::worker::Dirs,
    dot_cwd: bool,
) -> Result<(), String> {
    for (p, fd) in plan.preopens.iter().zip(&dirs.preopens) {
        b.preopened_dir(
            kiln_sandbox::mounts::fd_path(fd),
            &p.guest,
            perms(p.read_only),
        )
        .map_err(|e| format!("open {} for {}: {e:#}", p.host.display(), p.guest))?;
    }
    if let Some(dev) = &dirs.dev {
        // Read-write for WASI (a guest writes to /dev/null); the mount itself is read-only,
        // so nothing can be created there.
        b.preopened_dir(
            kiln_sandbox::mounts::fd_path(dev),
            "/dev",
            FsPerms::ReadWrite,
        )
        .map_err(|e| format!("open the guest's /dev: {e:#}"))?;
    }
    let (index, rel) = &plan.cwd_in;
    if plan.cwd != "/" {
        let holder = plan
            .preopens
            .get(*index)
            .ok_or_else(|| format!("working directory {}: no such preopen", plan.cwd))?;
        let dir = kiln_sandbox::mounts::fd_path(&dirs.preopens[*index]).join(rel);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create working directory {}: {e}", plan.cwd))?;
        if dot_cwd {
            b.preopened_dir(&dir, ".", perms(holder.read_only))
                .map_err(|e| format!("open working directory {}: {e:#}", plan.cwd))?;
        }
    }
    Ok(())
}

/// Links `module` (compiled by any of Kiln's engines: the optimizing one, or the baseline one
/// for a first start) with WASI, after checking its entrypoint.
pub(crate) fn link(module: Module, plan: &Plan, wasi: WasiP1Ctx) -> Result<Prepared, String> {
    let guest = plan.args.first().cloned().unwrap_or_default();
    match module.get_export(&plan.entry_func) {
        Some(ExternType::Func(ft)) => {
            if ft.params().len() != 0 || ft.results().len() != 0 {
                return Err(format!(
                    "entrypoint {guest}#{}: the export takes parameters or returns results; \
                     Kiln calls a function with no parameters and no results",
                    plan.entry_func
                ));
            }
        }
        Some(_) => {
            return Err(format!(
                "entrypoint {guest}#{}: the export is not a function",
                plan.entry_func
            ));
        }
        None => {
            let funcs: Vec<String> = module
                .exports()
                .filter(|e| matches!(e.ty(), ExternType::Func(_)))
                .map(|e| e.name().to_string())
                .collect();
            return Err(format!(
                "entrypoint {guest}: the module exports no function {:?} (exported functions: {})",
                plan.entry_func,
                if funcs.is_empty() {
                    "none".to_string()
                } else {
                    funcs.join(", ")
                }
            ));
        }
    }
    let mut linker: Linker<Host> = Linker::new(module.engine());
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |h: &mut Host| &mut h.wasi)
        .map_err(|e| format!("set up WASI: {e:#}"))?;
    // wasmtime-wasi takes a `proc_exit` code of 126 or more for an error (a trap, 134). A
    // process's exit code is any number, of which Linux keeps the low 8 bits, and so does Kiln.
    linker.allow_shadowing(true);
    linker
        .func_wrap(
            "wasi_snapshot_preview1",
            "proc_exit",
            |_: wasmtime::Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
                Err(wasmtime::Error::new(I32Exit(crate::status::exit_code(
                    code,
                ))))
            },
        )
        .map_err(|e| format!("set up WASI proc_exit: {e:#}"))?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| format!("{guest} cannot be linked with WASI preview 1: {e:#}"))?;
    Ok(Prepared {
        id: plan.id.clone(),
        entry: plan.entry_func.clone(),
        pre,
        wasi,
        memory_cap: memory_cap(plan.resources.memory_limit),
    })
}

/// The tokio runtime a command's WASI host calls run on (preview 1 and 2 alike). Left to
/// itself wasmtime-wasi builds one with a worker thread per CPU, in every container; one worker
/// thread serves one guest, and every thread not started is memory and a pid (against
/// pids.max) the node keeps. `None` when it cannot be built, said on the guest's stderr.
pub(crate) fn guest_runtime(id: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "kiln: container {id}: start the WASI runtime: {e}"
            );
            None
        }
    }
}

/// Runs the guest and returns the container's exit status.
pub(crate) fn run(p: Prepared) -> i32 {
    let started = Instant::now();
    let Some(rt) = guest_runtime(&p.id) else {
        return crate::status::EXIT_SETUP_FAILED;
    };
    let _entered = rt.enter();
    let mut limits = StoreLimitsBuilder::new();
    if let Some(cap) = p.memory_cap {
        limits = limits.memory_size(cap);
    }
    let mut store = Store::new(
        p.pre.module().engine(),
        Host {
            wasi: p.wasi,
            limits: limits.build(),
        },
    );
    store.limiter(|h| &mut h.limits);
    let result = p.pre.instantiate(&mut store).and_then(|instance| {
        debug!("worker {}: instantiated in {:?}", p.id, started.elapsed());
        let f = instance.get_typed_func::<(), ()>(&mut store, &p.entry)?;
        f.call(&mut store, ())
    });
    let status = match result {
        Ok(()) => 0,
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                exit.0
            } else {
                let mut stderr = std::io::stderr();
                let _ = writeln!(stderr, "kiln: container {}: wasm trap: {e:?}", p.id);
                // Also in the shim's log: the container's stderr may be gone or unread.
                log::warn!("container {}: wasm trap: {e:#}", p.id);
                EXIT_TRAP
            }
        }
    };
    debug!(
        "worker {}: guest finished with {status} after {:?}",
        p.id,
        started.elapsed()
    );
    let _ = std::io::stdout().flush();
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::Engine;

    const WAT: &str = r#"
        (module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (import "wasi_snapshot_preview1" "sock_shutdown"
            (func $sock_shutdown (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start") (call $exit (i32.const 3)))
          (func (export "exit130") (call $exit (i32.const 130)))
          ;; exit with sock_shutdown's errno for a descriptor that does not exist (99), and
          ;; for one that is not a socket (3, the rootfs preopen)
          (func (export "shutdown_bad")
            (call $exit (call $sock_shutdown (i32.const 99) (i32.const 2))))
          (func (export "shutdown_dir")
            (call $exit (call $sock_shutdown (i32.const 3) (i32.const 2))))
          (func (export "exit256") (call $exit (i32.const 259)))
          (func (export "boom") unreachable)
          (func (export "ok"))
          (func (export "withparam") (param i32))
          ;; grows by 64 pages (4 MiB) at a time up to 1024 pages; exits 12 when a grow fails
          (func (export "grow")
            (loop $l
              (if (i32.eq (memory.grow (i32.const 64)) (i32.const -1))
                (then (call $exit (i32.const 12))))
              (br_if $l (i32.lt_u (memory.size) (i32.const 1024))))))
    "#;

    fn plan(func: &str, memory: Option<i64>, root: &std::path::Path) -> Plan {
        let wasm = wat::parse_str(WAT).expect("wat");
        std::fs::write(root.join("m.wasm"), wasm).expect("write module");
        let mut spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": [format!("/m.wasm#{func}")], "cwd": "/",
                        "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {}
        });
        if let Some(m) = memory {
            spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": m}});
        }
        let spec = serde_json::from_value(spec).expect("spec");
        kiln_plan::plan("unit", &spec, root, &kiln_plan::Host::default()).expect("plan")
    }

    fn status(func: &str, memory: Option<i64>) -> Result<i32, String> {
        let engine = Engine::default();
        let root = tempfile::tempdir().expect("tempdir");
        let plan = plan(func, memory, root.path());
        let kiln_plan::ModuleSource::File(path) = &plan.module else {
            panic!("a rootfs module")
        };
        let module = Module::from_file(&engine, path).expect("module");
        let dirs = crate::worker::Dirs::open(&plan)?;
        let wasi = wasi_ctx(&plan, &dirs)?;
        let p = link(module, &plan, wasi)?;
        Ok(run(p))
    }

    #[test]
    fn exit_statuses_follow_runc() {
        assert_eq!(status("_start", None), Ok(3), "proc_exit(3)");
        assert_eq!(status("ok", None), Ok(0), "returning from the entry");
        assert_eq!(status("boom", None), Ok(EXIT_TRAP), "trap");
        assert_eq!(
            status("exit130", None),
            Ok(130),
            "proc_exit(130) is not a trap"
        );
        assert_eq!(
            status("exit256", None),
            Ok(3),
            "proc_exit(259) keeps the low 8 bits"
        );
    }

    #[test]
    fn wasi_calls_answer_the_specifications_errnos() {
        // sock_shutdown (wasi-testsuite's sock_shutdown-invalid_fd): EBADF (8) for a descriptor
        // that does not exist, ENOTSOCK (57) for one that is not a socket. The testsuite runs
        // that test with no preopen, so its fd 3 does not exist; under Kiln fd 3 is the rootfs.
        assert_eq!(status("shutdown_bad", None), Ok(8));
        assert_eq!(status("shutdown_dir", None), Ok(57));
    }

    #[test]
    fn a_wrong_entrypoint_is_refused_before_running() {
        let e = status("missing", None).expect_err("missing export");
        assert!(e.contains("missing") && e.contains("_start"), "{e}");
        let e = status("withparam", None).expect_err("wrong type");
        assert!(e.contains("parameters"), "{e}");
        let e = status("memory", None).expect_err("not a function");
        assert!(e.contains("not a function"), "{e}");
    }

    #[test]
    fn the_memory_limit_makes_memory_grow_fail_in_the_guest() {
        // 64 MiB of linear memory is reachable without a limit...
        assert_eq!(status("grow", None), Ok(0));
        // ...but not with a 32 MiB container limit (16 MiB for the guest).
        assert_eq!(status("grow", Some(32 << 20)), Ok(12));
    }

    #[test]
    fn memory_cap_keeps_a_reserve() {
        assert_eq!(memory_cap(None), None);
        assert_eq!(memory_cap(Some(-1)), None);
        assert_eq!(memory_cap(Some(0)), None);
        assert_eq!(memory_cap(Some(64 << 20)), Some(48 << 20));
        // Small limits keep half for the guest rather than nothing.
        assert_eq!(memory_cap(Some(8 << 20)), Some(4 << 20));
    }
}
