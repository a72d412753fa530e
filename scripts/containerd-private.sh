#!/usr/bin/env bash
# Starts or stops a private containerd: its own socket, root and state under DIR; the system's
# containerd (if any) is never touched. Used by scripts/demo.sh, the benchmarks and the
# end-to-end tests, so that all of them run against the same configuration.
#
#   containerd-private.sh start DIR [--cri] [--bin-dir DIR_WITH_CONTAINERD]
#   containerd-private.sh stop DIR
#
# `start` prints the socket path on stdout once containerd answers. The shim binary is found
# on containerd's PATH: put the directory holding containerd-shim-kiln-v1 first in PATH.
# KILN_CACHE_DIR, when set, is passed through to the shim.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR [--cri] [--bin-dir DIR]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1; dir=$(realpath -m "$2"); shift 2
cri=0; bindir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cri) cri=1 ;;
    --bin-dir) bindir=$2; shift ;;
    *) usage ;;
  esac
  shift
done

case "$cmd" in
start)
  mkdir -p "$dir"
  containerd_bin=${bindir:+$bindir/}containerd
  ctr_bin=${bindir:+$bindir/}ctr
  if [ $cri = 1 ]; then
    disabled='[]'
  else
    disabled='["io.containerd.grpc.v1.cri"]'
  fi
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = $disabled

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
  echo "$ctr_bin" >"$dir/ctr-bin"
  "$containerd_bin" --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 1 200); do
    if "$ctr_bin" --address "$dir/containerd.sock" version >/dev/null 2>&1; then
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
  # Whatever containerd left mounted under its root (snapshots, rootfs) goes too.
  grep -o " $dir/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  ;;
*) usage ;;
esac
