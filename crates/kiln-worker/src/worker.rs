//! The worker: one process per container, forked by the zygote.
//!
//! Setup happens at Create, in the order the kernel needs:
//! 1. join the cgroup (so that everything after, compile included, is accounted to the
//!    container; on cgroup v2 the zygote has already cloned the worker into it);
//! 2. what needs root and the host's view: oom_score_adj and io priority, stdio (containerd's
//!    FIFOs), the module and the compile cache, and the guest's directories as detached mounts
//!    (`nodev`, read-only where asked; its `/dev`);
//! 3. on a cache miss, the keeper that will store the compiled module (see `compile`);
//! 4. the namespaces, hostname and sysctls; the AppArmor profile;
//! 5. the WASI context (preopens opened through the detached mounts);
//! 6. on a miss, the compile child, which confines itself further;
//! 7. the privilege drop, in runc's order, ending with the seccomp filter
//!    (`kiln_sandbox::identity`);
//! 8. the compiled module, linked and checked.
//!
//! The worker then tells the shim it is ready and waits: guest code runs only after
//! containerd's Start, as with runc's create/start split, so that tools may set the container
//! up between the two using its real pid.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use kiln_cache::{Cache, CacheError, Kind, Outcome};
use kiln_plan::{ModuleKind, Plan};
use kiln_sandbox::mounts::{Attrs, clone_tree, device_dir};
use log::debug;
use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};

use crate::binary::{Binary, describe};
use crate::compile::{Compile, Compiler, Confinement, Keeper, KeeperArgs};
use crate::p2::World;
use crate::protocol::{START_BYTE, SpawnRequest, WorkerReport};
use crate::run;
use crate::status::EXIT_SETUP_FAILED;

/// Runs the worker to completion and returns its exit status.
pub(crate) fn main(engine: &wasmtime::Engine, req: SpawnRequest, chan: OwnedFd) -> i32 {
    // The zygote blocks SIGCHLD for its signalfd; a worker starts with a clean mask.
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let (Some(path), Some(redirect)) = (&req.log_path, crate::LOG_REDIRECT.get()) {
        redirect(&req.plan.id, path);
    }
    if req.plan.role == kiln_plan::Role::PodSandbox {
        return crate::pod::main(req, chan);
    }
    let mut chan = UnixStream::from(chan);
    let id = req.plan.id.clone();
    let prepared = match setup(engine, &req, &mut chan) {
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
    prepared.guest.run()
}

fn report(chan: &mut UnixStream, r: &WorkerReport) {
    if let Ok(mut line) = serde_json::to_vec(r) {
        line.push(b'\n');
        let _ = chan.write_all(&line);
    }
}

/// The guest's directories, as detached mounts held by descriptor.
pub(crate) struct Dirs {
    /// One per `plan.preopens`, the rootfs first.
    pub preopens: Vec<OwnedFd>,
    /// The guest's `/dev`, unless the spec binds its own.
    pub dev: Option<OwnedFd>,
}

impl Dirs {
    /// Opens them; needs root (CAP_SYS_ADMIN) and the host's mount namespace.
    pub(crate) fn open(plan: &Plan) -> Result<Dirs, String> {
        let nodev = plan.sandbox.nodev;
        let preopens = plan
            .preopens
            .iter()
            .map(|p| {
                clone_tree(
                    &p.host,
                    Attrs {
                        read_only: p.read_only,
                        no_exec: p.no_exec,
                        no_dev: nodev,
                    },
                )
                .map_err(|e| format!("{} for {}: {e}", p.host.display(), p.guest))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let dev = match &plan.sandbox.dev_nodes {
            Some(nodes) => Some(device_dir(nodes).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Dirs { preopens, dev })
    }
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

/// The container's user as the host sees it: mapped through the spec's id maps when the
/// worker creates a user namespace. The keeper's compile child stays in the host's namespaces.
fn host_user(plan: &Plan) -> kiln_plan::User {
    let map = |id: u32, maps: &[kiln_plan::IdMap]| {
        if maps.is_empty() {
            return id;
        }
        maps.iter()
            .find(|m| id >= m.container_id && id - m.container_id < m.size)
            .map(|m| m.host_id + (id - m.container_id))
            .unwrap_or(65534)
    };
    let u = &plan.user;
    let s = &plan.sandbox;
    kiln_plan::User {
        uid: map(u.uid, &s.uid_mappings),
        gid: map(u.gid, &s.gid_mappings),
        additional_gids: u
            .additional_gids
            .iter()
            .map(|g| map(*g, &s.gid_mappings))
            .collect(),
        umask: u.umask,
    }
}

fn write_proc_self(file: &str, value: &str) -> Result<(), String> {
    std::fs::write(format!("/proc/self/{file}"), value)
        .map_err(|e| format!("set {file} to {value}: {e}"))
}

/// A compiled binary.
enum Loaded {
    Module(wasmtime::Module),
    Component(wasmtime::component::Component),
}

/// What the worker runs, checked and linked.
pub(crate) enum Guest {
    /// A core module, with WASI preview 1.
    Core(run::Prepared),
    /// A `wasi:cli/run` component.
    Command(crate::p2::Prepared),
    /// A `wasi:http/incoming-handler` component, with its listening socket.
    Http(Box<crate::http::Prepared>),
}

impl Guest {
    fn run(self) -> i32 {
        match self {
            Guest::Core(p) => run::run(p),
            Guest::Command(p) => crate::p2::run(p),
            Guest::Http(p) => crate::http::run(*p),
        }
    }
}

/// A worker ready for Start.
pub(crate) struct Ready {
    guest: Guest,
    cache: String,
    load_us: u64,
}

/// The WASI context made before the worker is chrooted.
enum Context {
    Core(wasmtime_wasi::p1::WasiP1Ctx),
    Command(wasmtime_wasi::WasiCtx),
    /// A server makes one per request; they share these opened directories.
    Http(wasmtime_wasi::filesystem::WasiFilesystemCtx),
}

fn setup(
    engine: &wasmtime::Engine,
    req: &SpawnRequest,
    chan: &mut UnixStream,
) -> Result<Ready, String> {
    let plan = &req.plan;
    let t0 = Instant::now();
    // Every fork below (keeper, compile children, id-map helper) is only sound in a
    // single-threaded process; the zygote guarantees it, and it is checked once here.
    let threads = crate::process::thread_count();
    if threads != 1 {
        return Err(format!("the worker has {threads} threads during setup"));
    }
    let pid = std::process::id().to_string();
    for procs in &req.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    let t_cgroup = t0.elapsed();
    if let Some(adj) = plan.sandbox.oom_score_adj {
        write_proc_self("oom_score_adj", &adj.to_string())?;
    }
    if let Some((class, level)) = plan.sandbox.io_priority {
        // SAFETY: ioprio_set(IOPRIO_WHO_PROCESS, self, class << 13 | level).
        let ret = unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, (class << 13) | level) };
        if ret < 0 {
            return Err(format!(
                "set the I/O priority: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    crate::stdio::install(&req.stdio)?;
    debug!(
        "worker {}: joined cgroup in {t_cgroup:?}, stdio bound at {:?}",
        plan.id,
        t0.elapsed()
    );

    let started = Instant::now();
    let kind = match plan.module_kind {
        ModuleKind::Core => Kind::Module,
        ModuleKind::Component => Kind::Component,
    };
    let index = kiln_cache::Index::open(&req.cache_root);
    let mut binary = Binary::of(plan, &index, req.fs_dev)?;
    let cache = Cache::open(&req.cache_root, engine);
    let mut hit = match kind {
        Kind::Module => cache.load_module(engine, &binary.key).map(Loaded::Module),
        Kind::Component => cache
            .load_component(engine, &binary.key)
            .map(Loaded::Component),
    };
    // A component's world decides how it is set up: from its type when cached, else from its
    // exports as written.
    let world = match (&hit, kind) {
        (_, Kind::Module) => None,
        (Some(Loaded::Component(c)), _) => Some(crate::p2::world(engine, c)),
        _ => Some(crate::p2::world_of_bytes(binary.bytes(plan, chan)?)),
    }
    .transpose()
    .map_err(|e| format!("{}: {e}", guest_name(plan)))?;
    let http = world == Some(World::Http);
    // A server runs on an engine with the pooling allocator, whose artifacts are the zygote
    // engine's (the same cache directory): a hit is mapped again for it.
    let server_engine = match http {
        true => Some(
            crate::http::pooling_engine(run::memory_cap(plan.resources.memory_limit))
                .map_err(|e| format!("the HTTP server's engine: {e:#}"))?,
        ),
        false => None,
    };
    let compile_engine = server_engine.as_ref().unwrap_or(engine);
    let cache = match &server_engine {
        Some(e) => Cache::open(&req.cache_root, e),
        None => cache,
    };
    if let (Some(e), Some(_)) = (&server_engine, &hit) {
        hit = cache.load_component(e, &binary.key).map(Loaded::Component);
    }
    if hit.is_none() {
        binary.fetch(plan, chan)?;
    }
    let wasm = binary.fetched();
    let dirs = Dirs::open(plan)?;
    let t_dirs = t0.elapsed();

    // A server's first start waits for the optimizing compile: it is long-lived, and its
    // pooling engine maps Cranelift's artifacts.
    let baseline = cache.dir().is_some() && baseline_first_start() && !http;
    let empty = match hit {
        Some(_) => None,
        None => Some(crate::compile::empty_root()?),
    };
    let keeper = match (&empty, cache.dir()) {
        (Some(root), Some(_)) => Some(Keeper::spawn(&KeeperArgs {
            engine: compile_engine,
            cache: &cache,
            wasm,
            key: &binary.key,
            kind,
            baseline,
            confinement: Confinement {
                user: host_user(plan),
                rlimits: &plan.sandbox.rlimits,
                seccomp: req.seccomp.as_ref(),
                root: std::os::fd::AsRawFd::as_raw_fd(root),
                skipped: &plan.sandbox.skipped,
            },
        })?),
        _ => None,
    };

    kiln_sandbox::namespaces::enter(&plan.namespaces, &plan.sandbox).map_err(|e| e.to_string())?;
    if let Some(profile) = &plan.sandbox.apparmor_profile {
        write_proc_self("attr/current", &format!("changeprofile {profile}"))?;
    }
    let context = match world {
        None => Context::Core(run::wasi_ctx(plan, &dirs)?),
        Some(World::Command) => Context::Command(crate::p2::wasi_ctx(plan, &dirs)?),
        Some(World::Http) => Context::Http(crate::http::filesystem(plan, &dirs)?),
    };
    let t_ns = t0.elapsed();

    // The compile child confines itself while this process drops its own privileges.
    let compile = match &empty {
        Some(root) => Some(
            Compile::start(
                compile_engine,
                wasm,
                kind,
                baseline,
                &Confinement {
                    user: plan.user.clone(),
                    rlimits: &plan.sandbox.rlimits,
                    seccomp: req.seccomp.as_ref(),
                    root: std::os::fd::AsRawFd::as_raw_fd(root),
                    skipped: &plan.sandbox.skipped,
                },
            )
            .map_err(|e| describe(plan, e))?,
        ),
        None => None,
    };
    drop(empty);
    let guard = crate::compile::guard_for(&plan.sandbox.skipped);
    kiln_sandbox::identity::finish(
        &kiln_sandbox::Linux,
        &kiln_sandbox::identity::Final {
            user: &plan.user,
            caps: &plan.sandbox.capabilities,
            rlimits: &plan.sandbox.rlimits,
            root: dirs.preopens[0].as_fd(),
            seccomp: req.seccomp.as_ref(),
            guard: guard.as_ref(),
        },
    )
    .map_err(|e| e.to_string())?;
    drop(dirs);
    let t_drop = t0.elapsed();
    // A server binds as its guest would: with the container's identity, capabilities and
    // seccomp filter, in its network namespace (a port below 1024 needs
    // CAP_NET_BIND_SERVICE there, as under runc).
    let listener = match http {
        true => Some(crate::http::bind(plan)?),
        false => None,
    };

    let (loaded, outcome) = match (hit, compile) {
        (Some(m), _) => (m, Outcome::Hit),
        (None, Some(c)) => {
            let (artifact, compiler) = c.wait().map_err(|e| describe(plan, e))?;
            let baseline_engine;
            let load_engine = match compiler {
                Compiler::Optimizing => compile_engine,
                Compiler::Baseline => {
                    baseline_engine = crate::engine::new_baseline_engine()
                        .map_err(|e| format!("the baseline compiler: {e:#}"))?;
                    &baseline_engine
                }
            };
            // SAFETY: produced by `precompile_module` (or `_component`) of this engine
            // configuration in our compile child and received whole (length and exit status
            // checked). The child ran with the container's confinement; a subverted compiler
            // can only hand this container code that runs with the same confinement.
            let loaded = match kind {
                Kind::Module => unsafe { wasmtime::Module::deserialize(load_engine, &artifact) }
                    .map(Loaded::Module),
                Kind::Component => {
                    unsafe { wasmtime::component::Component::deserialize(load_engine, &artifact) }
                        .map(Loaded::Component)
                }
            }
            .map_err(|e| describe(plan, CacheError::Load(e)))?;
            let outcome = match (keeper, compiler) {
                (Some(k), Compiler::Baseline) => {
                    k.go();
                    Outcome::Baseline
                }
                (Some(k), Compiler::Optimizing) => {
                    if !k.store(&artifact) {
                        log::warn!("worker {}: the compiled module was not cached", plan.id);
                    }
                    Outcome::Miss
                }
                (None, _) => Outcome::Uncached,
            };
            (loaded, outcome)
        }
        (None, None) => return Err("no module and no compile".to_string()),
    };
    binary.release();
    let load_us = started.elapsed().as_micros() as u64;
    debug!(
        "worker {}: {} {} loaded ({outcome:?}) in {load_us} us; dirs at {t_dirs:?}, \
         namespaces at {t_ns:?}, privileges dropped at {t_drop:?}",
        plan.id,
        if kind == Kind::Module {
            "module"
        } else {
            "component"
        },
        binary.key,
    );
    let guest = match (loaded, context, listener) {
        (Loaded::Module(m), Context::Core(wasi), _) => Guest::Core(run::link(m, plan, wasi)?),
        (Loaded::Component(c), Context::Command(ctx), _) => {
            Guest::Command(crate::p2::link(&c, plan, ctx)?)
        }
        (Loaded::Component(c), Context::Http(fs), Some(l)) => {
            Guest::Http(Box::new(crate::http::link(&c, plan, fs, l)?))
        }
        _ => return Err("the binary is not what its first bytes said".to_string()),
    };
    Ok(Ready {
        guest,
        cache: format!("{outcome:?}").to_lowercase(),
        load_us,
    })
}

fn guest_name(plan: &Plan) -> String {
    plan.args.first().cloned().unwrap_or_default()
}
