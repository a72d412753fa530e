//! The guest's directories as detached mounts.
//!
//! Each preopened directory (the rootfs and every bind mount) is opened as a detached copy of
//! its mount (`open_tree(OPEN_TREE_CLONE)`) with `nodev` and `nosuid` set on the copy
//! (`mount_setattr`), and `ro`/`noexec` where the spec says so. The copy exists only as a
//! descriptor: nothing appears in the node's mount table, nothing has to be unmounted, and it
//! goes away with the worker. Device nodes shipped in an image or present in a bind-mounted
//! directory then cannot be opened at all, whatever the cgroup's device rules allow, and a
//! read-only mount refuses writes in the kernel, not only in WASI's permission checks. `..` at
//! the root of a detached mount stays there, so a descriptor for one cannot be walked out of.
//!
//! The guest's `/dev` is a small tmpfs made the same way (`fsopen`/`fsmount`) holding exactly
//! the spec's device nodes and runc's defaults, read-only once they exist.
//!
//! These calls need Linux 5.12 (`mount_setattr`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use kiln_plan::DeviceNode;

use crate::{Result, check, sys};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// How a detached mount is restricted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    /// Read-only.
    pub read_only: bool,
    /// No program execution.
    pub no_exec: bool,
    /// Device nodes cannot be opened.
    pub no_dev: bool,
}

impl Attrs {
    fn bits(self) -> u64 {
        let mut bits = MOUNT_ATTR_NOSUID;
        if self.read_only {
            bits |= MOUNT_ATTR_RDONLY;
        }
        if self.no_exec {
            bits |= MOUNT_ATTR_NOEXEC;
        }
        if self.no_dev {
            bits |= MOUNT_ATTR_NODEV;
        }
        bits
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the caller passes a descriptor a syscall just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn set_attrs(fd: RawFd, bits: u64, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: bits,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = libc::AT_EMPTY_PATH as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr on a mount descriptor we own, with a valid mount_attr of the size
    // passed and an empty path.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// A detached copy of the mount tree at `path` (submounts included), restricted by `attrs`.
pub fn clone_tree(path: &Path, attrs: Attrs) -> Result<OwnedFd> {
    let what = || format!("detached mount of {}", path.display());
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| crate::Error::Invalid(format!("NUL in {}", path.display())))?;
    // SAFETY: open_tree with a valid path; returns a new descriptor.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    })
    .map(owned)
    .map_err(sys(what()))?;
    set_attrs(fd.as_raw_fd(), attrs.bits(), true).map_err(sys(format!(
        "restrict the {} (nodev, nosuid{}{})",
        what(),
        if attrs.read_only { ", ro" } else { "" },
        if attrs.no_exec { ", noexec" } else { "" }
    )))?;
    Ok(fd)
}

/// A path through which a directory descriptor of this process can be opened by path-based
/// APIs (WASI's preopens take paths).
pub fn fd_path(fd: &OwnedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn fsconfig_string(fs: RawFd, key: &str, value: &str) -> io::Result<()> {
    let (k, v) = (cstr(key)?, cstr(value)?);
    // SAFETY: fsconfig on our filesystem context with NUL-terminated strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_SET_STRING,
            k.as_ptr(),
            v.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// A detached tmpfs holding `nodes` (paths below `/dev`), read-only once they are made, for the
/// guest's `/dev`.
pub fn device_dir(nodes: &[DeviceNode]) -> Result<OwnedFd> {
    // SAFETY: fsopen with a static name.
    let fs = check(unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) })
        .map(owned)
        .map_err(sys("create a tmpfs for /dev"))?;
    fsconfig_string(fs.as_raw_fd(), "mode", "0755")
        .and_then(|()| fsconfig_string(fs.as_raw_fd(), "size", "64k"))
        .map_err(sys("configure the /dev tmpfs"))?;
    // SAFETY: fsconfig CMD_CREATE takes no key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })
    .map_err(sys("create the /dev tmpfs"))?;
    // SAFETY: fsmount of the context we just created.
    let dev = check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC) as libc::c_uint,
        )
    })
    .map(owned)
    .map_err(sys("mount the /dev tmpfs"))?;
    for node in nodes {
        make_node(dev.as_raw_fd(), node).map_err(sys(format!("create /dev/{}", node.path)))?;
    }
    set_attrs(dev.as_raw_fd(), MOUNT_ATTR_RDONLY, false)
        .map_err(sys("make the /dev tmpfs read-only"))?;
    Ok(dev)
}

fn make_node(dir: RawFd, node: &DeviceNode) -> io::Result<()> {
    let mut parent = String::new();
    let parts: Vec<&str> = node.path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        parent.push_str(part);
        let p = cstr(&parent)?;
        // SAFETY: mkdirat below our own descriptor with a NUL-terminated relative path.
        let ret = unsafe { libc::mkdirat(dir, p.as_ptr(), 0o755) };
        if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::last_os_error());
        }
        parent.push('/');
    }
    let path = cstr(&node.path)?;
    let kind = match node.kind {
        'b' => libc::S_IFBLK,
        'p' => libc::S_IFIFO,
        _ => libc::S_IFCHR,
    };
    let dev = libc::makedev(node.major as u32, node.minor as u32);
    // SAFETY: mknodat/fchownat/fchmodat below our own descriptor with a NUL-terminated
    // relative path; the mode is set again after mknod, which the umask may have narrowed.
    unsafe {
        check(libc::mknodat(dir, path.as_ptr(), kind | (node.mode & 0o7777), dev) as libc::c_long)?;
        check(libc::fchownat(
            dir,
            path.as_ptr(),
            node.uid,
            node.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        ) as libc::c_long)?;
        check(libc::fchmodat(dir, path.as_ptr(), node.mode & 0o7777, 0) as libc::c_long)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn root() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests make mounts and device nodes: run them as root"
        );
    }

    fn open_rw(path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    }

    #[test]
    fn a_device_node_in_a_detached_nodev_copy_cannot_be_opened() {
        root();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("null");
        let c = CString::new(node.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mknod of /dev/null's numbers in our temporary directory.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(made, 0, "mknod: {}", io::Error::last_os_error());
        assert!(
            open_rw(&node).is_ok(),
            "the node opens through the host's mount"
        );
        let copy = clone_tree(
            dir.path(),
            Attrs {
                no_dev: true,
                ..Attrs::default()
            },
        )
        .expect("clone");
        let through = fd_path(&copy).join("null");
        let err = open_rw(&through).expect_err("nodev");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        // Without nodev the same node opens through a copy.
        let plain = clone_tree(dir.path(), Attrs::default()).expect("clone");
        assert!(open_rw(&fd_path(&plain).join("null")).is_ok());
    }

    #[test]
    fn a_read_only_copy_refuses_writes_in_the_kernel() {
        root();
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = clone_tree(
            dir.path(),
            Attrs {
                read_only: true,
                ..Attrs::default()
            },
        )
        .expect("clone");
        let err = std::fs::write(fd_path(&copy).join("x"), b"x").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        std::fs::write(dir.path().join("x"), b"x").expect("the original stays writable");
    }

    #[test]
    fn dotdot_at_the_root_of_a_copy_stays_there() {
        root();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("inner")).expect("mkdir");
        let copy = clone_tree(&dir.path().join("inner"), Attrs::default()).expect("clone");
        std::fs::write(dir.path().join("outside"), b"secret").expect("write");
        let up = fd_path(&copy).join("../outside");
        assert!(
            std::fs::read(&up).is_err(),
            "read {} through ..",
            up.display()
        );
    }

    #[test]
    fn the_device_dir_holds_exactly_its_nodes_and_is_read_only() {
        root();
        let nodes = vec![
            DeviceNode {
                path: "null".into(),
                kind: 'c',
                major: 1,
                minor: 3,
                mode: 0o666,
                uid: 0,
                gid: 0,
            },
            DeviceNode {
                path: "net/tun".into(),
                kind: 'c',
                major: 10,
                minor: 200,
                mode: 0o600,
                uid: 5,
                gid: 6,
            },
        ];
        let dev = device_dir(&nodes).expect("device dir");
        let base = fd_path(&dev);
        let mut names: Vec<String> = std::fs::read_dir(&base)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["net", "null"]);
        assert!(open_rw(&base.join("null")).is_ok(), "/dev/null opens");
        let meta = std::fs::metadata(base.join("net/tun")).expect("tun");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(meta.file_type().is_char_device());
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o600, 5, 6)
        );
        let err = std::fs::write(base.join("new"), b"x").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    }
}
