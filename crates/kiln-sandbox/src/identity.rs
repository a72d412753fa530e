//! The last step of a worker's setup: from root with every capability to the container's
//! identity, with exactly the spec's capability sets and rlimits and the seccomp filter.
//!
//! The order is runc's (libcontainer's `finalizeNamespace` and its caller), for the same
//! reasons:
//! 1. rlimits, while the worker may still raise hard limits (CAP_SYS_RESOURCE);
//! 2. chroot into the rootfs, while it holds CAP_SYS_CHROOT (Kiln's stand-in for runc's
//!    pivot_root: the worker's last view of the host's files goes);
//! 3. no_new_privs (always: nothing in a Wasm worker has to gain privileges);
//! 4. drop the bounding set, which needs CAP_SETPCAP, so before anything drops that;
//! 5. keep the permitted set across the change of uid (PR_SET_KEEPCAPS), setgroups, setgid,
//!    setuid (groups and gid first: after setuid the right to change them is gone);
//! 6. clear KEEPCAPS, then set the inheritable, effective and permitted sets (inheritable
//!    first, while the permitted set still covers it; permitted last, as it may only shrink)
//!    and the ambient set;
//!
//!    runc's process then execs the container's program, and for a user other than root the
//!    kernel's execve rules leave it only its ambient capabilities (a program without file
//!    capabilities gets permitted = effective = ambient). A Kiln worker does not exec, so for
//!    a non-root user it takes those sets directly: the spec's effective and permitted sets
//!    count only through its ambient set, as they would under runc;
//! 7. umask;
//! 8. the seccomp filter, last, so that it need not allow any of the calls above (with
//!    no_new_privs set, loading it needs no privilege), right after the guard that stands in
//!    for the pid and network namespaces Kiln does not create (`seccomp::guard`), which must
//!    come first as the allowlist does not allow seccomp(2) itself.

use std::os::fd::BorrowedFd;

use caps::CapSet;
use kiln_plan::{CapabilitySets, Rlimit, User};

use crate::seccomp::Filter;
use crate::syscall::parse_caps;
use crate::{Result, Syscall, sys};

/// What [`finish`] makes the worker.
pub struct Final<'a> {
    /// The container's user.
    pub user: &'a User,
    /// The capability sets to end with.
    pub caps: &'a CapabilitySets,
    /// The rlimits to set.
    pub rlimits: &'a [Rlimit],
    /// The rootfs to chroot into (a detached mount of it).
    pub root: BorrowedFd<'a>,
    /// The seccomp filter, if any.
    pub seccomp: Option<&'a Filter>,
    /// The namespace guard, if any.
    pub guard: Option<&'a Filter>,
}

/// Takes the worker from root to the container's identity; see the module docs for the order.
pub fn finish(sys_: &dyn Syscall, f: &Final<'_>) -> Result<()> {
    let bounding = parse_caps(&f.caps.bounding)?;
    let inheritable = parse_caps(&f.caps.inheritable)?;
    let ambient = parse_caps(&f.caps.ambient)?;
    let (effective, permitted) = if f.user.uid == 0 {
        (
            parse_caps(&f.caps.effective)?,
            parse_caps(&f.caps.permitted)?,
        )
    } else {
        (ambient.clone(), ambient.clone())
    };
    for r in f.rlimits {
        sys_.set_rlimit(r.resource, r.soft, r.hard)
            .map_err(sys(format!("set {} to {}/{}", r.name, r.soft, r.hard)))?;
    }
    sys_.chroot(f.root).map_err(sys("chroot into the rootfs"))?;
    sys_.set_no_new_privs().map_err(sys("set no_new_privs"))?;
    sys_.drop_bounding(&bounding)
        .map_err(sys("drop the bounding capability set"))?;
    sys_.set_keep_caps(true)
        .map_err(sys("set PR_SET_KEEPCAPS"))?;
    let u = f.user;
    sys_.set_groups(&u.additional_gids)
        .map_err(sys(format!("setgroups {:?}", u.additional_gids)))?;
    sys_.set_gid(u.gid)
        .map_err(sys(format!("setgid {}", u.gid)))?;
    sys_.set_uid(u.uid)
        .map_err(sys(format!("setuid {}", u.uid)))?;
    sys_.set_keep_caps(false)
        .map_err(sys("clear PR_SET_KEEPCAPS"))?;
    for (set, caps, name) in [
        (CapSet::Inheritable, &inheritable, "inheritable"),
        (CapSet::Effective, &effective, "effective"),
        (CapSet::Permitted, &permitted, "permitted"),
        (CapSet::Ambient, &ambient, "ambient"),
    ] {
        sys_.set_caps(set, caps)
            .map_err(sys(format!("set the {name} capabilities")))?;
    }
    if let Some(mask) = u.umask {
        sys_.set_umask(mask);
    }
    // The guard first: the main filter (Kiln's allowlist) does not allow seccomp(2) itself.
    if let Some(guard) = f.guard {
        sys_.load_seccomp(guard)
            .map_err(sys("load the namespace guard"))?;
    }
    if let Some(filter) = f.seccomp {
        sys_.load_seccomp(filter)
            .map_err(sys("load the seccomp filter"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::AsFd;

    use caps::CapsHashSet;

    use super::*;

    /// Records each call instead of making it.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        fail: Option<&'static str>,
    }

    impl Recorder {
        fn push(&self, call: String) -> io::Result<()> {
            let failing = self.fail.is_some_and(|f| call.starts_with(f));
            self.calls.borrow_mut().push(call);
            if failing {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            } else {
                Ok(())
            }
        }
    }

    fn sorted(caps: &CapsHashSet) -> String {
        let mut v: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
        v.sort();
        v.join(",")
    }

    impl Syscall for Recorder {
        fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
            self.push(format!("rlimit {resource} {soft} {hard}"))
        }
        fn chroot(&self, _dir: BorrowedFd<'_>) -> io::Result<()> {
            self.push("chroot".into())
        }
        fn set_no_new_privs(&self) -> io::Result<()> {
            self.push("no_new_privs".into())
        }
        fn drop_bounding(&self, keep: &CapsHashSet) -> io::Result<()> {
            self.push(format!("bounding {}", sorted(keep)))
        }
        fn set_keep_caps(&self, on: bool) -> io::Result<()> {
            self.push(format!("keepcaps {on}"))
        }
        fn set_groups(&self, groups: &[u32]) -> io::Result<()> {
            self.push(format!("setgroups {groups:?}"))
        }
        fn set_gid(&self, gid: u32) -> io::Result<()> {
            self.push(format!("setgid {gid}"))
        }
        fn set_uid(&self, uid: u32) -> io::Result<()> {
            self.push(format!("setuid {uid}"))
        }
        fn set_caps(&self, set: CapSet, caps: &CapsHashSet) -> io::Result<()> {
            self.push(format!("{set:?} {}", sorted(caps)))
        }
        fn set_umask(&self, mask: u32) {
            let _ = self.push(format!("umask {mask:o}"));
        }
        fn load_seccomp(&self, _filter: &Filter) -> io::Result<()> {
            self.push("seccomp".into())
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn privileges_change_in_runcs_order() {
        let user = User {
            uid: 1000,
            gid: 100,
            additional_gids: vec![5, 6],
            umask: Some(0o022),
        };
        let caps = CapabilitySets {
            bounding: names(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]),
            effective: names(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]),
            permitted: names(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]),
            inheritable: names(&["CAP_NET_BIND_SERVICE"]),
            ambient: names(&["CAP_NET_BIND_SERVICE"]),
        };
        let rlimits = [Rlimit {
            name: "RLIMIT_NOFILE".into(),
            resource: libc::RLIMIT_NOFILE,
            soft: 512,
            hard: 1024,
        }];
        let filter = Filter::default();
        let root = std::fs::File::open("/").expect("open /");
        let rec = Recorder::default();
        finish(
            &rec,
            &Final {
                user: &user,
                caps: &caps,
                rlimits: &rlimits,
                root: root.as_fd(),
                seccomp: Some(&filter),
                guard: Some(&filter),
            },
        )
        .expect("finish");
        assert_eq!(
            rec.calls.into_inner(),
            [
                format!("rlimit {} 512 1024", libc::RLIMIT_NOFILE),
                "chroot".to_string(),
                "no_new_privs".to_string(),
                "bounding CAP_CHOWN,CAP_NET_BIND_SERVICE".to_string(),
                "keepcaps true".to_string(),
                "setgroups [5, 6]".to_string(),
                "setgid 100".to_string(),
                "setuid 1000".to_string(),
                "keepcaps false".to_string(),
                // uid 1000: effective and permitted are the ambient set, as after runc's exec.
                "Inheritable CAP_NET_BIND_SERVICE".to_string(),
                "Effective CAP_NET_BIND_SERVICE".to_string(),
                "Permitted CAP_NET_BIND_SERVICE".to_string(),
                "Ambient CAP_NET_BIND_SERVICE".to_string(),
                "umask 22".to_string(),
                "seccomp".to_string(),
                "seccomp".to_string(),
            ]
        );
    }

    #[test]
    fn root_keeps_exactly_the_specs_sets() {
        let user = User::default();
        let caps = CapabilitySets {
            bounding: names(&["CAP_CHOWN", "CAP_KILL"]),
            effective: names(&["CAP_CHOWN"]),
            permitted: names(&["CAP_CHOWN", "CAP_KILL"]),
            inheritable: vec![],
            ambient: vec![],
        };
        let root = std::fs::File::open("/").expect("open /");
        let rec = Recorder::default();
        let f = Final {
            user: &user,
            caps: &caps,
            rlimits: &[],
            root: root.as_fd(),
            seccomp: None,
            guard: None,
        };
        finish(&rec, &f).expect("finish");
        let calls = rec.calls.into_inner();
        let sets: Vec<&str> = calls
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with("Effective") || c.starts_with("Permitted"))
            .collect();
        assert_eq!(
            sets,
            ["Effective CAP_CHOWN", "Permitted CAP_CHOWN,CAP_KILL"]
        );
    }

    #[test]
    fn a_failing_step_stops_the_setup_and_names_itself() {
        let user = User::default();
        let caps = CapabilitySets::default();
        let root = std::fs::File::open("/").expect("open /");
        let rec = Recorder {
            fail: Some("setgid"),
            ..Recorder::default()
        };
        let err = finish(
            &rec,
            &Final {
                user: &user,
                caps: &caps,
                rlimits: &[],
                root: root.as_fd(),
                seccomp: None,
                guard: None,
            },
        )
        .expect_err("setgid fails");
        assert!(err.to_string().contains("setgid 0"), "{err}");
        let calls = rec.calls.into_inner();
        assert_eq!(calls.last().map(String::as_str), Some("setgid 0"));
        assert!(!calls.iter().any(|c| c.starts_with("setuid")));
    }

    #[test]
    fn unknown_capability_names_are_refused() {
        let user = User::default();
        let caps = CapabilitySets {
            bounding: names(&["CAP_FLY"]),
            ..CapabilitySets::default()
        };
        let root = std::fs::File::open("/").expect("open /");
        let rec = Recorder::default();
        let err = finish(
            &rec,
            &Final {
                user: &user,
                caps: &caps,
                rlimits: &[],
                root: root.as_fd(),
                seccomp: None,
                guard: None,
            },
        )
        .expect_err("unknown capability");
        assert!(err.to_string().contains("CAP_FLY"), "{err}");
        assert!(
            rec.calls.into_inner().is_empty(),
            "nothing changed before the check"
        );
    }
}
