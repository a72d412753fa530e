//! A container's cgroup: the directories it owns and what can be done with
//! them.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::devices::{self, DeviceRule};
use crate::fsutil::{self, parse_pids, read_optional, write_file};
use crate::layout::{Hierarchy, Layout, V1_CONTROLLERS};
use crate::path::{self, Target};
use crate::stats::{self, Stats, V1Dirs};
use crate::{Error, Result};

/// The controllers enabled in v2 ancestors' `cgroup.subtree_control`.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// How many times [`Cgroup::kill_all`] re-reads the pid list to catch
/// processes forked while it was signalling.
const KILL_ROUNDS: usize = 5;

/// The limits to apply, as in the OCI spec's `linux.resources`. `None` (and
/// 0 for memory and CPU values, which the spec leaves meaningless) leaves
/// the kernel default in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes; negative means unlimited.
    pub memory_limit: Option<i64>,
    /// Memory soft limit in bytes (v1 `memory.soft_limit_in_bytes`, v2
    /// `memory.low`); negative means none.
    #[serde(default)]
    pub memory_reservation: Option<i64>,
    /// Memory plus swap limit in bytes (the OCI/v1 meaning); -1 means
    /// unlimited. On v2 it becomes `memory.swap.max = swap - memory`.
    pub memory_swap: Option<i64>,
    /// Relative CPU weight in v1 shares (2..=262144); converted to
    /// `cpu.weight` on v2 with [`shares_to_weight`].
    pub cpu_shares: Option<u64>,
    /// CFS quota in µs per period; negative means unlimited.
    pub cpu_quota: Option<i64>,
    /// CFS period in µs.
    pub cpu_period: Option<u64>,
    /// Maximum number of processes/threads; zero or negative means
    /// unlimited (`max`).
    pub pids_limit: Option<i64>,
    /// Device access rules over a default of "deny everything"; `None`
    /// leaves device access as the parent cgroup has it.
    #[serde(default)]
    pub devices: Option<Vec<DeviceRule>>,
    /// v2 only: control files of the cgroup and the values to write to
    /// them (the spec's `linux.resources.unified`), after the other limits.
    #[serde(default)]
    pub unified: Vec<(String, String)>,
}

/// Converts v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000)
/// with runc's formula, `1 + ((shares - 2) * 9999) / 262142`. Out-of-range
/// shares are clamped first, as the v1 kernel does.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// One v1 directory and the controllers of its hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct V1Dir {
    controllers: Vec<String>,
    path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Dirs {
    /// One directory per managed hierarchy (co-mounted controllers share
    /// one).
    V1(Vec<V1Dir>),
    /// The unified hierarchy's mount point and the path below it.
    V2 { mount_point: PathBuf, rel: PathBuf },
}

/// A container's cgroup. It knows its directories; creating the value with
/// [`Cgroup::open`] touches nothing, so it is cheap to rebuild after a shim
/// restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    dirs: Dirs,
}

impl Cgroup {
    /// Creates the container's cgroup and applies `resources`.
    ///
    /// `cgroups_path` is `linux.cgroupsPath` from the OCI spec;
    /// `default_path` is used in its place when it is empty (e.g.
    /// `/kiln/<container id>`). Accepted forms:
    ///
    /// * absolute, `/default/abc`: below each hierarchy's mount point;
    /// * relative, `foo/bar`: below the caller's own cgroup in each
    ///   hierarchy (from the layout, see [`Layout::with_own_cgroups`]);
    /// * systemd, `slice:prefix:name`, e.g.
    ///   `kubepods-besteffort-pod12.slice:cri-containerd:abc` →
    ///   `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope`.
    ///   An empty slice means `system.slice`; an empty prefix gives
    ///   `name.scope`. The directories are written directly, without
    ///   asking systemd over D-Bus.
    ///
    /// Paths with `..` components, and paths naming the root or the
    /// caller's own cgroup, are rejected.
    ///
    /// v1: the directory is made in the hierarchies carrying `memory`,
    /// `cpu`, `cpuacct` and `pids` (once per co-mounted set); a controller
    /// that is not mounted is skipped. v2: `+cpu +memory +pids` are enabled
    /// in every ancestor's `cgroup.subtree_control` where missing and
    /// available. A directory that already exists is reused.
    pub fn create(
        layout: &Layout,
        cgroups_path: &str,
        default_path: &str,
        resources: &Resources,
    ) -> Result<Cgroup> {
        let cgroup = Cgroup::resolve(layout, cgroups_path, default_path)?;
        if let Some(rules) = &resources.devices {
            devices::validate(rules)?;
        }
        match &cgroup.dirs {
            Dirs::V1(dirs) => {
                for dir in dirs {
                    fsutil::create_dir(&dir.path)?;
                }
                cgroup.apply_v1(resources)?;
            }
            Dirs::V2 { mount_point, rel } => {
                // Check the resources before touching the file system.
                let swap = v2_swap(resources)?;
                let mut parent = mount_point.clone();
                for component in rel.components() {
                    enable_v2_controllers(&parent)?;
                    parent.push(component);
                    fsutil::create_dir(&parent)?;
                }
                apply_v2(&parent, resources, swap)?;
                if let Some(rules) = &resources.devices {
                    devices::attach_v2(&parent, rules)?;
                }
            }
        }
        Ok(cgroup)
    }

    /// The cgroup that [`Cgroup::create`] would have created for these
    /// paths, e.g. to clean up after a shim crash. Nothing is created or
    /// changed. Fails with [`Error::NotFound`] when none of its directories
    /// exist.
    pub fn open(layout: &Layout, cgroups_path: &str, default_path: &str) -> Result<Cgroup> {
        let cgroup = Cgroup::resolve(layout, cgroups_path, default_path)?;
        cgroup.ensure_exists()?;
        Ok(cgroup)
    }

    fn resolve(layout: &Layout, cgroups_path: &str, default_path: &str) -> Result<Cgroup> {
        let target = path::parse(cgroups_path, default_path)?;
        let below = |h: &Hierarchy| -> Result<PathBuf> {
            Ok(match &target {
                Target::FromRoot(p) => p.clone(),
                Target::FromOwn(p) => {
                    if h.own.components().any(|c| c == Component::ParentDir) {
                        return Err(Error::InvalidPath {
                            path: p.display().to_string(),
                            reason: format!(
                                "relative to the caller's cgroup {}, which is outside the \
                                 cgroup namespace",
                                h.own.display()
                            ),
                        });
                    }
                    h.own.join(p)
                }
            })
        };
        let dirs = match layout {
            Layout::V1 { hierarchies } => {
                let mut dirs: Vec<V1Dir> = Vec::new();
                for controller in V1_CONTROLLERS {
                    let Some(h) = hierarchies
                        .iter()
                        .find(|h| h.controllers.iter().any(|c| c == controller))
                    else {
                        debug!("cgroup v1 controller {controller} is not mounted; skipping it");
                        continue;
                    };
                    let path = h.mount_point.join(below(h)?);
                    if !dirs.iter().any(|d| d.path == path) {
                        dirs.push(V1Dir {
                            controllers: h.controllers.clone(),
                            path,
                        });
                    }
                }
                if dirs.is_empty() {
                    return Err(Error::NoCgroupFs);
                }
                Dirs::V1(dirs)
            }
            Layout::V2 { unified } => Dirs::V2 {
                mount_point: unified.mount_point.clone(),
                rel: below(unified)?,
            },
        };
        Ok(Cgroup { dirs })
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self.dirs {
            Dirs::V1(_) => 1,
            Dirs::V2 { .. } => 2,
        }
    }

    /// The cgroup's directories: one per managed v1 hierarchy, or the one
    /// v2 directory.
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.dirs {
            Dirs::V1(dirs) => dirs.iter().map(|d| d.path.clone()).collect(),
            Dirs::V2 { mount_point, rel } => vec![mount_point.join(rel)],
        }
    }

    fn v1_dir(&self, controller: &str) -> Option<&Path> {
        match &self.dirs {
            Dirs::V1(dirs) => dirs
                .iter()
                .find(|d| d.controllers.iter().any(|c| c == controller))
                .map(|d| d.path.as_path()),
            Dirs::V2 { .. } => None,
        }
    }

    fn ensure_exists(&self) -> Result<()> {
        let dirs = self.dirs();
        if dirs.iter().any(|d| d.is_dir()) {
            Ok(())
        } else {
            Err(Error::NotFound {
                path: dirs.into_iter().next().unwrap_or_default(),
            })
        }
    }

    fn apply_v1(&self, r: &Resources) -> Result<()> {
        let memory = r.memory_limit.filter(|&m| m != 0);
        let swap = r.memory_swap.filter(|&s| s != 0);
        if let Some(dir) = self.v1_dir("memory") {
            let limit = dir.join("memory.limit_in_bytes");
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            let swap = swap.filter(|_| {
                let present = memsw.exists();
                if !present {
                    debug!(
                        "{} is missing (no swap accounting); swap limit ignored",
                        memsw.display()
                    );
                }
                present
            });
            // The kernel takes -1 for "unlimited", not any negative number.
            let memory = memory.map(|m| m.max(-1));
            let swap = swap.map(|s| s.max(-1));
            match (memory, swap) {
                (Some(m), Some(s)) => {
                    // memsw must stay >= memory at every step: raise memsw
                    // first when growing, lower memory first when shrinking
                    // (runc's rule).
                    let current = read_optional(&limit)?
                        .and_then(|t| t.trim().parse::<i64>().ok())
                        .unwrap_or(i64::MAX);
                    if s == -1 || current < s {
                        write_file(&memsw, &s.to_string())?;
                        write_file(&limit, &m.to_string())?;
                    } else {
                        write_file(&limit, &m.to_string())?;
                        write_file(&memsw, &s.to_string())?;
                    }
                }
                (Some(m), None) => write_file(&limit, &m.to_string())?,
                (None, Some(s)) => write_file(&memsw, &s.to_string())?,
                (None, None) => {}
            }
            if let Some(r) = r.memory_reservation.filter(|&r| r != 0) {
                write_file(
                    &dir.join("memory.soft_limit_in_bytes"),
                    &r.max(-1).to_string(),
                )?;
            }
        } else if memory.is_some() || swap.is_some() || r.memory_reservation.is_some() {
            warn!("memory controller not mounted; memory limits not applied");
        }

        let shares = r.cpu_shares.filter(|&s| s != 0);
        let period = r.cpu_period.filter(|&p| p != 0);
        let quota = r.cpu_quota.filter(|&q| q != 0);
        if let Some(dir) = self.v1_dir("cpu") {
            if let Some(s) = shares {
                write_file(&dir.join("cpu.shares"), &s.to_string())?;
            }
            if let Some(p) = period {
                write_file(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
            if let Some(q) = quota {
                let q = if q < 0 { -1 } else { q };
                write_file(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
            }
        } else if shares.is_some() || period.is_some() || quota.is_some() {
            warn!("cpu controller not mounted; cpu limits not applied");
        }

        if let Some(p) = r.pids_limit {
            match self.v1_dir("pids") {
                Some(dir) => write_file(&dir.join("pids.max"), &pids_value(p))?,
                None => warn!("pids controller not mounted; pids limit not applied"),
            }
        }
        if let Some(rules) = &r.devices {
            self.apply_v1_devices(rules)?;
        }
        if let Some((key, _)) = r.unified.first() {
            return Err(Error::InvalidResources(format!(
                "unified setting {key:?} needs cgroup v2"
            )));
        }
        Ok(())
    }

    fn apply_v1_devices(&self, rules: &[DeviceRule]) -> Result<()> {
        match self.v1_dir("devices") {
            Some(dir) => devices::apply_v1(dir, rules),
            // Device nodes in the image would be reachable with whatever the parent allows:
            // refused rather than run unconfined.
            None => Err(Error::InvalidResources(
                "the cgroup v1 devices controller is not mounted, so device rules cannot be \
                 enforced"
                    .to_string(),
            )),
        }
    }

    /// Moves process `pid` into the cgroup (writes `cgroup.procs` in every
    /// directory it owns).
    pub fn add_pid(&self, pid: i32) -> Result<()> {
        if pid <= 0 {
            return Err(Error::InvalidPid(pid));
        }
        let pid = pid.to_string();
        for dir in self.dirs() {
            write_file(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// The processes in the cgroup, sorted (v1: the union over its
    /// directories). Fails with [`Error::NotFound`] when the cgroup does
    /// not exist.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let dirs = self.dirs();
        let mut found = false;
        let mut pids = Vec::new();
        for dir in &dirs {
            let procs = dir.join("cgroup.procs");
            if let Some(text) = read_optional(&procs)? {
                found = true;
                pids.extend(parse_pids(&procs, &text)?);
            }
        }
        if !found {
            return Err(Error::NotFound {
                path: dirs.into_iter().next().unwrap_or_default(),
            });
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Reads usage and limits; see [`Stats`] for the sources. Missing
    /// control files read as 0; a missing cgroup is [`Error::NotFound`].
    pub fn stats(&self) -> Result<Stats> {
        self.ensure_exists()?;
        match &self.dirs {
            Dirs::V1(_) => stats::read_v1(&V1Dirs {
                memory: self.v1_dir("memory"),
                cpu: self.v1_dir("cpu"),
                cpuacct: self.v1_dir("cpuacct"),
                pids: self.v1_dir("pids"),
            }),
            Dirs::V2 { mount_point, rel } => stats::read_v2(&mount_point.join(rel)),
        }
    }

    /// A notification of the kernel's OOM kills in this cgroup (v1: `memory.oom_control`
    /// through `cgroup.event_control`; v2: `memory.events`).
    pub fn oom_events(&self) -> Result<crate::OomEvents> {
        match &self.dirs {
            Dirs::V1(_) => match self.v1_dir("memory") {
                Some(dir) => crate::OomEvents::v1(dir),
                None => Err(Error::NoCgroupFs),
            },
            Dirs::V2 { mount_point, rel } => crate::OomEvents::v2(&mount_point.join(rel)),
        }
    }

    /// Sends SIGKILL to every process in the cgroup. On v2 with
    /// `cgroup.kill` (Linux 5.14+) the kernel does it, race-free. Otherwise
    /// the pid list is read and signalled repeatedly (up to a few rounds)
    /// until no new pid shows up, which catches processes forked meanwhile
    /// but, without freezing the cgroup, is not airtight against a fork
    /// bomb. Does not wait for the processes to exit. A cgroup that does
    /// not exist has nothing to kill.
    pub fn kill_all(&self) -> Result<()> {
        if let Dirs::V2 { mount_point, rel } = &self.dirs {
            let kill = mount_point.join(rel).join("cgroup.kill");
            if kill.exists() {
                return write_file(&kill, "1");
            }
        }
        let mut signalled = HashSet::new();
        for _ in 0..KILL_ROUNDS {
            let pids = match self.pids() {
                Ok(pids) => pids,
                Err(Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut new = false;
            for pid in pids {
                if pid <= 0 || !signalled.insert(pid) {
                    continue;
                }
                new = true;
                // SAFETY: kill(2) has no memory-safety preconditions; pid is
                // a positive process id, never 0 or -1.
                if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        return Err(Error::Kill { pid, source: e });
                    }
                }
                debug!("sent SIGKILL to {pid}");
            }
            if !new {
                break;
            }
        }
        Ok(())
    }

    /// Kills every process in the cgroup, waits (up to `within`) until none is left, and
    /// removes it, retrying until `within` has passed. What a cleanup after a lost or deleted
    /// container wants: a process SIGKILLed on a loaded node may take longer to exit than
    /// [`Cgroup::remove`]'s own EBUSY retries last, and a cgroup left behind holds its limits.
    pub fn kill_and_remove(&self, within: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        loop {
            self.kill_all()?;
            match self.pids() {
                Ok(pids) if pids.is_empty() => break,
                Err(Error::NotFound { .. }) => break,
                Ok(_) | Err(_) if std::time::Instant::now() >= deadline => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        loop {
            match self.remove() {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    /// Removes the cgroup's directories (the leaf only: shared parents such
    /// as `/default` or a pod slice are left for their owners, and removing
    /// them would race with siblings being created). EBUSY is retried 10
    /// times at 5 ms intervals; a directory that is already gone is fine.
    /// Every directory is attempted; the first error is returned.
    pub fn remove(&self) -> Result<()> {
        let mut first_error = None;
        for dir in self.dirs() {
            if let Err(e) = fsutil::remove_dir(&dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn pids_value(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_owned()
    }
}

/// Enables the controllers children need in `parent`'s
/// `cgroup.subtree_control`, where missing and available.
fn enable_v2_controllers(parent: &Path) -> Result<()> {
    let control = parent.join("cgroup.subtree_control");
    let enabled = |text: &Option<String>, c: &str| {
        text.as_deref()
            .is_some_and(|t| t.split_whitespace().any(|e| e == c))
    };
    let current = read_optional(&control)?;
    let missing: Vec<&str> = V2_CONTROLLERS
        .into_iter()
        .filter(|c| !enabled(&current, c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let available = read_optional(&parent.join("cgroup.controllers"))?;
    let wanted: Vec<&str> = missing
        .into_iter()
        .filter(|c| enabled(&available, c))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let value = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if let Err(e) = write_file(&control, &value) {
        // Someone else (a sibling container starting) may have enabled them
        // meanwhile; only fail if they are still missing.
        let now = read_optional(&control)?;
        if wanted.iter().any(|c| !enabled(&now, c)) {
            return Err(e);
        }
    }
    Ok(())
}

/// `memory.swap.max` for `r`, runc's conversion from the OCI
/// memory-plus-swap value: `None` to leave it alone.
fn v2_swap(r: &Resources) -> Result<Option<String>> {
    let Some(swap) = r.memory_swap.filter(|&s| s != 0) else {
        return Ok(None);
    };
    if swap < 0 {
        return Ok(Some("max".to_owned()));
    }
    match r.memory_limit.filter(|&m| m != 0) {
        Some(m) if m < 0 => Err(Error::InvalidResources(format!(
            "memory swap {swap} is set but memory is unlimited"
        ))),
        Some(m) if m > swap => Err(Error::InvalidResources(format!(
            "memory+swap limit {swap} is below the memory limit {m}"
        ))),
        Some(m) => Ok(Some((swap - m).to_string())),
        None => Err(Error::InvalidResources(format!(
            "memory swap {swap} is set without a memory limit"
        ))),
    }
}

fn apply_v2(dir: &Path, r: &Resources, swap: Option<String>) -> Result<()> {
    if let Some(m) = r.memory_limit.filter(|&m| m != 0) {
        let value = if m < 0 {
            "max".to_owned()
        } else {
            m.to_string()
        };
        write_file(&dir.join("memory.max"), &value)?;
    }
    if let Some(low) = r.memory_reservation.filter(|&m| m != 0) {
        let value = if low < 0 {
            "0".to_owned()
        } else {
            low.to_string()
        };
        write_file(&dir.join("memory.low"), &value)?;
    }
    if let Some(swap) = swap {
        let file = dir.join("memory.swap.max");
        if file.exists() {
            write_file(&file, &swap)?;
        } else {
            debug!(
                "{} is missing (no swap accounting); swap limit ignored",
                file.display()
            );
        }
    }
    if let Some(s) = r.cpu_shares.filter(|&s| s != 0) {
        write_file(&dir.join("cpu.weight"), &shares_to_weight(s).to_string())?;
    }
    let quota = r.cpu_quota.filter(|&q| q != 0);
    let period = r.cpu_period.filter(|&p| p != 0);
    if quota.is_some() || period.is_some() {
        let mut value = match quota {
            Some(q) if q > 0 => q.to_string(),
            _ => "max".to_owned(),
        };
        if let Some(p) = period {
            value = format!("{value} {p}");
        }
        write_file(&dir.join("cpu.max"), &value)?;
    }
    if let Some(p) = r.pids_limit {
        write_file(&dir.join("pids.max"), &pids_value(p))?;
    }
    for (key, value) in &r.unified {
        if key.contains('/') || key.starts_with('.') {
            return Err(Error::InvalidResources(format!(
                "unified key {key:?} is not a file of the cgroup"
            )));
        }
        write_file(&dir.join(key), value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
