#!/usr/bin/env bash
# CRI benchmark: Kiln against runc as Kubernetes runtime handlers, through containerd's CRI
# as kubelet drives it, in one run.
#
#   scripts/bench-cri.sh [-n ROUNDS]
#
#   -n ROUNDS     measured rounds (default 20)
#
# Builds Kiln (release), the test images, and the `figures` test of tests/tests/cri_kiln.rs
# (release; the suite skips it, #[ignore]), and runs that test with --ignored and
# KILN_CRI_ROUNDS=ROUNDS. The test starts the CRI harness's private containerd
# (tests/src/cri.rs: the CRI plugin, a local pause image, containerd in a network namespace of
# its own), imports the images, and then, per runtime handler, runs one
# untimed round (it fills Kiln's compile cache) and ROUNDS rounds, each running both handlers
# in turn, in an order that alternates from one round to the next. A round of one handler:
#   RunPodSandbox     of a host-network pod (the same pod spec for both)
#   CreateContainer   of a short container; then StartContainer, and ContainerStatus polled
#                     every 2 ms until EXITED (it must exit 0)
#                       kiln  docker.io/kiln-test/hello:latest
#                       runc  docker.io/kiln-test/busybox:latest /bin/echo hello
#   an idle container in the same pod, and 1 s after it is RUNNING:
#                       kiln  docker.io/kiln-test/sleep:latest 3600
#                       runc  docker.io/kiln-test/busybox:latest /bin/sleep 3600
#     pod memory      the pod's shim (the sandbox process's parent) and all its descendants,
#                     summed from /proc/PID/smaps_rollup: Kiln's shim, zygote, sandbox
#                     worker and container worker; runc's shim, pause and the container.
#                     PSS, split into anonymous memory (the pod's own) and file pages (the
#                     binaries, which other pods on the node share), USS and RSS; and how many
#                     processes outside the pod run the same shim binary (sharing its pages)
#     working sets    PodSandboxStats of the pod and ContainerStats of the idle container
#   then the pod is stopped and removed.
#
# Prints min / median / max per figure and handler, and the ratio of the medians (kiln/runc);
# writes every round and the summary as JSON to ${OUT_DIR:-target/bench}/cri.json, and the
# containerd log next to it (cri-containerd.log; CONTAINERD_LOG_LEVEL=debug in the environment
# adds Kiln's phase timings to it). Timing never makes the script fail; a round that goes wrong
# (a container that does not exit 0, a pod without its processes) fails the test, and the script.
#
# KILN_BENCH_CONTAINERD_BIN, when set, is a directory holding another containerd and its ctr
# (scripts/fetch-containerd.sh trixie|sid unpacks 1.7 or 2.x); the harness's containerd is
# stopped and its directory removed when the test ends.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir=$(realpath -m "${OUT_DIR:-$repo_root/target/bench}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-n ROUNDS]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

rounds=20
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --rounds) [ $# -ge 2 ] || usage; rounds=$2; shift ;;
        -n?*) rounds=${1#-n} ;;
        --rounds=*) rounds=${1#*=} ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number, not '$rounds'"
[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"
if [ -n "${KILN_BENCH_CONTAINERD_BIN:-}" ]; then
    [ -x "$KILN_BENCH_CONTAINERD_BIN/containerd" ] ||
        die "no containerd in KILN_BENCH_CONTAINERD_BIN=$KILN_BENCH_CONTAINERD_BIN"
    export KILN_E2E_CONTAINERD_BIN=$KILN_BENCH_CONTAINERD_BIN
    containerd_version=$("$KILN_BENCH_CONTAINERD_BIN/containerd" --version)
else
    unset KILN_E2E_CONTAINERD_BIN
    containerd_version=$(containerd --version)
fi

# --- build -------------------------------------------------------------------------------------
# The harness builds its own busybox image.
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root" --no-busybox
# A release test binary sits in target/release/deps, so the harness takes the release shim
# next to it (tests/src/lib.rs, find_bin_dir).
log "building the CRI figures test (release)"
cargo test --release -p kiln-e2e --test cri_kiln --no-run

# --- run ---------------------------------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-cri.XXXXXX)
trap 'rm -rf "$workdir"' EXIT
bench=(python3 "$repo_root/scripts/lib/bench.py")
host_json=$("${bench[@]}" host)

log "$rounds rounds of runc and Kiln pods on $containerd_version"
KILN_CRI_ROUNDS=$rounds KILN_CRI_FIGURES="$workdir/raw.json" KILN_TEST_IMAGES="$images" \
    cargo test --release -p kiln-e2e --test cri_kiln -- --exact figures --ignored --nocapture >&2

# --- report ------------------------------------------------------------------------------------
# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"
mkdir -p "$out_dir"
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out_dir/cri.json"), "host": $host_json,
 "containerd_version": $(jstr "$containerd_version"),
 "raw": $(jstr "$workdir/raw.json"), "containerd_log": $(jstr "$workdir/raw-containerd.log")}
JSON
"${bench[@]}" cri-report "$workdir/meta.json"
