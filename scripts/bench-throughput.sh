#!/usr/bin/env bash
# Throughput benchmark: how many short-lived tasks per second a runtime gets through when many
# `ctr run --rm` run at once, on a private containerd.
#
#   scripts/bench-throughput.sh [-m TASKS] [-p PARALLEL]
#
#   -m TASKS      tasks per pass (default 200)
#   -p PARALLEL   at most this many `ctr run --rm` at once (default 10)
#
# Passes, one after the other: Kiln (the hello image), runc (busybox `echo hi`), Kiln again
# (so that a drift of the machine shows up as a difference between the two Kiln passes). Each
# pass runs TASKS `ctr run --rm` with unique ids through `xargs -P PARALLEL`, each with a
# timeout of 300 s. Before the passes, one untimed run per runtime fills the compile cache.
#
# Prints, per pass: tasks/s (TASKS / wall time of the pass), failures, and the median and p90
# of the per-task latency (wall time of one `ctr run --rm`, ctr's start-up included); then the
# warnings and errors of the containerd log. Writes the raw latencies and the summary as JSON
# to ${OUT_DIR:-target/bench}/throughput.json. Timing never makes the script fail; a failed
# task is counted, and shown.
#
# KILN_SHIM_GROUPING, when set in the environment, is passed to containerd (and so to the
# shim) and recorded in the report. The private containerd and its directory are removed on
# exit.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir=$(realpath -m "${OUT_DIR:-$repo_root/target/bench}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-m TASKS] [-p PARALLEL]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

tasks=200
parallel=10
while [ $# -gt 0 ]; do
    case "$1" in
        -m | --tasks) [ $# -ge 2 ] || usage; tasks=$2; shift ;;
        -m?*) tasks=${1#-m} ;;
        --tasks=*) tasks=${1#*=} ;;
        -p | --parallel) [ $# -ge 2 ] || usage; parallel=$2; shift ;;
        -p?*) parallel=${1#-p} ;;
        --parallel=*) parallel=${1#*=} ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
[[ $tasks =~ ^[1-9][0-9]*$ ]] || die "-m wants a positive number, not '$tasks'"
[[ $parallel =~ ^[1-9][0-9]*$ ]] || die "-p wants a positive number, not '$parallel'"
[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

grouping=""
if [ -n "${KILN_SHIM_GROUPING+x}" ]; then
    grouping=$KILN_SHIM_GROUPING
    export KILN_SHIM_GROUPING # containerd inherits it, and passes it to the shims it starts
fi

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root"

# --- private containerd ------------------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-tp.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"

export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
log "starting a private containerd in $workdir${grouping:+ (KILN_SHIM_GROUPING=$grouping)}"
sock=$(scripts/containerd-private.sh start "$workdir")
bench=(python3 "$repo_root/scripts/lib/bench.py")
host_json=$("${bench[@]}" host)

for name in hello busybox; do
    log "importing docker.io/kiln-test/$name:latest"
    ctr --address "$sock" images import --all-platforms "$images/$name.tar" >/dev/null
done

# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"

# --- runs --------------------------------------------------------------------------------------
# label runtime image args (args split on spaces)
specs=(
    "kiln|io.containerd.kiln.v1|docker.io/kiln-test/hello:latest|"
    "runc|io.containerd.runc.v2|docker.io/kiln-test/busybox:latest|echo hi"
)

log "warm-up: one untimed run per runtime (fills the compile cache)"
for spec in "${specs[@]}"; do
    IFS='|' read -r label runtime ref args <<<"$spec"
    # shellcheck disable=SC2086 # ARGS are split on spaces, by design
    ctr --address "$sock" run --rm --runtime "$runtime" "$ref" "warmup-$label" $args >/dev/null ||
        die "$label: the warm-up run failed"
done

passes_json=""
declare -A pass_no=()
for which in 0 1 0; do
    IFS='|' read -r label runtime ref args <<<"${specs[$which]}"
    pass_no[$label]=$((${pass_no[$label]:-0} + 1))
    p=${pass_no[$label]}
    dir="$workdir/pass-$label-$p"
    mkdir -p "$dir"
    : >"$dir/samples"
    prefix="tp-$label-$p"
    log "$label pass $p: $tasks tasks, at most $parallel at once"
    start_ns=$(date +%s%N)
    # shellcheck disable=SC2086 # ARGS are split on spaces, by design
    seq 1 "$tasks" | xargs -P "$parallel" -I{} "$repo_root/scripts/lib/timed-ctr-run.sh" --rm {} "$sock" "$runtime" "$ref" \
        "$prefix" "$dir" $args
    end_ns=$(date +%s%N)
    # `ctr run --rm` removes its container; any that is left is a finding (and is removed).
    leftover=$(ctr --address "$sock" containers ls -q | grep -c "^$prefix-" || true)
    if [ "$leftover" != 0 ]; then
        ctr --address "$sock" containers ls -q | grep "^$prefix-" |
            xargs -r -n 20 ctr --address "$sock" tasks rm -f >/dev/null 2>&1 || true
        ctr --address "$sock" containers ls -q | grep "^$prefix-" |
            xargs -r -n 20 ctr --address "$sock" containers rm >/dev/null 2>&1 || true
    fi
    # shellcheck disable=SC2086
    passes_json+="${passes_json:+,}{\"label\":$(jstr "$label"),\"pass\":$p,\"runtime\":$(jstr "$runtime"),\"image\":$(jstr "$ref"),\"args\":$(jarr $args),\"start_ns\":$start_ns,\"end_ns\":$end_ns,\"samples\":$(jstr "$dir/samples"),\"errors\":$(jstr "$dir/errors"),\"leftover\":$leftover}"
done

# --- report ------------------------------------------------------------------------------------
mkdir -p "$out_dir"
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out_dir/throughput.json"), "host": $host_json,
 "shim_grouping": $(if [ -n "${KILN_SHIM_GROUPING+x}" ]; then jstr "$grouping"; else echo null; fi),
 "tasks": $tasks, "parallel": $parallel, "containerd_log": $(jstr "$workdir/containerd.log"),
 "passes": [$passes_json]}
JSON
"${bench[@]}" throughput-report "$workdir/meta.json"
