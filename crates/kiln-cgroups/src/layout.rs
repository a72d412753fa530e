//! Which cgroup hierarchies are mounted where, and where the calling
//! process sits in them.
//!
//! This is the seam between the machine and the rest of the crate: it is
//! built from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`, so
//! tests can point every hierarchy at a temporary directory.

use std::fs;
use std::path::{Component, Path, PathBuf};

use log::debug;

use crate::fsutil::io_err;
use crate::{Error, Result};

const MOUNTINFO: &str = "/proc/self/mountinfo";
const PROC_CGROUP: &str = "/proc/self/cgroup";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers whose presence makes the layout v1.
const V1_DETECT: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// The v1 controllers a container's cgroup is created in: the limits', the statistics' and
/// `devices`, which confines the device nodes a guest may open.
pub(crate) const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "devices"];

/// Mount options of a v1 cgroup mount that are not controller names.
const NOT_CONTROLLERS: [&str; 8] = [
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
    "none",
];

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// The controllers attached to it (v1: e.g. `["cpu", "cpuacct"]`, or
    /// `["name=systemd"]`; empty for the v2 unified hierarchy).
    pub controllers: Vec<String>,
    /// Where it is mounted, e.g. `/sys/fs/cgroup/memory`.
    pub mount_point: PathBuf,
    /// The cgroup shown at the mount point (mountinfo's "root" field; `/`
    /// unless only a sub-tree is bind-mounted, as in some containers).
    pub mount_root: PathBuf,
    /// The caller's own cgroup in this hierarchy, relative to
    /// `mount_point` (empty: the mount point itself). Relative
    /// `linux.cgroupsPath`s are resolved against it.
    pub own: PathBuf,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The cgroup layout of the machine, as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1: one hierarchy per mount, each carrying one or more
    /// controllers. Chosen when any v1 hierarchy carries `memory`, `cpu`,
    /// `cpuacct` or `pids`, even if a cgroup2 mount also exists (systemd's
    /// "hybrid" mode mounts one without controllers at
    /// `/sys/fs/cgroup/unified`).
    V1 {
        /// Every mounted v1 hierarchy, one entry per distinct controller
        /// set (a hierarchy mounted twice is listed once, preferring the
        /// mount below `/sys/fs/cgroup`).
        hierarchies: Vec<Hierarchy>,
    },
    /// cgroup v2: the unified hierarchy.
    V2 {
        /// The cgroup2 mount (preferring `/sys/fs/cgroup`).
        unified: Hierarchy,
    },
}

impl Layout {
    /// Reads `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn detect() -> Result<Layout> {
        let mountinfo =
            fs::read_to_string(MOUNTINFO).map_err(|e| io_err("read", Path::new(MOUNTINFO), e))?;
        let proc_cgroup = fs::read_to_string(PROC_CGROUP)
            .map_err(|e| io_err("read", Path::new(PROC_CGROUP), e))?;
        let layout = Layout::from_mountinfo(&mountinfo)?.with_own_cgroups(&proc_cgroup)?;
        debug!("detected cgroup layout {layout:?}");
        Ok(layout)
    }

    /// Builds the layout from the text of a `/proc/<pid>/mountinfo`. The
    /// caller's own cgroup is taken to be each mount's root; use
    /// [`Layout::with_own_cgroups`] to set it.
    pub fn from_mountinfo(text: &str) -> Result<Layout> {
        let mut v1: Vec<Hierarchy> = Vec::new();
        let mut v2: Option<Hierarchy> = None;
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some(mount) = parse_mountinfo_line(line).ok_or_else(|| Error::Parse {
                what: format!("mountinfo line {}", index + 1),
                reason: format!("malformed: {line:?}"),
            })?
            else {
                continue;
            };
            match mount {
                Mount::V1(h) => {
                    let key = sorted(&h.controllers);
                    match v1.iter_mut().find(|old| sorted(&old.controllers) == key) {
                        Some(old) if rank(&h) < rank(old) => *old = h,
                        Some(_) => {}
                        None => v1.push(h),
                    }
                }
                Mount::V2(h) => match &v2 {
                    Some(old) if rank(&h) >= rank(old) => {}
                    _ => v2 = Some(h),
                },
            }
        }
        let managed = |h: &Hierarchy| V1_DETECT.iter().any(|c| h.has(c));
        if v1.iter().any(managed) {
            Ok(Layout::V1 { hierarchies: v1 })
        } else if let Some(unified) = v2 {
            Ok(Layout::V2 { unified })
        } else {
            Err(Error::NoCgroupFs)
        }
    }

    /// Sets the caller's own cgroup in each hierarchy from the text of a
    /// `/proc/<pid>/cgroup` (lines `id:controllers:path`; `0::path` is the
    /// v2 one). Hierarchies without a line keep their mount root.
    pub fn with_own_cgroups(mut self, proc_cgroup: &str) -> Result<Layout> {
        let entries = parse_proc_cgroup(proc_cgroup)?;
        match &mut self {
            Layout::V1 { hierarchies } => {
                for h in hierarchies {
                    let entry = entries
                        .iter()
                        .find(|e| e.id != 0 && e.controllers.iter().any(|c| h.has(c)));
                    match entry {
                        Some(e) => h.own = relative_to_mount(&h.mount_root, &e.path),
                        None => debug!("no /proc/self/cgroup line for {:?}", h.controllers),
                    }
                }
            }
            Layout::V2 { unified } => {
                match entries
                    .iter()
                    .find(|e| e.id == 0 && e.controllers.is_empty())
                {
                    Some(e) => unified.own = relative_to_mount(&unified.mount_root, &e.path),
                    None => debug!("no 0:: line in /proc/self/cgroup"),
                }
            }
        }
        Ok(self)
    }

    /// The `cgroup.procs` file of the caller's own cgroup in one hierarchy that Kiln manages
    /// (v1: the first with `memory`, `cpu`, `cpuacct` or `pids`; v2: the unified one).
    ///
    /// Writing `0` there moves the writer to where it already is. The kernel still takes the
    /// global lock that every cgroup migration takes (`cgroup_threadgroup_rwsem`), and the
    /// first writer after a quiet period waits a whole RCU grace period for it (5–15 ms on our
    /// nodes); a migration that starts while that wait is in progress, or shortly after it,
    /// does not wait again. The shim uses this to start the grace period for a container's
    /// worker long before the worker exists.
    pub fn own_procs_file(&self) -> Option<PathBuf> {
        self.own_procs_files().into_iter().next()
    }

    /// The `cgroup.procs` files of the caller's own cgroups in every hierarchy Kiln manages
    /// (the ones a container's cgroup is created in): writing a pid to each of them moves that
    /// process back to where the caller is, out of any container's cgroup.
    pub fn own_procs_files(&self) -> Vec<PathBuf> {
        let procs = |h: &Hierarchy| h.mount_point.join(&h.own).join("cgroup.procs");
        match self {
            Layout::V1 { hierarchies } => hierarchies
                .iter()
                .filter(|h| V1_CONTROLLERS.iter().any(|c| h.has(c)))
                .map(procs)
                .collect(),
            Layout::V2 { unified } => vec![procs(unified)],
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self {
            Layout::V1 { .. } => 1,
            Layout::V2 { .. } => 2,
        }
    }
}

/// Lower is better: the canonical mount point, then anything below it.
fn rank(h: &Hierarchy) -> u8 {
    if h.mount_point == Path::new(CGROUP_ROOT) {
        0
    } else if h.mount_point.starts_with(CGROUP_ROOT) {
        1
    } else {
        2
    }
}

fn sorted(controllers: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = controllers.iter().map(String::as_str).collect();
    v.sort_unstable();
    v
}

enum Mount {
    V1(Hierarchy),
    V2(Hierarchy),
}

/// `None` for a malformed line, `Some(None)` for a non-cgroup mount.
fn parse_mountinfo_line(line: &str) -> Option<Option<Mount>> {
    // id parent maj:min root mount-point options [optional...] - fstype source super-options
    let (before, after) = line.split_once(" - ")?;
    let before: Vec<&str> = before.split(' ').collect();
    if before.len() < 6 {
        return None;
    }
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    let hierarchy = |controllers| Hierarchy {
        controllers,
        mount_point: PathBuf::from(unescape(before[4])),
        mount_root: PathBuf::from(unescape(before[3])),
        own: PathBuf::new(),
    };
    Some(match fstype {
        "cgroup" => {
            let controllers = super_options
                .split(',')
                .filter(|o| !o.is_empty() && !NOT_CONTROLLERS.contains(o))
                .filter(|o| !o.starts_with("release_agent="))
                .map(str::to_owned)
                .collect();
            Some(Mount::V1(hierarchy(controllers)))
        }
        "cgroup2" => Some(Mount::V2(hierarchy(Vec::new()))),
        _ => None,
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(digits, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    pub(crate) id: u32,
    pub(crate) controllers: Vec<String>,
    pub(crate) path: PathBuf,
}

/// Parses `/proc/<pid>/cgroup`.
pub(crate) fn parse_proc_cgroup(text: &str) -> Result<Vec<Membership>> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = || Error::Parse {
            what: format!("/proc/self/cgroup line {}", index + 1),
            reason: format!("malformed: {line:?}"),
        };
        // The path may itself contain ':', so split at most twice.
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed());
        };
        let id = id.parse().map_err(|_| malformed())?;
        let controllers = controllers
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        out.push(Membership {
            id,
            controllers,
            path: PathBuf::from(path),
        });
    }
    Ok(out)
}

/// The caller's cgroup path (relative to the namespace root) made relative
/// to the mount point, whose root field is also relative to that root.
fn relative_to_mount(mount_root: &Path, own: &Path) -> PathBuf {
    let rel = own.strip_prefix(mount_root).unwrap_or_else(|_| {
        debug!(
            "own cgroup {} is not below mount root {}",
            own.display(),
            mount_root.display()
        );
        own
    });
    rel.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's (hybrid) mountinfo, trimmed.
    const HYBRID: &str = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_is_v1() {
        let Layout::V1 { hierarchies } = Layout::from_mountinfo(HYBRID).unwrap() else {
            panic!("not v1");
        };
        let names: Vec<_> = hierarchies
            .iter()
            .map(|h| h.controllers.join(","))
            .collect();
        assert_eq!(
            names,
            ["cpu", "cpuacct", "cpuset", "memory", "pids", "name=systemd"]
        );
        assert_eq!(
            hierarchies[3].mount_point,
            Path::new("/sys/fs/cgroup/memory")
        );
    }

    #[test]
    fn comounted_and_duplicate_mounts() {
        let text = "\
50 1 0:40 / /mnt/other/cpu rw - cgroup cgroup rw,cpu,cpuacct
51 1 0:40 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpuacct,cpu
52 1 0:41 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        let Layout::V1 { hierarchies } = Layout::from_mountinfo(text).unwrap() else {
            panic!("not v1");
        };
        assert_eq!(hierarchies.len(), 2);
        assert_eq!(
            hierarchies[0].mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
    }

    #[test]
    fn pure_v2() {
        let text = "\
30 1 0:26 / /run/other rw - cgroup2 cgroup2 rw
31 23 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let layout = Layout::from_mountinfo(text).unwrap();
        assert_eq!(layout.version(), 2);
        let Layout::V2 { unified } = layout else {
            unreachable!()
        };
        assert_eq!(unified.mount_point, Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn nothing_mounted() {
        let text = "23 1 0:21 / /sys rw - sysfs sysfs rw\n";
        assert!(matches!(
            Layout::from_mountinfo(text),
            Err(Error::NoCgroupFs)
        ));
        // A v1 mount with only unmanaged controllers does not count.
        let text = "34 31 0:31 / /c rw - cgroup cgroup rw,cpuset\n";
        assert!(matches!(
            Layout::from_mountinfo(text),
            Err(Error::NoCgroupFs)
        ));
    }

    #[test]
    fn malformed_mountinfo() {
        let err = Layout::from_mountinfo("1 2 3\n").unwrap_err();
        assert!(err.to_string().contains("mountinfo line 1"), "{err}");
    }

    #[test]
    fn escaped_mount_point() {
        let text = r"35 31 0:32 / /tmp/a\040b/memory rw - cgroup cgroup rw,memory";
        let Layout::V1 { hierarchies } = Layout::from_mountinfo(text).unwrap() else {
            panic!()
        };
        assert_eq!(hierarchies[0].mount_point, Path::new("/tmp/a b/memory"));
    }

    #[test]
    fn proc_cgroup_parse() {
        let text = "9:name=systemd:/\n4:memory:/process_api/3cd\n2:cpu,cpuacct:/a:b\n0::/\n";
        let entries = parse_proc_cgroup(text).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].controllers, ["memory"]);
        assert_eq!(entries[1].path, Path::new("/process_api/3cd"));
        assert_eq!(entries[2].controllers, ["cpu", "cpuacct"]);
        assert_eq!(entries[2].path, Path::new("/a:b"));
        assert_eq!(entries[3].id, 0);
        assert!(entries[3].controllers.is_empty());
        assert!(parse_proc_cgroup("garbage\n").is_err());
        assert!(parse_proc_cgroup("x:memory:/\n").is_err());
    }

    #[test]
    fn own_cgroups_v1() {
        let layout = Layout::from_mountinfo(HYBRID)
            .unwrap()
            .with_own_cgroups(
                "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/3cd\n1:cpu:/\n0::/\n",
            )
            .unwrap();
        let Layout::V1 { hierarchies } = layout else {
            panic!()
        };
        let memory = hierarchies.iter().find(|h| h.has("memory")).unwrap();
        assert_eq!(memory.own, Path::new("process_api/3cd"));
        let cpu = hierarchies.iter().find(|h| h.has("cpu")).unwrap();
        assert_eq!(cpu.own, Path::new(""));
    }

    #[test]
    fn own_procs_file_is_in_a_managed_hierarchy() {
        let layout = Layout::from_mountinfo(HYBRID)
            .unwrap()
            .with_own_cgroups("9:name=systemd:/\n4:memory:/process_api/3cd\n1:cpu:/k\n0::/\n")
            .unwrap();
        // cpu comes first in mountinfo; cpuset and name=systemd are never chosen.
        assert_eq!(
            layout.own_procs_file().unwrap(),
            Path::new("/sys/fs/cgroup/cpu/k/cgroup.procs")
        );
        assert_eq!(
            layout.own_procs_files(),
            [
                "/sys/fs/cgroup/cpu/k/cgroup.procs",
                "/sys/fs/cgroup/cpuacct/cgroup.procs",
                "/sys/fs/cgroup/memory/process_api/3cd/cgroup.procs",
                "/sys/fs/cgroup/pids/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
        let text = "34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let layout = Layout::from_mountinfo(text)
            .unwrap()
            .with_own_cgroups("3:cpuset:/\n4:memory:/m\n")
            .unwrap();
        assert_eq!(
            layout.own_procs_file().unwrap(),
            Path::new("/sys/fs/cgroup/memory/m/cgroup.procs")
        );
        let text = "31 23 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::from_mountinfo(text)
            .unwrap()
            .with_own_cgroups("0::/docker/abc/init\n")
            .unwrap();
        assert_eq!(
            layout.own_procs_file().unwrap(),
            Path::new("/sys/fs/cgroup/init/cgroup.procs")
        );
    }

    #[test]
    fn own_cgroup_v2_below_bind_mounted_root() {
        let text = "31 23 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::from_mountinfo(text)
            .unwrap()
            .with_own_cgroups("0::/docker/abc/init\n")
            .unwrap();
        let Layout::V2 { unified } = layout else {
            panic!()
        };
        assert_eq!(unified.own, Path::new("init"));
    }
}
