#!/usr/bin/env bash
# The seeds' benchmark, reproduced here: the same five rows as the documents Kiln started from
# (image size, start time, memory baseline, node density, cold-start CPU spike), for one small
# Rust CLI service built natively (static, in an image holding nothing else, under runc) and as
# Wasm (under Kiln), on a private containerd, printed beside the seeds' figures.
#
#   scripts/bench-seeds.sh [-c CONCURRENT] [-n IDLE] [-r ROUNDS]
#
#   -c CONCURRENT  simultaneous cold starts per runtime (default 100, as in the seeds)
#   -n IDLE        idle containers per runtime for the memory baseline (default 20)
#   -r ROUNDS      one-at-a-time cold starts per runtime, interleaved (default 10)
#
# The service is test-images' `sleep` (test-images/src/bin/sleep.rs): `sleep 0` prints two
# lines and exits, `sleep` with no argument idles. The Wasm side is target/test-images/sleep.tar
# (wasm32-wasip1, 54 KB module); the native side is the same source built by
# bench/native-sleep for the host with `+crt-static`, with the same release profile, packed by
# scripts/make-busybox-image.py --exe as the image's only file, /sleep.
#
# Rows, each for Kiln (kiln-test/sleep, `/sleep.wasm`) and runc (kiln-test/native-sleep,
# `/sleep`):
#   image size        the image's layers as stored by containerd (uncompressed) and gzipped
#                     (as a registry would hold them)
#   start time        one `ctr run --rm ... 0` at a time, ROUNDS interleaved: the median; and
#                     CONCURRENT of them launched at once (xargs -P): wall time until all exited
#   memory baseline   IDLE idle containers (`ctr run -d`): PSS of every process the runtime
#                     added (bench.py procs) plus containerd's growth, per container
#   node density      how many idle containers this node holds: the smallest of MemAvailable /
#                     memory per container, pid_max / tasks (processes and threads) per
#                     container, and containerd's RLIMIT_NOFILE / its descriptors per container;
#                     the binding one is named. Also scaled to the seeds' 8 GiB node (memory only)
#   cold-start CPU    the CONCURRENT simultaneous starts: CPU-seconds the node spent (busy
#                     jiffies of /proc/stat's `cpu` line, start to end), that as a share of the
#                     node's capacity over the burst, and the busiest 100 ms sample
# The seeds' figures (4 cores, 8 GiB, 100 concurrent cold starts, an alpine-based container
# against Wasm): image 13 MB -> 0.9 MB, start 1.2 s -> 6 ms, memory 18 MB -> 2.1 MB, density
# 300 -> 3,000 pods, CPU spike 80 % -> 3 %.
#
# Prints the table (Kiln, runc, runc/Kiln, and the seeds' pair and ratio); writes the raw
# figures as JSON to ${OUT:-target/bench/seeds.json} and, with gnuplot (installed with apt-get
# as gnuplot-nox when missing), a chart of the advantage per row against the seeds' next to it
# (seeds.png). Timing never makes the script fail. The private containerd and its directory
# are removed on exit.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=$(realpath -m "${OUT:-$repo_root/target/bench/seeds.json}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-c CONCURRENT] [-n IDLE] [-r ROUNDS]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

concurrent=100
idle=20
rounds=10
while [ $# -gt 0 ]; do
    case "$1" in
        -c | --concurrent) [ $# -ge 2 ] || usage; concurrent=$2; shift ;;
        -n | --idle) [ $# -ge 2 ] || usage; idle=$2; shift ;;
        -r | --rounds) [ $# -ge 2 ] || usage; rounds=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
for v in "$concurrent" "$idle" "$rounds"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || die "options want positive numbers, not '$v'"
done
[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root" --no-busybox
build_native "$repo_root" native-sleep sleep

# --- private containerd and images -------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-seeds.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"
sampler_pid=""
stop_sampler() {
    [ -z "$sampler_pid" ] || { kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null; } || true
    sampler_pid=""
}
# shellcheck disable=SC2154 # rc is set inside the trap
trap 'rc=$?; set +e; stop_sampler; (exit $rc); _kiln_private_containerd_cleanup' EXIT

python3 scripts/make-busybox-image.py "$workdir/native-sleep.tar" \
    --ref docker.io/kiln-test/native-sleep:latest --exe "$native_exe" >&2

export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
log "starting a private containerd in $workdir"
sock=$(scripts/containerd-private.sh start "$workdir")
containerd_pid=$(cat "$workdir/containerd.pid")
bench=(python3 "$repo_root/scripts/lib/bench.py")
host_json=$("${bench[@]}" host)
ctr --address "$sock" images import --all-platforms "$images/sleep.tar" >/dev/null
ctr --address "$sock" images import --all-platforms "$workdir/native-sleep.tar" >/dev/null

# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"

# The two sides: label, runtime, image, the program inside it.
labels=(kiln runc)
declare -A runtime=([kiln]=io.containerd.kiln.v1 [runc]=io.containerd.runc.v2)
declare -A ref=([kiln]=docker.io/kiln-test/sleep:latest [runc]=docker.io/kiln-test/native-sleep:latest)
declare -A exe=([kiln]=/sleep.wasm [runc]=/sleep)
declare -A tar=([kiln]="$images/sleep.tar" [runc]="$workdir/native-sleep.tar")

fds_of() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
busy_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# remove_all PREFIX: kill and delete every task and container whose id starts with PREFIX.
remove_all() {
    local prefix=$1
    ctr --address "$sock" tasks ls -q | grep "^$prefix-" |
        xargs -r -n 20 -P 10 ctr --address "$sock" tasks rm -f >/dev/null 2>&1 || true
    ctr --address "$sock" containers ls -q | grep "^$prefix-" |
        xargs -r -n 20 -P 10 ctr --address "$sock" containers rm >/dev/null 2>&1 || true
}

sides=()
for label in "${labels[@]}"; do
    rt=${runtime[$label]} image=${ref[$label]} prog=${exe[$label]}
    dir="$workdir/$label"
    mkdir -p "$dir/one" "$dir/burst" "$dir/idle"
    : >"$dir/one/samples"
    : >"$dir/burst/samples"
    : >"$dir/idle/samples"
    log "$label: one untimed run (fills the compile cache)"
    ctr --address "$sock" run --rm --runtime "$rt" "$image" "seeds-$label-warm" "$prog" 0 >/dev/null ||
        die "$label: the warm-up run failed"
    "${bench[@]}" image-size "${tar[$label]}" >"$dir/image.json"
done

log "start time: $rounds rounds of one \`ctr run --rm\` per runtime, interleaved"
for i in $(seq 1 "$rounds"); do
    for label in "${labels[@]}"; do
        scripts/lib/timed-ctr-run.sh --rm "$i" "$sock" "${runtime[$label]}" "${ref[$label]}" \
            "seeds-$label-one" "$workdir/$label/one" "${exe[$label]}" 0 >/dev/null
    done
done

for label in "${labels[@]}"; do
    dir="$workdir/$label"
    sleep 3 # the previous phase's shims and cleanups settle
    log "$label: $concurrent cold starts at once"
    "${bench[@]}" cpu-sampler "$dir/burst/cpu" &
    sampler_pid=$!
    sleep 0.3
    busy0=$(busy_jiffies)
    t0=$(date +%s%N)
    seq 1 "$concurrent" | xargs -P "$concurrent" -I{} scripts/lib/timed-ctr-run.sh --rm {} "$sock" \
        "${runtime[$label]}" "${ref[$label]}" "seeds-$label-burst" "$dir/burst" "${exe[$label]}" 0 >/dev/null
    t1=$(date +%s%N)
    busy1=$(busy_jiffies)
    sleep 0.3
    stop_sampler
    echo "{\"start_ns\":$t0,\"end_ns\":$t1,\"busy_jiffies\":$((busy1 - busy0))}" >"$dir/burst/wall.json"
    remove_all "seeds-$label-burst"

    log "$label: $idle idle containers"
    "${bench[@]}" procs "$sock" "$label" >"$dir/idle/before.json"
    "${bench[@]}" pss "$containerd_pid" >"$dir/idle/containerd-pss-before"
    fds_of "$containerd_pid" >"$dir/idle/containerd-fds-before"
    "${bench[@]}" meminfo >"$dir/idle/mem-before.json"
    seq 1 "$idle" | xargs -P 10 -I{} scripts/lib/timed-ctr-run.sh -d {} "$sock" \
        "${runtime[$label]}" "${ref[$label]}" "seeds-$label-idle" "$dir/idle" "${exe[$label]}" >/dev/null
    deadline=$((SECONDS + 60))
    while [ "$("${bench[@]}" running "$sock" "seeds-$label-idle-")" -lt "$idle" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.5
    done
    sleep 2 # settle
    "${bench[@]}" procs "$sock" "$label" >"$dir/idle/after.json"
    "${bench[@]}" pss "$containerd_pid" >"$dir/idle/containerd-pss-after"
    fds_of "$containerd_pid" >"$dir/idle/containerd-fds-after"
    "${bench[@]}" meminfo >"$dir/idle/mem-after.json"
    running_n=$("${bench[@]}" running "$sock" "seeds-$label-idle-")
    remove_all "seeds-$label-idle"

    sides+=("{\"label\":$(jstr "$label"),\"runtime\":$(jstr "${runtime[$label]}"),\"image\":$(jstr "${ref[$label]}"),\"program\":$(jstr "${exe[$label]}"),\"dir\":$(jstr "$dir"),\"idle_running\":$running_n}")
done

nofile=$(awk '/^Max open files/ { print $4 }' "/proc/$containerd_pid/limits")
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out"), "host": $host_json, "concurrent": $concurrent, "idle": $idle,
 "rounds": $rounds, "clk_tck": $(getconf CLK_TCK), "pid_max": $(cat /proc/sys/kernel/pid_max),
 "containerd_nofile": $(jstr "$nofile"), "containerd_log": $(jstr "$workdir/containerd.log"),
 "native_exe_bytes": $(stat -c %s "$native_exe"), "wasm_module_bytes": $(stat -c %s "$images/sleep.wasm"),
 "sides": [$(IFS=,; echo "${sides[*]}")]}
JSON
mkdir -p "$(dirname "$out")"
"${bench[@]}" seeds-report "$workdir/meta.json"
if ! command -v gnuplot >/dev/null; then
    apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 || true
fi
"${bench[@]}" seeds-plot "$out" "${out%.json}.png" ||
    echo "warning: no chart (gnuplot missing or failed)" >&2
