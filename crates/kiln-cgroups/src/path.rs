//! Interpretation of the OCI `linux.cgroupsPath`.
//!
//! Three forms exist in the wild and the runtime has to pick the right one
//! from the string alone, because the shim is not told which cgroup driver
//! containerd/kubelet use:
//!
//! * `/default/abc`: absolute, below each hierarchy's mount point;
//! * `foo/bar`: relative to the caller's own cgroup (runc's rule);
//! * `slice:prefix:name`: systemd's form, used by kubelet with the systemd
//!   driver. Any path that does not start with `/` and contains `:` is read
//!   this way.

use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// Where a cgroups path points, relative to one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Relative to the hierarchy's mount point.
    FromRoot(PathBuf),
    /// Relative to the caller's own cgroup in that hierarchy.
    FromOwn(PathBuf),
}

fn invalid(path: &str, reason: impl Into<String>) -> Error {
    Error::InvalidPath {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Parses `cgroups_path`, or `default_path` when it is empty.
pub(crate) fn parse(cgroups_path: &str, default_path: &str) -> Result<Target> {
    let path = if cgroups_path.is_empty() {
        default_path
    } else {
        cgroups_path
    };
    if path.is_empty() {
        return Err(invalid(
            path,
            "both cgroups path and default path are empty",
        ));
    }
    if path.starts_with('/') {
        Ok(Target::FromRoot(clean(path, path)?))
    } else if path.contains(':') {
        Ok(Target::FromRoot(systemd(path)?))
    } else {
        Ok(Target::FromOwn(clean(path, path)?))
    }
}

/// Drops `/` and `.` components; rejects `..` and an empty result (which
/// would be the root or the caller's own cgroup: removing that later would
/// be a disaster).
fn clean(original: &str, path: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir => return Err(invalid(original, "contains a `..` component")),
            Component::Prefix(_) => return Err(invalid(original, "has a path prefix")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid(
            original,
            "names the root cgroup or the caller's own cgroup",
        ));
    }
    Ok(out)
}

/// `slice:prefix:name` → `<expanded slice>/<prefix>-<name>.scope`.
fn systemd(original: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = original.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(invalid(
            original,
            "systemd form must be `slice:prefix:name`",
        ));
    };
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = expand_slice(original, slice)?;
    if name.is_empty() {
        return Err(invalid(original, "empty unit name"));
    }
    for part in [prefix, name] {
        if part.contains('/') || part == "." || part == ".." {
            return Err(invalid(
                original,
                format!("{part:?} is not a unit name part"),
            ));
        }
    }
    if name.ends_with(".slice") {
        return Err(invalid(
            original,
            "a slice as the unit name is not supported",
        ));
    }
    if prefix.is_empty() {
        path.push(format!("{name}.scope"));
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Ok(path)
}

/// Expands a slice name the way systemd lays slices out:
/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root.
pub(crate) fn expand_slice(original: &str, slice: &str) -> Result<PathBuf> {
    let Some(base) = slice.strip_suffix(".slice") else {
        return Err(invalid(
            original,
            format!("{slice:?} does not end in .slice"),
        ));
    };
    if base.contains('/') {
        return Err(invalid(original, format!("{slice:?} contains `/`")));
    }
    let mut path = PathBuf::new();
    if base == "-" {
        return Ok(path);
    }
    let mut prefix = String::with_capacity(base.len());
    for part in base.split('-') {
        if part.is_empty() {
            return Err(invalid(
                original,
                format!("{slice:?} has an empty `-` component"),
            ));
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(p: &str) -> Target {
        Target::FromRoot(PathBuf::from(p))
    }

    #[test]
    fn absolute() {
        assert_eq!(parse("/default/abc", "").unwrap(), root("default/abc"));
        assert_eq!(parse("//default/./abc/", "").unwrap(), root("default/abc"));
    }

    #[test]
    fn relative() {
        assert_eq!(
            parse("foo/bar", "").unwrap(),
            Target::FromOwn(PathBuf::from("foo/bar"))
        );
    }

    #[test]
    fn default_used_when_empty() {
        assert_eq!(parse("", "/kiln/abc").unwrap(), root("kiln/abc"));
        assert!(matches!(parse("", ""), Err(Error::InvalidPath { .. })));
    }

    #[test]
    fn systemd_form() {
        assert_eq!(
            parse("kubepods-besteffort-pod12.slice:cri-containerd:abc", "").unwrap(),
            root(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            parse(":docker:abc", "").unwrap(),
            root("system.slice/docker-abc.scope")
        );
        assert_eq!(parse("-.slice:p:n", "").unwrap(), root("p-n.scope"));
        assert_eq!(
            parse("user.slice::n", "").unwrap(),
            root("user.slice/n.scope")
        );
    }

    #[test]
    fn systemd_rejects_malformed() {
        for bad in [
            "a.slice:b",
            "a.slice:b:c:d",
            "notaslice:p:n",
            "a--b.slice:p:n",
            "-a.slice:p:n",
            "a-.slice:p:n",
            "a.slice:p:",
            "a.slice:p:x/y",
            "a.slice:..:x",
            "a/b.slice:p:n",
            "a.slice:p:b.slice",
        ] {
            assert!(
                matches!(parse(bad, ""), Err(Error::InvalidPath { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn dotdot_rejected_and_named() {
        for bad in ["/default/../etc", "../x", "a/../../b", "/.."] {
            let err = parse(bad, "").unwrap_err();
            assert!(matches!(err, Error::InvalidPath { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        // Also via the default path.
        assert!(parse("", "/kiln/../x").is_err());
    }

    #[test]
    fn root_and_own_rejected() {
        for bad in ["/", "//", ".", "./", "/./"] {
            assert!(parse(bad, "").is_err(), "{bad} accepted");
        }
    }
}
