//! The probe's table and JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::args::Options;
use super::image::Resolved;
use super::round::{PHASES, Round};
use super::stats::{Summary, round3};

pub struct Report<'a> {
    pub opts: &'a Options,
    pub image: &'a Resolved,
    /// The process's arguments as the spec has them.
    pub args: Vec<String>,
    pub rounds: Vec<Round>,
    pub started: SystemTime,
}

impl Report<'_> {
    fn timed(&self) -> impl Iterator<Item = &Round> {
        self.rounds.iter().filter(|r| !r.warmup)
    }

    pub fn failures(&self) -> usize {
        self.rounds.iter().filter(|r| !r.ok()).count()
    }

    /// Per phase, over the timed rounds that completed.
    pub fn summaries(&self) -> Vec<(&'static str, &'static str, Option<Summary>)> {
        PHASES
            .iter()
            .map(|&(key, title)| {
                let xs: Vec<f64> = self
                    .timed()
                    .filter(|r| r.ok())
                    .filter_map(|r| r.phase(key))
                    .collect();
                (key, title, Summary::of(&xs))
            })
            .collect()
    }

    fn exit_statuses(&self) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for s in self.timed().filter_map(|r| r.exit_status) {
            *m.entry(s).or_insert(0) += 1;
        }
        m
    }

    pub fn table(&self) -> String {
        let o = self.opts;
        let timed = self.timed().count();
        let failed = self.timed().filter(|r| !r.ok()).count();
        let mut s = String::new();
        let platform = self
            .image
            .platform
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "kiln-probe {}: {} {}{platform}, args {:?}",
            o.label, o.runtime, o.image, self.args
        );
        let statuses: Vec<String> = self
            .exit_statuses()
            .iter()
            .map(|(st, n)| format!("{st} x{n}"))
            .collect();
        let _ = writeln!(
            s,
            "{timed} rounds ({} warm-up before), {failed} failed; exit statuses: {}",
            self.rounds.len() - timed,
            if statuses.is_empty() {
                "none".to_string()
            } else {
                statuses.join(", ")
            }
        );
        let w = PHASES.iter().map(|(_, t)| t.len()).max().unwrap_or(5);
        let _ = writeln!(
            s,
            "{:<w$} {:>4} {:>9} {:>9} {:>9} {:>9}   ms",
            "phase", "n", "min", "median", "p90", "max"
        );
        for (_, title, summary) in self.summaries() {
            match summary {
                Some(x) => {
                    let _ = writeln!(
                        s,
                        "{title:<w$} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                        x.n, x.min, x.median, x.p90, x.max
                    );
                }
                None => {
                    let _ = writeln!(s, "{title:<w$} {:>4}", 0);
                }
            }
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let o = self.opts;
        let rounds: Vec<Value> = self
            .rounds
            .iter()
            .map(|r| {
                let phases: serde_json::Map<String, Value> = r
                    .phases
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(round3(*v))))
                    .collect();
                json!({
                    "round": r.n,
                    "warmup": r.warmup,
                    "id": r.id,
                    "ok": r.ok(),
                    "exit_status": r.exit_status,
                    "error": r.error,
                    "cleanup_error": r.cleanup_error,
                    "phases_ms": phases,
                })
            })
            .collect();
        let summary: serde_json::Map<String, Value> = self
            .summaries()
            .into_iter()
            .map(|(key, _, s)| (key.to_string(), s.map_or(json!({"n": 0}), Summary::to_json)))
            .collect();
        let statuses: serde_json::Map<String, Value> = self
            .exit_statuses()
            .into_iter()
            .map(|(st, n)| (st.to_string(), json!(n)))
            .collect();
        let started_ms = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        json!({
            "probe": "kiln-probe",
            "method": "phases timed with a monotonic clock around containerd gRPC calls: \
                       Snapshots.Prepare, Containers.Create, Snapshots.Mounts, Tasks.Create \
                       (empty stdio), Tasks.Start; exit = from sending Start to the arrival of \
                       the container's /tasks/exit event (subscribed before the rounds); \
                       total = from sending Prepare to that arrival; cleanup = Tasks.Delete + \
                       Containers.Delete + Snapshots.Remove; p90 by linear interpolation",
            "started_unix_ms": started_ms,
            "label": o.label,
            "runtime": o.runtime,
            "image": o.image,
            "manifest": self.image.manifest,
            "platform": self.image.platform,
            "chain_id": self.image.chain_id,
            "args": self.args,
            "namespace": o.namespace,
            "snapshotter": o.snapshotter,
            "address": o.address.display().to_string(),
            "phases": PHASES.iter().map(|(k, t)| json!({"key": k, "title": t})).collect::<Vec<_>>(),
            "rounds_requested": o.rounds,
            "warmup_requested": o.warmup,
            "failures": self.failures(),
            "exit_statuses": statuses,
            "rounds": rounds,
            "summary": summary,
        })
    }
}

/// Writes `v` to `path` atomically (a reader never sees half a report).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(v).context("serialize the report")?;
    text.push('\n');
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}
