#!/usr/bin/env bash
# Density benchmark: memory (PSS) and processes per idle container, Kiln vs runc, on a private
# containerd; or, with --scale, how many idle Kiln containers one node starts.
#
#   scripts/bench-density.sh [-n N] [-p PARALLEL]
#   scripts/bench-density.sh --scale K [-p PARALLEL]
#
#   -n N          idle containers per runtime (default 100)
#   -p PARALLEL   at most this many `ctr run -d` at once (default 10)
#   --scale K     instead of the comparison: start K idle Kiln sleepers (at most PARALLEL at
#                 once), report how many reached RUNNING, the PSS they added, free memory
#                 before/after, the time taken and the limits (open files, pids) that apply;
#                 e.g. --scale 1000
#
# Comparison, per runtime (Kiln first, then runc):
#   kiln  ctr run -d --runtime io.containerd.kiln.v1 docker.io/kiln-test/sleep:latest ID
#   runc  ctr run -d --runtime io.containerd.runc.v2 docker.io/kiln-test/busybox:latest ID sleep 3600
# One untimed run first (fills the compile cache); then N containers, started through
# `xargs -P PARALLEL`; once all are RUNNING and after a 2 s settle, the PSS
# (/proc/PID/smaps_rollup) of every process the runtime added is summed:
#   kiln  every containerd-shim-kiln-v1 process of this containerd, by parent: `shim` (the
#         server containerd talks to), `zygote` (its child), `worker` (the zygote's children)
#   runc  every containerd-shim-runc-v2 process of this containerd (`shim`) and their children
#         (`container`: the containers' processes)
# plus the growth of containerd's own PSS (after minus before). Reported: PSS per container
# (total / containers running), processes per container, each kind's count and PSS, and the
# drop of MemAvailable per container (system-wide: noisy on a shared machine). All containers
# are removed after each runtime.
#
# Writes JSON to ${OUT_DIR:-target/bench}/density.json (density-scale.json with --scale).
# KILN_SHIM_GROUPING, when set in the environment, is passed to containerd (and so to the
# shim) and recorded in the report. Timing never makes the script fail. The private containerd
# and its directory are removed on exit.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir=$(realpath -m "${OUT_DIR:-$repo_root/target/bench}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-n N] [-p PARALLEL] | --scale K [-p PARALLEL]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

n=100
parallel=10
scale=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --count) [ $# -ge 2 ] || usage; n=$2; shift ;;
        -n?*) n=${1#-n} ;;
        --count=*) n=${1#*=} ;;
        -p | --parallel) [ $# -ge 2 ] || usage; parallel=$2; shift ;;
        -p?*) parallel=${1#-p} ;;
        --parallel=*) parallel=${1#*=} ;;
        --scale) [ $# -ge 2 ] || usage; scale=$2; shift ;;
        --scale=*) scale=${1#*=} ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
[[ $n =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number, not '$n'"
[[ $parallel =~ ^[1-9][0-9]*$ ]] || die "-p wants a positive number, not '$parallel'"
[ -z "$scale" ] || [[ $scale =~ ^[1-9][0-9]*$ ]] || die "--scale wants a positive number, not '$scale'"
[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

grouping=""
if [ -n "${KILN_SHIM_GROUPING+x}" ]; then
    grouping=$KILN_SHIM_GROUPING
    export KILN_SHIM_GROUPING # containerd inherits it, and passes it to the shims it starts
fi

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
if [ -n "$scale" ]; then build_for_run "$repo_root" --no-busybox; else build_for_run "$repo_root"; fi

# --- private containerd ------------------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-density.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"

export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
log "starting a private containerd in $workdir${grouping:+ (KILN_SHIM_GROUPING=$grouping)}"
sock=$(scripts/containerd-private.sh start "$workdir")
containerd_pid=$(cat "$workdir/containerd.pid")
bench=(python3 "$repo_root/scripts/lib/bench.py")
host_json=$("${bench[@]}" host)

names=(sleep)
[ -n "$scale" ] || names+=(busybox)
for name in "${names[@]}"; do
    log "importing docker.io/kiln-test/$name:latest"
    ctr --address "$sock" images import --all-platforms "$images/$name.tar" >/dev/null
done

# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"

# count_procs KIND: how many processes of the runtime (kiln|runc) this containerd has.
count_procs() { "${bench[@]}" procs "$sock" "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }

# wait_procs_gone KIND SECONDS: wait until the runtime has no process left; prints how many are.
wait_procs_gone() {
    local kind=$1 deadline=$((SECONDS + $2)) left
    while :; do
        left=$(count_procs "$kind")
        if [ "$left" = 0 ] || [ $SECONDS -ge $deadline ]; then
            echo "$left"
            return
        fi
        sleep 0.5
    done
}

# remove_all PREFIX: kill and delete every task and container whose id starts with PREFIX.
remove_all() {
    local prefix=$1
    ctr --address "$sock" tasks ls -q | grep "^$prefix-" |
        xargs -r -n 20 -P "$parallel" ctr --address "$sock" tasks rm -f >/dev/null 2>&1 || true
    ctr --address "$sock" containers ls -q | grep "^$prefix-" |
        xargs -r -n 20 -P "$parallel" ctr --address "$sock" containers rm >/dev/null 2>&1 || true
    if ctr --address "$sock" containers ls -q | grep -q "^$prefix-"; then
        log "some $prefix containers survived the first removal; retrying"
        ctr --address "$sock" tasks ls -q | grep "^$prefix-" |
            xargs -r -n 1 ctr --address "$sock" tasks rm -f >/dev/null 2>&1 || true
        ctr --address "$sock" containers ls -q | grep "^$prefix-" |
            xargs -r -n 1 ctr --address "$sock" containers rm >&2 || true
    fi
}

# run_phase LABEL KIND RUNTIME REF COUNT ARGS...: start COUNT idle containers, measure, remove
# them; leaves its inputs for the report in $workdir/LABEL/ and its JSON object in $phase_json.
phase_json=""
time_to_running_s=0
cleanup_s=0
run_phase() {
    local label=$1 kind=$2 runtime=$3 ref=$4 count=$5
    shift 5
    local dir="$workdir/$label" prefix="density-$label" t0 t1 ok running_n deadline left
    mkdir -p "$dir"
    : >"$dir/samples"

    log "$label: one untimed run (fills the compile cache)"
    if [ "$kind" = kiln ]; then
        ctr --address "$sock" run --rm --runtime "$runtime" "$ref" "warmup-$label" /sleep.wasm 0 >/dev/null ||
            die "$label: the warm-up run failed"
    else
        ctr --address "$sock" run --rm --runtime "$runtime" "$ref" "warmup-$label" true >/dev/null ||
            die "$label: the warm-up run failed"
    fi
    left=$(wait_procs_gone "$kind" 10)
    [ "$left" = 0 ] || log "$label: $left $kind processes remain after the warm-up (counted as the baseline)"

    "${bench[@]}" procs "$sock" "$kind" >"$dir/before.json"
    "${bench[@]}" pss "$containerd_pid" >"$dir/containerd-before"
    "${bench[@]}" meminfo >"$dir/mem-before.json"

    log "$label: starting $count idle containers, at most $parallel at once"
    t0=$(date +%s%N)
    local progress_pid=""
    if [ "$count" -ge 200 ]; then
        (while sleep 10 && kill -0 $$ 2>/dev/null; do
            printf '    %s of %s started\n' "$(wc -l <"$dir/samples")" "$count" >&2
        done) &
        progress_pid=$!
    fi
    seq 1 "$count" | xargs -P "$parallel" -I{} "$repo_root/scripts/lib/timed-ctr-run.sh" -d {} "$sock" "$runtime" "$ref" \
        "$prefix" "$dir" "$@"
    [ -z "$progress_pid" ] || { kill "$progress_pid" 2>/dev/null || true; wait "$progress_pid" 2>/dev/null || true; }
    ok=$(awk '$2 == 0' "$dir/samples" | wc -l)
    deadline=$((SECONDS + 60 + count / 5))
    while :; do
        running_n=$("${bench[@]}" running "$sock" "$prefix-")
        if [ "$running_n" -ge "$ok" ] || [ $SECONDS -ge $deadline ]; then break; fi
        sleep 0.5
    done
    t1=$(date +%s%N)
    time_to_running_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    log "$label: $running_n of $count RUNNING after ${time_to_running_s}s ($((count - ok)) starts failed)"
    sleep 2 # settle: the last workers finish mapping the module, containerd its bookkeeping

    "${bench[@]}" procs "$sock" "$kind" >"$dir/after.json"
    "${bench[@]}" pss "$containerd_pid" >"$dir/containerd-after"
    "${bench[@]}" meminfo >"$dir/mem-after.json"
    if [ -n "$scale" ]; then
        limits_json=$(limits_now)
    fi

    log "$label: removing the containers"
    local c0=$SECONDS
    remove_all "$prefix"
    left=$(wait_procs_gone "$kind" 30)
    cleanup_s=$((SECONDS - c0))
    [ "$left" = 0 ] || log "$label: $left $kind processes still there 30 s after removal"

    phase_json="{\"label\":$(jstr "$label"),\"runtime\":$(jstr "$runtime"),\"image\":$(jstr "$ref"),\"args\":$(jarr "$@"),\"n\":$count,\"start_failures\":$((count - ok)),\"running\":$running_n,\"start_wall_s\":$time_to_running_s,\"samples\":$(jstr "$dir/samples"),\"errors\":$(jstr "$dir/errors"),\"before\":$(jstr "$dir/before.json"),\"after\":$(jstr "$dir/after.json"),\"mem_before\":$(jstr "$dir/mem-before.json"),\"mem_after\":$(jstr "$dir/mem-after.json"),\"containerd_pss_before_kib\":$(cat "$dir/containerd-before"),\"containerd_pss_after_kib\":$(cat "$dir/containerd-after"),\"leftover\":$left}"
}

# limits_now: the limits that bound how many containers fit, and where the machine stands.
limits_now() {
    local nofile nproc fds tasks pids_max="" mem_max="" cg
    nofile=$(awk '/^Max open files/ { print $4 }' "/proc/$containerd_pid/limits")
    nproc=$(awk '/^Max processes/ { print $3 }' "/proc/$containerd_pid/limits")
    fds=$(find "/proc/$containerd_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    tasks=$(compgen -G '/proc/[0-9]*/task/[0-9]*' | wc -l)
    cg=$(awk -F: '$2 == "pids" || ($1 == "0" && $2 == "") { print $3; exit }' "/proc/$containerd_pid/cgroup")
    for f in "/sys/fs/cgroup/pids$cg/pids.max" "/sys/fs/cgroup$cg/pids.max"; do
        [ -f "$f" ] && { pids_max=$(cat "$f"); break; }
    done
    # The shims stay in containerd's cgroup (only the guests move to the containers' cgroups).
    cg=$(awk -F: '$2 == "memory" || ($1 == "0" && $2 == "") { print $3; exit }' "/proc/$containerd_pid/cgroup")
    for f in "/sys/fs/cgroup/memory$cg/memory.limit_in_bytes" "/sys/fs/cgroup$cg/memory.max"; do
        [ -f "$f" ] && { mem_max=$(cat "$f"); break; }
    done
    printf '{"ulimit_n":%s,"ulimit_u":%s,"containerd_nofile_soft":%s,"containerd_nproc_soft":%s,"containerd_fds_after":%s,"pid_max":%s,"threads_max":%s,"tasks_after":%s,"containerd_pids_cgroup_max":%s,"containerd_memory_cgroup_max":%s}' \
        "$(jstr "$(ulimit -n)")" "$(jstr "$(ulimit -u)")" "$(jstr "$nofile")" "$(jstr "$nproc")" \
        "$fds" "$(cat /proc/sys/kernel/pid_max)" "$(cat /proc/sys/kernel/threads-max)" "$tasks" \
        "$(jstr "${pids_max:-max (no pids.max: root pids cgroup)}")" "$(jstr "${mem_max:-unknown}")"
}

grouping_json=$(if [ -n "${KILN_SHIM_GROUPING+x}" ]; then jstr "$grouping"; else echo null; fi)
mkdir -p "$out_dir"

if [ -n "$scale" ]; then
    ulimit_n=$(ulimit -n)
    if [[ $ulimit_n =~ ^[0-9]+$ ]] && [ "$ulimit_n" -lt $((scale * 4 + 1024)) ]; then
        log "note: ulimit -n is $ulimit_n; containerd holds a few descriptors per container, so $scale containers may hit it"
    fi
    limits_json=""
    run_phase kiln kiln io.containerd.kiln.v1 docker.io/kiln-test/sleep:latest "$scale"
    cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out_dir/density-scale.json"), "host": $host_json, "shim_grouping": $grouping_json,
 "k": $scale, "parallel": $parallel, "containerd_log": $(jstr "$workdir/containerd.log"),
 "time_to_running_s": $time_to_running_s, "cleanup_s": $cleanup_s, "limits": $limits_json,
 "phase": $phase_json}
JSON
    "${bench[@]}" scale-report "$workdir/meta.json"
    exit 0
fi

run_phase kiln kiln io.containerd.kiln.v1 docker.io/kiln-test/sleep:latest "$n"
phases=$phase_json
run_phase runc runc io.containerd.runc.v2 docker.io/kiln-test/busybox:latest "$n" sleep 3600
phases+=",$phase_json"
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out_dir/density.json"), "host": $host_json, "shim_grouping": $grouping_json,
 "n": $n, "parallel": $parallel, "containerd_log": $(jstr "$workdir/containerd.log"),
 "phases": [$phases]}
JSON
"${bench[@]}" density-report "$workdir/meta.json"
