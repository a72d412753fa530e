#!/usr/bin/env bash
# Starts or stops a private containerd: its own socket, root and state under DIR; the system's
# containerd (if any) is never touched. Used by scripts/demo.sh, the benchmarks and the
# end-to-end tests, so that all of them run against the same configuration.
#
#   containerd-private.sh start DIR [--cri] [--netns NAME] [--bin-dir DIR_WITH_CONTAINERD]
#   containerd-private.sh stop DIR
#   containerd-private.sh restart DIR [--down SECONDS]
#
# `restart` stops the containerd daemon only (SIGTERM: its shims and containers keep running,
# as when a node's containerd is restarted), waits SECONDS (default 0) and starts it again with
# the same configuration and environment variables as the caller gives.
#
# `start` prints the socket path on stdout once containerd answers. The shim binary is found
# on containerd's PATH: put the directory holding containerd-shim-kiln-v1 first in PATH (with
# --cri, the --bin-dir goes first on PATH too, for its containerd-shim-runc-v2).
# KILN_CACHE_DIR, when set, is passed through to the shim.
#
# --cri enables the CRI plugin (what kubelet talks to) with the runtime handlers `runc`
# (io.containerd.runc.v2, the default) and `kiln` (io.containerd.kiln.v1), in the format the
# containerd version wants (config version 2 for 1.x, 3 for 2.x). There is no internet: the
# sandbox ("pause") image is built from scripts/lib/pause.c (cc -static) and imported into the
# k8s.io namespace as localhost/kiln/pause:1. The CNI configuration and plugin directories are
# DIR/cni/net.d and DIR/cni/bin: a pod network exists only with --netns.
#
# --netns NAME creates the network namespace NAME (`ip netns add`, loopback up) and runs
# containerd in it (and so its shims and host-network pods), so that pod networking changes
# nothing on the host: with --cri, DIR/cni/net.d then gets a bridge network (`kiln-cri0`,
# host-local IPAM on 10.88.0.0/24, its leases under DIR/cni/ipam) that lives in NAME.
# Only the network namespace is switched (nsenter --net), not the mount namespace: containerd's
# mounts and cgroups stay visible to the caller. `stop` deletes the namespace.
set -euo pipefail

usage() { echo "usage: $0 start|stop|restart DIR [--cri] [--netns NAME] [--bin-dir DIR] [--down SECONDS]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1; dir=$(realpath -m "$2"); shift 2
cri=0; bindir=""; netns=""; down=0
while [ $# -gt 0 ]; do
  case "$1" in
    --down) [ $# -ge 2 ] || usage; down=$2; shift ;;
    --cri) cri=1 ;;
    --bin-dir) [ $# -ge 2 ] || usage; bindir=$(realpath -m "$2"); shift ;;
    --netns) [ $# -ge 2 ] || usage; netns=$2; shift ;;
    *) usage ;;
  esac
  shift
done
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sandbox_image=localhost/kiln/pause:1

# The CRI plugin's configuration: config version 2 (containerd 1.6, 1.7) puts everything
# under io.containerd.grpc.v1.cri; version 3 (2.x) splits it into cri.v1.images (snapshotter,
# the sandbox image) and cri.v1.runtime (runtimes, CNI, OOM score), leaving the gRPC server's
# streaming options to grpc.v1.cri. Pod network namespaces are mounted under containerd's
# state directory, not the host's /run/netns. NRI (1.7, 2.x) listens on a fixed host-wide
# socket: off, so that two private containerds never share it.
#
# Wasm images (platform wasi/wasm) need no image setting on 1.6, 1.7 or 2.1: the CRI pulls
# for linux/amd64, but a tag that names a manifest (not an index) skips platform matching,
# and these versions' unpackers take a config of any platform (tests/tests/cri_pull.rs). Two
# knobs, for 2.x only, let the tests show what containerd 2.3 does and how a node fixes it;
# both default to containerd's own defaults:
#   KILN_CRI_STRICT_UNPACK=1  check_platform_supported = true: the Transfer Service unpacks the
#     host platform only, as 2.3 does by default for other operating systems: a wasi/wasm
#     image is fetched, not unpacked;
#   KILN_CRI_LOCAL_PULL=1     use_local_image_pull = true: the CRI pulls in process, as 1.x
#     does, with an unpacker that takes any platform: what a 2.3 node needs for Wasm images.
cri_config() {
  local version=$1
  if [ "$version" -ge 2 ]; then
    local local_pull=false strict_unpack=false
    [ "${KILN_CRI_LOCAL_PULL:-0}" = 1 ] && local_pull=true
    [ "${KILN_CRI_STRICT_UNPACK:-0}" = 1 ] && strict_unpack=true
    cat <<TOML
version = 3
root = "$dir/root"
state = "$dir/state"

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.transfer.v1.local"]
  check_platform_supported = $strict_unpack

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  use_local_image_pull = $local_pull
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$sandbox_image"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$dir/cni/bin"]
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kiln]
      runtime_type = "io.containerd.kiln.v1"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
TOML
  else
    cat <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"
TOML
    if [ "$minor" -ge 7 ]; then
      printf '\n[plugins."io.containerd.nri.v1.nri"]\n  disable = true\n'
    fi
    cat <<TOML

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "$sandbox_image"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln]
      runtime_type = "io.containerd.kiln.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
TOML
  fi
}

# The CNI plugins (Debian's containernetworking-plugins) the pod network uses, linked into a
# directory of ours so that containerd sees those and nothing else.
cni_setup() {
  mkdir -p "$dir/cni/bin" "$dir/cni/net.d" "$dir/cni/ipam"
  local p
  for p in bridge host-local loopback; do
    [ -x "/usr/lib/cni/$p" ] || { echo "/usr/lib/cni/$p missing: apt-get install containernetworking-plugins" >&2; exit 1; }
    ln -sf "/usr/lib/cni/$p" "$dir/cni/bin/$p"
  done
  [ -n "$netns" ] || return 0
  cat >"$dir/cni/net.d/10-kiln-cri.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "kiln-cri",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "kiln-cri0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "10.88.0.0/24"}]]
      }
    }
  ]
}
JSON
}

case "$cmd" in
start)
  mkdir -p "$dir"
  containerd_bin=${bindir:+$bindir/}containerd
  ctr_bin=${bindir:+$bindir/}ctr
  if [ $cri = 1 ]; then
    # The CRI's runc pods get the containerd-shim-runc-v2 of the containerd under test.
    [ -z "$bindir" ] || export PATH="$bindir:$PATH"
    # "containerd github.com/containerd/containerd[/v2] 1.6.20~ds1 ..." -> 1 6
    version=$("$containerd_bin" --version | awk '{print $3}')
    major=${version%%.*}; minor=${version#*.}; minor=${minor%%.*}
    [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || { echo "cannot parse the containerd version '$version'" >&2; exit 1; }
    cni_setup
    cri_config "$major" >"$dir/config.toml"
    cc -static -Os -s -o "$dir/pause" "$repo_root/scripts/lib/pause.c"
    python3 "$repo_root/scripts/make-busybox-image.py" "$dir/pause.tar" --ref "$sandbox_image" \
      --pause "$dir/pause" >/dev/null
  else
    cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln]
      runtime_type = "io.containerd.kiln.v1"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
TOML
  fi
  launch=()
  if [ -n "$netns" ]; then
    ip netns add "$netns"
    echo "$netns" >"$dir/netns"
    ip -n "$netns" link set lo up
    launch=(nsenter "--net=/run/netns/$netns" --)
  fi
  echo "$ctr_bin" >"$dir/ctr-bin"
  printf '%q ' "${launch[@]}" "$containerd_bin" --config "$dir/config.toml" >"$dir/daemon-cmd"
  "${launch[@]}" "$containerd_bin" --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 1 200); do
    if "$ctr_bin" --address "$dir/containerd.sock" version >/dev/null 2>&1; then
      if [ $cri = 1 ]; then
        "$ctr_bin" --address "$dir/containerd.sock" -n k8s.io images import "$dir/pause.tar" >/dev/null
      fi
      echo "$dir/containerd.sock"
      exit 0
    fi
    if ! kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
      echo "containerd exited; log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1
    fi
    sleep 0.05
  done
  echo "containerd did not answer on $dir/containerd.sock; log:" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
restart)
  [ -f "$dir/daemon-cmd" ] || { echo "no containerd was started in $dir" >&2; exit 1; }
  pid=$(cat "$dir/containerd.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  sleep "$down"
  # exec: the background job is containerd itself, so $! is its pid (not that of a subshell
  # around it, which stop would kill while containerd lived on).
  eval "exec $(cat "$dir/daemon-cmd")" >>"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  ctr_bin=$(cat "$dir/ctr-bin")
  for _ in $(seq 1 200); do
    if "$ctr_bin" --address "$dir/containerd.sock" version >/dev/null 2>&1; then
      exit 0
    fi
    sleep 0.05
  done
  echo "containerd did not come back on $dir/containerd.sock; log:" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  sock="$dir/containerd.sock"
  ctr() { command "$(cat "$dir/ctr-bin" 2>/dev/null || echo ctr)" "$@"; }
  if [ -S "$sock" ]; then
    for ns in $(ctr --address "$sock" namespaces ls -q 2>/dev/null); do
      for t in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
      done
      sleep 0.2
      for t in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
      done
      for c in $(ctr --address "$sock" -n "$ns" containers ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
      done
    done
  fi
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
  # Whatever containerd left mounted under its root (snapshots, rootfs, pod netns) goes too.
  { grep -o " $dir/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  if [ -f "$dir/netns" ]; then
    ip netns del "$(cat "$dir/netns")" 2>/dev/null || true
    rm -f "$dir/netns"
  fi
  ;;
*) usage ;;
esac
