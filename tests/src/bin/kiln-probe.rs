//! `kiln-probe`: a cold-start probe that times one task's phases (snapshot, container, task,
//! start, exit event, removal) through containerd's gRPC API, without `ctr`'s own overhead.
//! `kiln-probe --help` for the options; `scripts/bench-probe.sh` runs it for Kiln and runc.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result};
use kiln_e2e::probe::args::{self, Command, Options, USAGE, check_identifier, id_safe};
use kiln_e2e::probe::client::Ctx;
use kiln_e2e::probe::events::ExitWatcher;
use kiln_e2e::probe::report::{Report, write_json};
use kiln_e2e::probe::round::{self, Plan};
use kiln_e2e::probe::{image, spec};
use serde_json::Value;

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln-probe: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let opts = match args::parse(std::env::args().skip(1))? {
        Command::Help => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        Command::Run(o) => *o,
    };
    // One thread: the probe's own work then never competes with the runtimes it measures for
    // more than one core, and the event reader runs whenever a call is in flight.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(probe(&opts))
}

async fn probe(opts: &Options) -> Result<ExitCode> {
    let started = SystemTime::now();
    let template = spec::template(opts.spec.as_deref())?;
    let ctx = Ctx::connect(&opts.address, &opts.namespace).await?;
    let resolved = image::resolve(&ctx, &opts.image, opts.platform.as_ref())
        .await
        .with_context(|| format!("resolve image {}", opts.image))?;
    let base = spec::base(&template, &resolved.config, opts.args.as_deref())
        .with_context(|| format!("the spec for image {}", opts.image))?;
    let plan = Plan {
        runtime: opts.runtime.clone(),
        image: opts.image.clone(),
        snapshotter: opts.snapshotter.clone(),
        chain_id: resolved.chain_id.clone(),
        spec: base,
        timeout: opts.exit_timeout,
    };
    let mut watcher = ExitWatcher::start(&ctx)
        .await
        .context("subscribe to containerd's events")?;

    let prefix = format!("probe-{}-{}", id_safe(&opts.label), std::process::id());
    check_identifier("container id", &format!("{prefix}-w1"))?;
    let mut rounds = Vec::with_capacity(opts.warmup + opts.rounds);
    let schedule = (1..=opts.warmup)
        .map(|n| (n, true))
        .chain((1..=opts.rounds).map(|n| (n, false)));
    for (n, warmup) in schedule {
        let id = if warmup {
            format!("{prefix}-w{n}")
        } else {
            format!("{prefix}-{n}")
        };
        let r = round::run(&ctx, &plan, &mut watcher, n, warmup, id).await;
        if let Some(e) = &r.error {
            eprintln!("kiln-probe: {} failed: {e}", r.id);
        }
        if let Some(e) = &r.cleanup_error {
            eprintln!("kiln-probe: {}: {e}", r.id);
        }
        rounds.push(r);
    }

    let args = plan.spec["process"]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let report = Report {
        opts,
        image: &resolved,
        args,
        rounds,
        started,
    };
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        write_json(path, &report.to_json())?;
    }
    Ok(if report.failures() > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
