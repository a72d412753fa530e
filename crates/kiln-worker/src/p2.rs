//! WASI preview 2 components run as commands (they export `wasi:cli/run`): the same args, env,
//! preopens (read-only honoured), stdio, limits and exit codes as a core module, and sockets
//! (`wasi:sockets`, name lookup) in the container's network namespace.
//!
//! Exit codes: `run` returning `ok` is 0 and `err` is 1 (as `wasmtime run` reports them);
//! `wasi:cli/exit.exit-with-code(n)` is n; a trap is 134.

use std::io::Write;
use std::time::Instant;

use kiln_plan::Plan;
use log::debug;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::status::{EXIT_SETUP_FAILED, EXIT_TRAP};

/// What a component exports that Kiln knows how to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum World {
    /// `wasi:cli/run`: a command.
    Command,
    /// `wasi:http/incoming-handler`: an HTTP server.
    Http,
}

/// Which of Kiln's worlds `component` is, or a message saying what it exports instead.
pub(crate) fn world(engine: &wasmtime::Engine, component: &Component) -> Result<World, String> {
    let ty = component.component_type();
    classify(ty.exports(engine).map(|(n, _)| n.to_string()).collect())
}

/// [`world`] from the binary, before it is compiled (the worker decides how to set a server
/// up while it still has the privileges to, and a cache miss is compiled only after that).
pub(crate) fn world_of_bytes(wasm: &[u8]) -> Result<World, String> {
    use wasmparser::{Parser, Payload};
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| format!("the component does not parse: {e}"))? {
            // Nested modules and components are parsed too; only the outer exports count.
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for e in exports {
                    let e = e.map_err(|e| format!("the component does not parse: {e}"))?;
                    names.push(e.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    classify(names)
}

fn classify(names: Vec<String>) -> Result<World, String> {
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has("wasi:http/incoming-handler@") {
        Ok(World::Http)
    } else if has("wasi:cli/run@") {
        Ok(World::Command)
    } else {
        Err(format!(
            "the component exports neither wasi:cli/run nor wasi:http/incoming-handler \
             (it exports: {})",
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        ))
    }
}

/// Per-store state of a command.
pub(crate) struct Host {
    ctx: WasiCtx,
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

/// The WASI context shared by commands and HTTP handlers: args, env, stdio, and sockets in the
/// container's network namespace.
pub(crate) fn builder(plan: &Plan) -> WasiCtxBuilder {
    let mut b = WasiCtxBuilder::new();
    b.args(&plan.args);
    b.envs(&plan.env);
    b.inherit_stdio();
    b.allow_blocking_current_thread(true);
    // The worker is in the container's network namespace: what the guest reaches is what the
    // container's network is (its own, its pod's, or the node's with host networking).
    b.inherit_network();
    b.allow_tcp(true);
    b.allow_udp(true);
    b.allow_ip_name_lookup(true);
    b
}

/// A command ready to run.
pub(crate) struct Prepared {
    id: String,
    pre: CommandPre<Host>,
    ctx: WasiCtx,
    memory_cap: Option<usize>,
}

/// The command's context, its directories opened through the worker's detached mounts (before
/// the worker is chrooted).
pub(crate) fn wasi_ctx(plan: &Plan, dirs: &crate::worker::Dirs) -> Result<WasiCtx, String> {
    let mut b = builder(plan);
    // wasi-libc (what std on wasm32-wasip2 is built on) starts every program at "/" and does
    // not ask for `initial-cwd`; it resolves relative paths through a preopen named ".", as
    // for preview 1. The context sets both.
    crate::run::add_preopens(&mut b, plan, dirs, true)?;
    b.initial_cwd(&plan.cwd);
    Ok(b.build())
}

/// Links the command with WASI preview 2.
pub(crate) fn link(component: &Component, plan: &Plan, ctx: WasiCtx) -> Result<Prepared, String> {
    let guest = plan.args.first().cloned().unwrap_or_default();
    let mut linker: Linker<Host> = Linker::new(component.engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| format!("set up WASI preview 2: {e:#}"))?;
    let pre = linker
        .instantiate_pre(component)
        .and_then(CommandPre::new)
        .map_err(|e| format!("{guest} cannot be linked with WASI preview 2: {e:#}"))?;
    Ok(Prepared {
        id: plan.id.clone(),
        pre,
        ctx,
        memory_cap: crate::run::memory_cap(plan.resources.memory_limit),
    })
}

/// Runs the command and returns the container's exit status.
pub(crate) fn run(p: Prepared) -> i32 {
    let started = Instant::now();
    let Some(rt) = crate::run::guest_runtime(&p.id) else {
        return EXIT_SETUP_FAILED;
    };
    let _entered = rt.enter();
    let mut limits = StoreLimitsBuilder::new();
    if let Some(cap) = p.memory_cap {
        limits = limits.memory_size(cap);
    }
    let mut store = Store::new(
        p.pre.engine(),
        Host {
            ctx: p.ctx,
            table: ResourceTable::new(),
            limits: limits.build(),
        },
    );
    store.limiter(|h| &mut h.limits);
    let result = p.pre.instantiate(&mut store).and_then(|cmd| {
        debug!("worker {}: instantiated in {:?}", p.id, started.elapsed());
        cmd.wasi_cli_run().call_run(&mut store)
    });
    let status = match result {
        Ok(Ok(())) => 0,
        Ok(Err(())) => 1,
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => crate::status::exit_code(exit.0),
            None => {
                let _ = writeln!(
                    std::io::stderr(),
                    "kiln: container {}: wasm trap: {e:?}",
                    p.id
                );
                log::warn!("container {}: wasm trap: {e:#}", p.id);
                EXIT_TRAP
            }
        },
    };
    debug!(
        "worker {}: component finished with {status} after {:?}",
        p.id,
        started.elapsed()
    );
    let _ = std::io::stdout().flush();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component exporting `name` as an instance with a `run` function, and a nested
    /// component that exports `nested` (which must not count).
    fn component(name: &str, nested: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(component
                 (component $inner
                   (core module $m (func (export "f")))
                   (core instance $i (instantiate $m))
                   (func $f (canon lift (core func $i "f")))
                   (instance $x (export "handle" (func $f)))
                   (export "{nested}" (instance $x)))
                 (core module $m (func (export "run") (result i32) i32.const 0))
                 (core instance $i (instantiate $m))
                 (func $run (result (result)) (canon lift (core func $i "run")))
                 (instance $inst (export "run" (func $run)))
                 (export "{name}" (instance $inst)))"#
        ))
        .expect("wat")
    }

    #[test]
    fn the_world_is_read_from_the_exports_alike_before_and_after_compiling() {
        let engine = wasmtime::Engine::default();
        let cases = [
            ("wasi:cli/run@0.2.0", Ok(World::Command)),
            ("wasi:http/incoming-handler@0.2.3", Ok(World::Http)),
            ("example:thing/api@1.0.0", Err(())),
        ];
        for (name, want) in cases {
            let wasm = component(name, "wasi:http/incoming-handler@0.2.0");
            let compiled = Component::new(&engine, &wasm).expect("compile");
            for got in [world_of_bytes(&wasm), world(&engine, &compiled)] {
                match (&got, &want) {
                    (Ok(w), Ok(v)) => assert_eq!(w, v, "{name}"),
                    (Err(e), Err(())) => {
                        assert!(e.contains("neither") && e.contains(name), "{e}")
                    }
                    _ => panic!("{name}: {got:?}"),
                }
            }
        }
    }

    #[test]
    fn bytes_that_are_not_a_component_are_an_error() {
        let e = world_of_bytes(b"\0asm\x0d\0\x01\0\xff\xff").expect_err("garbage");
        assert!(e.contains("does not parse"), "{e}");
    }
}
