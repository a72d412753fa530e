#!/usr/bin/env bash
# Churn: N short containers through Kiln, C at a time, on a private containerd, then a check
# that nothing of them is left (processes, cgroups, mounts, bundle directories, cache temporary
# files) and a report of what the shared shim kept (descriptors, RSS).
#
#   scripts/churn.sh [-n TASKS] [-c CONCURRENCY]      default: 10000 tasks, 10 at a time
#
# One long-lived sleeper holds a shared shim up (KILN_SHIM_GROUPING=namespace, unless
# KILN_SHIM_GROUPING is set to something else in the environment), so the shim's growth over
# the whole churn is measured. Builds Kiln (release) first. Exits non-zero when a container
# failed or something was left behind. The suite runs the same check for 500 containers
# (tests/tests/churn.rs).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
tasks=10000
parallel=10
log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage() { echo "usage: $0 [-n TASKS] [-c CONCURRENCY]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        -n) [ $# -ge 2 ] || usage; tasks=$2; shift ;;
        -c) [ $# -ge 2 ] || usage; parallel=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
[[ $tasks =~ ^[1-9][0-9]*$ && $parallel =~ ^[1-9][0-9]*$ ]] || usage
[ "$(id -u)" = 0 ] || die "run as root"

# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root" --no-busybox

workdir=$(mktemp -d /tmp/kiln-churn.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"
export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
export KILN_SHIM_GROUPING=${KILN_SHIM_GROUPING:-namespace}
export KILN_SHIM_IDLE_SECS=600
log "starting a private containerd in $workdir (KILN_SHIM_GROUPING=$KILN_SHIM_GROUPING)"
sock=$(scripts/containerd-private.sh start "$workdir")
c() { ctr --address "$sock" "$@"; }
for name in hello sleep; do
    c images import --all-platforms "$images/$name.tar" >/dev/null
done

c run -d --runtime io.containerd.kiln.v1 docker.io/kiln-test/sleep:latest churn-anchor /sleep.wasm 3600 >/dev/null
for _ in $(seq 1 100); do
    worker=$(c task ls | awk '$1 == "churn-anchor" && $3 == "RUNNING" {print $2}')
    [ -n "$worker" ] && break
    sleep 0.1
done
[ -n "$worker" ] || die "the anchor container did not start"
shim=$(awk '{print $4}' "/proc/$worker/stat")
c run --rm --runtime io.containerd.kiln.v1 docker.io/kiln-test/hello:latest churn-warm >/dev/null
sleep 1
fds() { find "/proc/$shim/fd" -mindepth 1 -maxdepth 1 | wc -l; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$shim/status"; }
fds_before=$(fds); rss_before=$(rss)

log "churning $tasks containers, $parallel at a time"
failures="$workdir/failures"
: >"$failures"
start_ns=$(date +%s%N)
seq 1 "$tasks" | xargs -P "$parallel" -I{} sh -c \
    'out=$(ctr --address "$1" run --rm --runtime io.containerd.kiln.v1 docker.io/kiln-test/hello:latest "churn-$2" 2>&1); rc=$?
     [ "$rc" = 0 ] && [ "$out" = "Hello from Kiln!" ] || echo "churn-$2: rc=$rc out=$out" >>"$3"' \
    _ "$sock" {} "$failures"
end_ns=$(date +%s%N)
secs=$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN {printf "%.1f", (b - a) / 1e9}')

sleep 5
fds_after=$(fds); rss_after=$(rss)
left_procs=$(grep -l "churn-[0-9]" /proc/[0-9]*/cmdline 2>/dev/null | wc -l || true)
left_cgroups=$(find /sys/fs/cgroup -maxdepth 4 -type d -name 'churn-[0-9]*' 2>/dev/null | wc -l)
left_mounts=$(grep -c "churn-[0-9]" /proc/self/mounts || true)
left_bundles=$(find "$workdir/state" -maxdepth 3 -type d -name 'churn-[0-9]*' 2>/dev/null | wc -l)
left_tmp=$(find "$workdir/cache" -name '.tmp-*' 2>/dev/null | wc -l)
left_containers=$(c containers ls -q | grep -c '^churn-[0-9]' || true)
failed=$(wc -l <"$failures")

echo
echo "churn: $tasks containers, $parallel at a time, in ${secs} s ($(awk -v n="$tasks" -v s="$secs" 'BEGIN {printf "%.1f", n / s}')/s)"
echo "failed runs:                 $failed"
echo "shared shim descriptors:     $fds_before -> $fds_after"
echo "shared shim RSS:             $rss_before -> $rss_after KiB ($((rss_after - rss_before)) KiB growth)"
# Exits Kiln reported with output still unread, after KILN_OUTPUT_DRAIN_SECS.
echo "exits held to the drain limit: $(grep -c 'still unread by its reader' "$workdir/containerd.log" || true)"
echo "left: processes $left_procs, cgroups $left_cgroups, mounts $left_mounts, bundles $left_bundles, containers $left_containers, cache temp files $left_tmp"
if [ "$failed" != 0 ]; then
    head -5 "$failures" >&2
    # What containerd and the shim said about those containers (the work dir goes at exit).
    for id in $(head -5 "$failures" | cut -d: -f1); do
        echo "--- containerd's log for $id ---" >&2
        grep -E -- "$id([^0-9]|\$)" "$workdir/containerd.log" >&2 || true
    done
    exit 1
fi
[ "$fds_after" -le "$fds_before" ] || exit 1
[ $((left_procs + left_cgroups + left_mounts + left_bundles + left_tmp + left_containers)) = 0 ] || exit 1
