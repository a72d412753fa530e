//! Serving a `wasi:http/incoming-handler` component over HTTP/1.1, as `wasmtime serve` does,
//! from the worker: in the container's network namespace and cgroup, on `0.0.0.0:8080` unless
//! the container's environment sets `KILN_HTTP_ADDR` (`host:port`, or a port).
//!
//! Every request gets a fresh instance, made from an `InstancePre` on an engine with the
//! pooling allocator and copy-on-write memory images (microseconds per instance), so requests
//! share nothing and a request whose handler traps gets a 500 while the server goes on.
//! SIGTERM stops accepting, lets the requests in flight finish (containerd's SIGKILL ends the
//! grace period), and exits 0; SIGKILL ends it at once (137).
//!
//! Each request's WASI context is made anew: args, env, stdio (so a handler's output goes to
//! the container's log). What is not guest state is made once and shared: the guest's
//! directories are opened when the server is set up, before the worker is chrooted, as a
//! command's are, and every request's context gets copies of those descriptors (a lookup is
//! relative to them and changes nothing in them). Opening them per request, after the chroot,
//! cost six system calls under a process-wide lock on every request.
//!
//! Where a request's time goes, and what the pooling allocator is tuned for, is measured by
//! `scripts/bench-http.sh`; the server logs its per-request phase times when it stops (at
//! debug level: `http phases: requests=N context_us=...`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::server::conn::http1;
use kiln_plan::Plan;
use log::{debug, info, warn};
use tokio::sync::{Semaphore, watch};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::filesystem::WasiFilesystemCtx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::status::EXIT_SETUP_FAILED;

/// The environment variable of the container that sets the listening address.
pub const ADDR_ENV: &str = "KILN_HTTP_ADDR";
/// Where a server listens by default.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8080";
/// Requests handled at once (and instances the pooling allocator holds slots for); more wait.
pub const MAX_CONCURRENT: usize = 128;
/// Bytes of each linear memory slot that stay resident between requests, when the kernel has
/// `PAGEMAP_SCAN` (Linux 6.7): the pool then resets a slot by copying back only the pages the
/// last request wrote, instead of `madvise` and a page fault per page on the next request; a
/// request that writes more has the rest decommitted as before. At most this much per warm
/// slot stays charged to the container's memory while it is idle.
///
/// Measured with `scripts/bench-http.sh` (the http-p2 echo, 2 cores shared with builds): with
/// the scan and these sizes, Kiln's CPU time per request was 31-39 us against 58-60 us with
/// the pool's default reset, its teardown (the store dropped) 6-8 us against 16-20 us, and its
/// requests/s 1.6-1.8x, in alternating runs. 64 KiB, 256 KiB and 1 MiB measured the same
/// (33-38 us per request): 256 KiB leaves room for handlers that write more than the echo, for
/// at most 25 MiB resident over the pool's 100 warm slots.
pub const MEMORY_KEEP_RESIDENT: usize = 256 << 10;
/// The same for tables (a handler's lazily filled function tables).
pub const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// The address to listen on, from the container's environment.
pub(crate) fn listen_addr(plan: &Plan) -> Result<SocketAddr, String> {
    let value = plan
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == ADDR_ENV)
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_ADDR);
    let full = if value.chars().all(|c| c.is_ascii_digit()) {
        format!("0.0.0.0:{value}")
    } else {
        value.to_string()
    };
    full.parse()
        .map_err(|_| format!("{ADDR_ENV}={value:?} is not host:port or a port"))
}

/// The engine HTTP servers run on: Kiln's configuration with the pooling allocator, sized for
/// [`MAX_CONCURRENT`] instances. Its artifacts are the zygote engine's, if the two are
/// compatible (checked by the caller against the compile cache's directory name).
///
/// Called before the worker is chrooted: `PAGEMAP_SCAN` works on `/proc/self/pagemap`, which
/// wasmtime opens here, once.
pub(crate) fn pooling_engine(memory_cap: Option<usize>) -> wasmtime::Result<Engine> {
    let mut pool = wasmtime::PoolingAllocationConfig::default();
    let n = MAX_CONCURRENT as u32;
    pool.total_component_instances(n)
        .total_core_instances(n * 2)
        .total_memories(n * 2)
        .total_tables(n * 2)
        .total_stacks(n);
    if let Some(cap) = memory_cap {
        pool.max_memory_size(cap);
    }
    // Without the scan, keeping memory resident means copying all of it back on every
    // request, whatever the request wrote: worse than decommitting.
    if wasmtime::PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT);
    }
    let mut config = crate::engine::config();
    config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Per-request state.
struct Host {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

/// A server ready to serve.
pub(crate) struct Prepared {
    id: String,
    plan: Plan,
    pre: ProxyPre<Host>,
    listener: std::net::TcpListener,
    fs: WasiFilesystemCtx,
    memory_cap: Option<usize>,
}

/// The guest's directories, opened once for every request's context to share: the same
/// preopens as a command gets (its mounts, `/dev`, its working directory as `.`), opened
/// through the worker's detached mounts before the worker is chrooted.
pub(crate) fn filesystem(
    plan: &Plan,
    dirs: &crate::worker::Dirs,
) -> Result<WasiFilesystemCtx, String> {
    let mut b = crate::p2::builder(plan);
    crate::run::add_preopens(&mut b, plan, dirs, true)?;
    Ok(b.build().filesystem().clone())
}

/// Links the component with WASI preview 2 (the whole command world: handlers built with a
/// standard library import `wasi:cli` as well) and `wasi:http`.
pub(crate) fn link(
    component: &Component,
    plan: &Plan,
    fs: WasiFilesystemCtx,
    listener: std::net::TcpListener,
) -> Result<Prepared, String> {
    let guest = plan.args.first().cloned().unwrap_or_default();
    let mut linker: Linker<Host> = Linker::new(component.engine());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
        .map_err(|e| format!("set up WASI HTTP: {e:#}"))?;
    let pre = linker
        .instantiate_pre(component)
        .and_then(ProxyPre::new)
        .map_err(|e| format!("{guest} cannot be linked with wasi:http: {e:#}"))?;
    Ok(Prepared {
        id: plan.id.clone(),
        plan: plan.clone(),
        pre,
        listener,
        fs,
        memory_cap: crate::run::memory_cap(plan.resources.memory_limit),
    })
}

/// Binds the listening socket (in the worker's network namespace, with its identity).
pub(crate) fn bind(plan: &Plan) -> Result<std::net::TcpListener, String> {
    let addr = listen_addr(plan)?;
    std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("cannot listen on {addr}: the port is already in use (set {ADDR_ENV})")
        } else {
            format!("cannot listen on {addr}: {e}")
        }
    })
}

/// Per-request phase times, summed over the server's life and logged (at debug level) when it
/// stops, as `scripts/bench-http.sh` reads them: where a request's time goes inside the
/// server. A few clock reads per request, tens of nanoseconds against tens of microseconds.
#[derive(Default)]
struct Phases {
    requests: AtomicU64,
    /// The WASI and HTTP contexts and the store.
    context_ns: AtomicU64,
    /// `instantiate_async` from the pooling allocator.
    instantiate_ns: AtomicU64,
    instantiate_max_ns: AtomicU64,
    /// The guest's `handle`, from the call to its return (its body written).
    handler_ns: AtomicU64,
    /// Dropping the store: the instance's memories and tables go back to the pool (reset).
    teardown_ns: AtomicU64,
    /// From taking a slot to the response head handed to hyper.
    to_response_ns: AtomicU64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Phases {
    /// `requests=N context_us=.. instantiate_us=.. instantiate_max_us=.. handler_us=..
    /// teardown_us=.. to_response_us=..`: means per request (max for instantiate_max_us), in
    /// microseconds; wall times, so they include waiting when a phase yields.
    fn summary(&self) -> String {
        let n = self.requests.load(Ordering::Relaxed);
        let us = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
        let mean = |a: &AtomicU64| if n == 0 { 0.0 } else { us(a) / n as f64 };
        format!(
            "requests={n} context_us={:.2} instantiate_us={:.2} instantiate_max_us={:.1} \
             handler_us={:.2} teardown_us={:.2} to_response_us={:.2}",
            mean(&self.context_ns),
            mean(&self.instantiate_ns),
            us(&self.instantiate_max_ns),
            mean(&self.handler_ns),
            mean(&self.teardown_ns),
            mean(&self.to_response_ns),
        )
    }
}

struct Server {
    id: String,
    plan: Plan,
    pre: ProxyPre<Host>,
    fs: WasiFilesystemCtx,
    memory_cap: Option<usize>,
    /// One per live instance, held until its store is dropped (not only until its response
    /// head is sent: the pool has [`MAX_CONCURRENT`] slots, and an instance still writing its
    /// body holds one).
    slots: Arc<Semaphore>,
    phases: Phases,
}

impl Server {
    /// A fresh WASI context for one request, sharing the server's opened directories.
    fn context(&self) -> WasiCtx {
        let mut b = crate::p2::builder(&self.plan);
        b.initial_cwd(&self.plan.cwd);
        let mut ctx = b.build();
        *ctx.filesystem() = self.fs.clone();
        ctx
    }

    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| wasmtime::Error::msg("the server is shutting down"))?;
        let started = Instant::now();
        let mut limits = StoreLimitsBuilder::new();
        if let Some(cap) = self.memory_cap {
            limits = limits.memory_size(cap);
        }
        let mut store = Store::new(
            self.pre.engine(),
            Host {
                ctx: self.context(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limits: limits.build(),
            },
        );
        store.limiter(|h| &mut h.limits);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(tx)?;
        let p = &self.phases;
        p.requests.fetch_add(1, Ordering::Relaxed);
        p.context_ns
            .fetch_add(ns(started.elapsed()), Ordering::Relaxed);
        let server = self.clone();
        let task = tokio::task::spawn(async move {
            let p = &server.phases;
            let t0 = Instant::now();
            let r = match server.pre.instantiate_async(&mut store).await {
                Ok(proxy) => {
                    let t1 = Instant::now();
                    let inst = ns(t1 - t0);
                    p.instantiate_ns.fetch_add(inst, Ordering::Relaxed);
                    p.instantiate_max_ns.fetch_max(inst, Ordering::Relaxed);
                    let r = proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, req, out)
                        .await;
                    p.handler_ns.fetch_add(ns(t1.elapsed()), Ordering::Relaxed);
                    r
                }
                Err(e) => Err(e),
            };
            let t2 = Instant::now();
            drop(store);
            p.teardown_ns.fetch_add(ns(t2.elapsed()), Ordering::Relaxed);
            drop(slot);
            r
        });
        let r = match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(code.into()),
            Err(_) => match task.await {
                Ok(Ok(())) => Err(wasmtime::Error::msg(
                    "the handler returned without a response",
                )),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(wasmtime::Error::msg(e.to_string())),
            },
        };
        p.to_response_ns
            .fetch_add(ns(started.elapsed()), Ordering::Relaxed);
        r
    }
}

fn error_response(status: u16, message: String) -> hyper::Response<HyperOutgoingBody> {
    let body = http_body_util::Full::new(bytes::Bytes::from(message))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    resp
}

/// Serves until SIGTERM (then drains) and returns the container's exit status.
pub(crate) fn run(p: Prepared) -> i32 {
    let threads = worker_threads(&p.plan);
    // The shim limits its process tree to one malloc arena (what a command needs); requests
    // allocate on every runtime thread at once, so a server gets an arena per thread back.
    // SAFETY: mallopt has no preconditions; arenas are created on demand afterwards.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, (threads as i32).saturating_mul(2).max(2));
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads).enable_all();
    debug!(
        "worker {}: HTTP runtime with {threads} worker threads",
        p.id
    );
    let rt = match b.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: container {}: start the HTTP runtime: {e}", p.id);
            return EXIT_SETUP_FAILED;
        }
    };
    rt.block_on(serve(p))
}

async fn serve(p: Prepared) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let Prepared {
        id,
        plan,
        pre,
        listener,
        fs,
        memory_cap,
    } = p;
    let addr = listener.local_addr().ok();
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln: container {id}: listen: {e}");
            return EXIT_SETUP_FAILED;
        }
    };
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: container {id}: watch SIGTERM: {e}");
            return EXIT_SETUP_FAILED;
        }
    };
    let server = Arc::new(Server {
        id: id.clone(),
        plan,
        pre,
        fs,
        memory_cap,
        slots: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        phases: Phases::default(),
    });
    info!("worker {id}: serving HTTP on {addr:?}");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("worker {id}: accept: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let server = server.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(match server.clone().handle(req).await {
                                Ok(resp) => resp,
                                Err(e) => {
                                    let _ = writeln_stderr(&format!(
                                        "kiln: container {}: request failed: {e:?}",
                                        server.id
                                    ));
                                    error_response(500, "internal error in the handler\n".into())
                                }
                            })
                        }
                    });
                    let conn = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // SIGTERM: no new connections; the requests in flight finish, idle keep-alive connections
    // close, and then the server exits.
    drop(listener);
    info!(
        "worker {id}: SIGTERM: draining {} connections",
        connections.len()
    );
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    // And the instances whose responses are sent but whose stores are still being dropped.
    let _ = server.slots.acquire_many(MAX_CONCURRENT as u32).await;
    debug!("worker {id}: http phases: {}", server.phases.summary());
    0
}

/// Worker threads for a server: one per CPU the worker may run on (its affinity), and no more
/// than its CPU quota allows: a thread beyond those only adds switches.
fn worker_threads(plan: &Plan) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let r = &plan.resources;
    let quota = match (r.cpu_quota, r.cpu_period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            usize::try_from((q as u64).div_ceil(p)).unwrap_or(usize::MAX)
        }
        _ => usize::MAX,
    };
    cpus.min(quota).max(1)
}

fn writeln_stderr(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut e = std::io::stderr();
    writeln!(e, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with_env(env: &[(&str, &str)]) -> Plan {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("m.wasm"), b"\0asm\x0d\0\x01\0").expect("write");
        let spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/m.wasm"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
            "root": {"path": "rootfs"}, "linux": {}
        }))
        .expect("spec");
        kiln_plan::plan("h", &spec, root.path(), &kiln_plan::Host::default()).expect("plan")
    }

    #[test]
    fn the_listen_address_defaults_and_comes_from_the_environment() {
        assert_eq!(
            listen_addr(&plan_with_env(&[])),
            Ok("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            listen_addr(&plan_with_env(&[(ADDR_ENV, "9090")])),
            Ok("0.0.0.0:9090".parse().unwrap())
        );
        assert_eq!(
            listen_addr(&plan_with_env(&[(ADDR_ENV, "127.0.0.1:7000")])),
            Ok("127.0.0.1:7000".parse().unwrap())
        );
        assert!(listen_addr(&plan_with_env(&[(ADDR_ENV, "nowhere")])).is_err());
    }

    #[test]
    fn the_pooling_engine_loads_the_zygote_engines_artifacts() {
        let pooled = pooling_engine(Some(64 << 20)).expect("pooling engine");
        let plain = crate::engine::new_engine().expect("engine");
        assert_eq!(
            kiln_cache::engine_dir_name(&pooled),
            kiln_cache::engine_dir_name(&plain),
            "a cache entry compiled by the zygote's engine must be loadable by the server's"
        );
    }
}
