//! The short-lived actions containerd runs the shim binary for: `start` and `delete`.
//!
//! Both run without an async runtime: `start` is on the path of every container start, and a
//! fork+exec, a pipe and a file write need no executor.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use containerd_shim::Flags;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim::DeleteResponse;

use crate::group::{self, Grouping};
use crate::service::now_timestamp;

/// `start`: launch the server for this container's group and print its address.
///
/// The reply is the bare socket address. containerd 1.6 and 1.7 only understand that; 2.x
/// takes a bare address as a v2 shim, and Kiln serves the Task API under both names.
pub fn start(flags: &Flags) -> Result<()> {
    // containerd passes runtime options on stdin; Kiln has none, but the pipe must be drained
    // so containerd's writer does not block.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);

    let grouping = Grouping::from_env()?;
    let bundle = std::env::current_dir().context("bundle directory")?;
    let key = grouping.key(&flags.id, &bundle);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &key);
    let path = address.trim_start_matches("unix://");
    // Held until the server listens, so a concurrent start for the same group waits and then
    // shares it instead of launching a second one. A per-container shim has no one to race.
    let _lock = if grouping.shared() {
        Some(group::lock(&address).context("lock the shim group")?)
    } else {
        None
    };
    if grouping.shared() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        // A server for this group is already running: share it.
        group::touch_lease(&address);
        std::fs::write("address", &address).context("write the address file")?;
        return reply(&address);
    }

    let exe = std::env::current_exe().context("locate the shim binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &flags.address,
        "-socket",
        &address,
    ]);
    if flags.debug {
        cmd.arg("-debug");
    }
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: signals for containerd's group must not reach it.
        .process_group(0);
    let mut child = cmd.spawn().context("spawn the shim server")?;
    // The server closes this pipe once it listens (or dies): reading to the end is the
    // readiness handshake.
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Ok(Some(status)) = child.try_wait() {
        bail!(
            "the shim server exited during start ({status}): {}",
            out.trim()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = child.kill();
        bail!(
            "the shim server did not start listening on {address}: {}",
            out.trim()
        );
    }
    if grouping.shared() {
        group::touch_lease(&address);
    }
    std::fs::write("address", &address).context("write the address file")?;
    reply(&address)
}

fn reply(address: &str) -> Result<()> {
    let mut stdout = std::io::stdout();
    stdout.write_all(address.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `delete`: containerd's cleanup after a shim disappeared. Kill whatever is left in the
/// container's cgroup, remove it, unmount the rootfs, and report the container as killed.
pub fn delete(flags: &Flags) -> Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("bundle directory")?
    } else {
        flags.bundle.clone().into()
    };
    cleanup_bundle(&bundle, &flags.namespace, &flags.id);
    let mut resp = DeleteResponse::new();
    resp.exit_status = 128 + libc::SIGKILL as u32;
    resp.exited_at = Some(now_timestamp()).into();
    let bytes = resp.write_to_bytes()?;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

/// Best-effort removal of everything a container may have left: its cgroup's processes and
/// directories and its rootfs mount.
pub fn cleanup_bundle(bundle: &Path, namespace: &str, id: &str) {
    if let Ok(spec) = oci_spec::runtime::Spec::load(bundle.join("config.json")) {
        let path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(layout) = kiln_cgroups::Layout::detect()
            && let Ok(cg) = kiln_cgroups::Cgroup::open(
                &layout,
                &path,
                &crate::service::default_cgroup(namespace, id),
            )
        {
            if let Err(e) = cg.kill_all() {
                log::warn!("cleanup {id}: kill cgroup: {e}");
            }
            if let Err(e) = cg.remove() {
                log::warn!("cleanup {id}: remove cgroup: {e}");
            }
        }
    }
    crate::service::unmount_rootfs(&bundle.join("rootfs"));
}
