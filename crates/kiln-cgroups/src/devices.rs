//! Device access rules: which device nodes the processes of a cgroup may open or create.
//!
//! A container's image and its bind mounts may carry device nodes (containerd's unpacker
//! creates them when it runs as root). Whatever nodes a guest can reach, the kernel lets it open
//! only the devices its cgroup allows, so the cgroup is where "default deny, then exactly the
//! spec's rules" is enforced, as runc does:
//!
//! * cgroup v1: the `devices` controller. A new cgroup inherits its parent's list; writing `a`
//!   to `devices.deny` empties it, and the rules are then written in order.
//! * cgroup v2: there is no devices controller; the kernel runs a `BPF_PROG_TYPE_CGROUP_DEVICE`
//!   program attached to the cgroup on every access check. The program is generated here from
//!   the rules (a few instructions per rule; see [`program`]) and loaded with `bpf(2)` directly:
//!   the maintained BPF crates (aya, libbpf-rs) are built around compiled ELF objects and a
//!   loader several thousand lines long, for what is here eleven instruction kinds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil::write_file;
use crate::{Error, Result};

/// Which kind of device a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// Every kind (`a`).
    All,
    /// Character devices (`c`).
    Char,
    /// Block devices (`b`).
    Block,
}

/// One rule, as in the OCI spec's `linux.resources.devices`: later rules override earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    /// Allow (true) or deny (false) the access.
    pub allow: bool,
    /// Which kind of device.
    pub kind: DeviceKind,
    /// Major number; `None` for any.
    pub major: Option<i64>,
    /// Minor number; `None` for any.
    pub minor: Option<i64>,
    /// Some of `r` (read), `w` (write) and `m` (mknod); empty means all three.
    pub access: String,
}

impl DeviceRule {
    /// Allows `access` to one device.
    pub fn allow(kind: DeviceKind, major: i64, minor: i64, access: &str) -> DeviceRule {
        DeviceRule {
            allow: true,
            kind,
            major: Some(major),
            minor: Some(minor),
            access: access.to_string(),
        }
    }

    /// Denies every access to every device.
    pub fn deny_all() -> DeviceRule {
        DeviceRule {
            allow: false,
            kind: DeviceKind::All,
            major: None,
            minor: None,
            access: "rwm".to_string(),
        }
    }

    /// Whether the rule is about every device and every access.
    pub fn is_everything(&self) -> bool {
        self.kind == DeviceKind::All
            && self.major.is_none()
            && self.minor.is_none()
            && access_bits(&self.access) == ACCESS_ALL
    }

    /// The v1 `devices.allow`/`devices.deny` line, e.g. `c 1:3 rwm` or `a`.
    fn v1_line(&self) -> String {
        if self.is_everything() {
            return "a".to_string();
        }
        let kind = match self.kind {
            DeviceKind::All => 'a',
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
        };
        let num = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
        let access = if self.access.is_empty() {
            "rwm"
        } else {
            &self.access
        };
        format!("{kind} {}:{} {access}", num(self.major), num(self.minor))
    }
}

/// Whether `rules` (applied in order over a default of "deny everything") end up allowing every
/// access to every device, as a privileged container's do.
pub fn allows_everything(rules: &[DeviceRule]) -> bool {
    match rules.iter().rposition(DeviceRule::is_everything) {
        Some(i) => rules[i].allow && rules[i + 1..].iter().all(|r| r.allow),
        None => false,
    }
}

/// Checks that every rule can be expressed (access letters, numbers that fit).
pub(crate) fn validate(rules: &[DeviceRule]) -> Result<()> {
    for r in rules {
        if r.access.chars().any(|c| !matches!(c, 'r' | 'w' | 'm')) {
            return Err(Error::InvalidResources(format!(
                "device rule access {:?} is not made of r, w and m",
                r.access
            )));
        }
        for n in [r.major, r.minor].into_iter().flatten() {
            if !(0..=u32::MAX as i64).contains(&n) {
                return Err(Error::InvalidResources(format!(
                    "device number {n} is out of range"
                )));
            }
        }
    }
    Ok(())
}

/// Writes the rules to a v1 `devices` cgroup directory: deny everything, then each rule in
/// order (a later rule overrides an earlier one, as in the spec).
pub(crate) fn apply_v1(dir: &Path, rules: &[DeviceRule]) -> Result<()> {
    write_file(&dir.join("devices.deny"), "a")?;
    for rule in rules {
        let file = if rule.allow {
            "devices.allow"
        } else {
            "devices.deny"
        };
        write_file(&dir.join(file), &rule.v1_line())?;
    }
    Ok(())
}

const ACCESS_MKNOD: i32 = 1;
const ACCESS_READ: i32 = 2;
const ACCESS_WRITE: i32 = 4;
const ACCESS_ALL: i32 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;

/// `BPF_DEVCG_DEV_BLOCK` and `BPF_DEVCG_DEV_CHAR` from `<linux/bpf.h>`.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

fn access_bits(access: &str) -> i32 {
    if access.is_empty() {
        return ACCESS_ALL;
    }
    access.chars().fold(0, |bits, c| {
        bits | match c {
            'm' => ACCESS_MKNOD,
            'r' => ACCESS_READ,
            'w' => ACCESS_WRITE,
            _ => 0,
        }
    })
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes used (class | op | source), from <linux/bpf_common.h> and <linux/bpf.h>.
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

/// The device program for `rules` over a default of "deny everything".
///
/// Registers: r1 holds the context (`struct bpf_cgroup_dev_ctx { u32 access_type; u32 major;
/// u32 minor; }`, where `access_type` is `access << 16 | type`). The prologue loads the type into
/// r2, the requested access into r3, major into r4 and minor into r5. Then one block per rule,
/// last rule first (the last matching rule decides, as a later rule overrides an earlier one
/// in the spec): each block jumps to the next block unless the device matches, and otherwise
/// returns the rule's verdict. The program ends with "deny". A rule that matches everything
/// ends the program there: the verifier rejects instructions that can never run.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // Each entry is an instruction and whether it is a "skip to the next block" jump.
        let mut block: Vec<(Insn, bool)> = Vec::new();
        match rule.kind {
            DeviceKind::All => {}
            DeviceKind::Char => block.push((insn(JMP_JNE_K, 2, 0, 0, DEV_CHAR), true)),
            DeviceKind::Block => block.push((insn(JMP_JNE_K, 2, 0, 0, DEV_BLOCK), true)),
        }
        let allowed = access_bits(&rule.access);
        if allowed != ACCESS_ALL {
            // Matches only if the request asks for nothing outside the rule's access.
            block.push((insn(ALU32_MOV_X, 1, 3, 0, 0), false));
            block.push((insn(ALU32_AND_K, 1, 0, 0, !allowed), false));
            block.push((insn(JMP_JNE_K, 1, 0, 0, 0), true));
        }
        if let Some(major) = rule.major {
            block.push((insn(JMP_JNE_K, 4, 0, 0, major as u32 as i32), true));
        }
        if let Some(minor) = rule.minor {
            block.push((insn(JMP_JNE_K, 5, 0, 0, minor as u32 as i32), true));
        }
        let unconditional = block.is_empty();
        block.push((insn(ALU64_MOV_K, 0, 0, 0, i32::from(rule.allow)), false));
        block.push((insn(JMP_EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        for (i, (mut ins, skip)) in block.into_iter().enumerate() {
            if skip {
                ins.off = (len - i - 1) as i16;
            }
            prog.push(ins);
        }
        if unconditional {
            return prog;
        }
    }
    prog.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

// bpf(2) commands, program and attach types, flags, from <linux/bpf.h>.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel takes a shorter
/// attribute than its own as long as the rest would be zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The fields of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` for `cmd`, valid for the
    // size passed; the kernel only reads it (and the buffers it points to) during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads the device program for `rules` and attaches it to the cgroup v2 directory `dir`
/// (alongside any programs of its ancestors: every one of them must allow an access). The
/// program lives as long as the cgroup.
pub(crate) fn attach_v2(dir: &Path, rules: &[DeviceRule]) -> Result<()> {
    let prog = program(rules);
    let license = c"Apache-2.0";
    // Without a verifier log first: the log costs time on every container start, and a log
    // buffer the verbose log overflows fails the load itself with ENOSPC (Linux 6.1 writes
    // every instruction's state at level 1: more than 4 KiB for runc's default rules).
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    let loaded = bpf(BPF_PROG_LOAD, &load).or_else(|first| {
        // Refused: once more with the verifier's log, to say why.
        let mut log = vec![0u8; 1 << 20];
        load.log_level = 1;
        load.log_size = log.len() as u32;
        load.log_buf = log.as_mut_ptr() as u64;
        bpf(BPF_PROG_LOAD, &load).map_err(|_| (first, log))
    });
    let prog_fd = match loaded {
        // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
        Err((source, log)) => {
            let text = String::from_utf8_lossy(&log);
            let verifier = text.trim_end_matches('\0').trim();
            // The end of the log says why.
            let tail: String = verifier
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(Error::Device {
                path: dir.to_path_buf(),
                op: "load the device program",
                detail: tail,
                source,
            });
        }
    };
    let cgroup = std::fs::File::open(dir).map_err(|e| crate::fsutil::io_err("open", dir, e))?;
    let attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &attach).map_err(|source| Error::Device {
        path: dir.to_path_buf(),
        op: "attach the device program",
        detail: String::new(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: bool, kind: DeviceKind, major: Option<i64>, minor: Option<i64>) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access: "rwm".to_string(),
        }
    }

    /// Runs the program over one request, as the kernel would (a tiny interpreter for the
    /// instructions `program` emits).
    fn run(prog: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> bool {
        let ctx = [((access as u32) << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU32_AND_K => r[dst] = u64::from((r[dst] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                ALU32_MOV_X => r[dst] = u64::from(r[src] as u32),
                ALU64_MOV_K => r[dst] = i.imm as i64 as u64,
                JMP_JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc += i.off as usize;
                    }
                }
                JMP_EXIT => return r[0] == 1,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn containerd_default() -> Vec<DeviceRule> {
        vec![
            DeviceRule::deny_all(),
            DeviceRule::allow(DeviceKind::Char, 1, 3, "rwm"),
            DeviceRule::allow(DeviceKind::Char, 1, 9, "rwm"),
            rule(true, DeviceKind::Char, Some(136), None),
            DeviceRule::allow(DeviceKind::Char, 5, 2, "r"),
        ]
    }

    #[test]
    fn the_program_allows_exactly_the_rules() {
        let prog = program(&containerd_default());
        let rw = ACCESS_READ | ACCESS_WRITE;
        assert!(run(&prog, DEV_CHAR, rw, 1, 3), "/dev/null");
        assert!(run(&prog, DEV_CHAR, ACCESS_READ, 1, 9), "/dev/urandom");
        assert!(run(&prog, DEV_CHAR, rw, 136, 7), "a pty, any minor");
        assert!(!run(&prog, DEV_CHAR, rw, 1, 11), "/dev/kmsg");
        assert!(
            !run(&prog, DEV_BLOCK, ACCESS_READ, 1, 3),
            "block 1:3 is not char 1:3"
        );
        assert!(!run(&prog, DEV_BLOCK, ACCESS_READ, 254, 0), "a disk");
        assert!(run(&prog, DEV_CHAR, ACCESS_READ, 5, 2), "read allowed");
        assert!(!run(&prog, DEV_CHAR, rw, 5, 2), "write not in the rule");
    }

    #[test]
    fn a_later_rule_overrides_an_earlier_one() {
        let mut rules = containerd_default();
        rules.push(rule(false, DeviceKind::Char, Some(1), Some(3)));
        let prog = program(&rules);
        assert!(!run(&prog, DEV_CHAR, ACCESS_READ, 1, 3));
        assert!(run(&prog, DEV_CHAR, ACCESS_READ, 1, 9));
    }

    #[test]
    fn allow_everything_ends_the_program() {
        let rules = vec![
            DeviceRule::deny_all(),
            rule(true, DeviceKind::All, None, None),
        ];
        let prog = program(&rules);
        // Prologue, then "r0 = 1; exit": no unreachable instructions after it.
        assert_eq!(prog.len(), 8);
        assert!(run(&prog, DEV_BLOCK, ACCESS_WRITE, 254, 0));
        assert!(allows_everything(&rules));
        assert!(!allows_everything(&containerd_default()));
        let mut denied_after = rules.clone();
        denied_after.push(rule(false, DeviceKind::Char, Some(1), Some(11)));
        assert!(!allows_everything(&denied_after));
    }

    #[test]
    fn v1_lines_follow_the_kernel_format() {
        assert_eq!(DeviceRule::deny_all().v1_line(), "a");
        assert_eq!(
            DeviceRule::allow(DeviceKind::Char, 1, 3, "rwm").v1_line(),
            "c 1:3 rwm"
        );
        assert_eq!(
            rule(true, DeviceKind::Char, Some(136), None).v1_line(),
            "c 136:* rwm"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["devices.allow", "devices.deny"] {
            std::fs::write(dir.path().join(f), "").expect("touch");
        }
        // Only the last write of each file stays in a plain file; the order is checked through
        // the kernel in the real-machine test.
        apply_v1(dir.path(), &containerd_default()).expect("apply");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("devices.allow")).expect("read"),
            "c 5:2 r"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("devices.deny")).expect("read"),
            "a"
        );
    }

    #[test]
    fn bad_access_letters_are_refused() {
        let mut r = DeviceRule::deny_all();
        r.access = "rx".to_string();
        assert!(validate(&[r]).is_err());
        let mut r = DeviceRule::deny_all();
        r.major = Some(-2);
        assert!(validate(&[r]).is_err());
    }
}
