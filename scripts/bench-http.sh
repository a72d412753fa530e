#!/usr/bin/env bash
# HTTP serving benchmark: requests/s and latency of one small echo handler under Debian's `wrk`
# on loopback, served three ways in one run:
#
#   kiln      the wasi:http test component http-p2 (test-images/p2/src/http.rs, its echo
#             route) in a Kiln container (`ctr run -d --net-host`, io.containerd.kiln.v1): a
#             fresh instance per request from the pooling allocator
#   wasmtime  the same .wasm under `wasmtime serve -S cli` (wasmtime-cli 48.0.8, Kiln's Wasmtime
#             version), a plain process on the host
#   native    bench/native-echo (the same answer on the same HTTP stack, hyper 1 on tokio, as a
#             static binary) in a runc container (`ctr run -d --net-host`)
#
#   scripts/bench-http.sh [-d SECONDS] [-r ROUNDS] [-c CONNECTIONS] [-t THREADS] [-w SECONDS]
#
#   -d SECONDS      length of one wrk run (default 10)
#   -r ROUNDS       rounds; each runs wrk once against every server in turn, so that a drift of
#                   the (shared) machine affects all three alike (default 3)
#   -c CONNECTIONS  wrk's connections (default 32)
#   -t THREADS      wrk's threads (default 2)
#   -w SECONDS      untimed wrk run per server before the rounds (default 3)
#
# Builds Kiln (release), the test images and native-echo; `wasmtime` is $WASMTIME if set, else
# target/bench-tools/wasmtime-48.0.8/bin/wasmtime, installed there with `cargo install --locked
# wasmtime-cli --version 48.0.8` when missing (a long build: about an hour with one job). wrk is
# installed with apt-get when missing. Starts a private containerd (its shims at RUST_LOG=debug,
# for the Kiln server's phase times), starts the three servers on free loopback ports, checks
# that each answers the same body, runs the warm-up and the rounds (`wrk --latency` with a Lua
# script that writes its summary as JSON), then stops the servers: SIGTERM for the containers
# (Kiln's worker then logs `http phases: requests=N context_us=... instantiate_us=...` at
# debug level: its per-request phase means over its whole life), SIGINT for `wasmtime serve`.
#
# Measured per server and round: requests/s (wrk's requests / its duration), latency p50 / p90
# / p99 / max (wrk's, from connect-to-response per request, 32 requests in flight), socket
# errors and non-2xx answers, and the server's CPU time per request (utime + stime of the
# serving process from /proc/PID/stat, across all its threads, over the wrk run, divided by
# the requests). wrk runs on the same two cores as the servers, so requests/s is what a
# server gets with half the machine's CPU going to the load generator.
#
# Prints a table (medians over the rounds), the ratios of Kiln's requests/s to the other two
# (the target is Kiln >= 1.5x `wasmtime serve`; it is reported, never enforced), and where a
# Kiln request's time goes: the worker's phase means (context, instantiate, handler, teardown,
# slot to response head: wall times), and its CPU time per request against native-echo's (the
# same hyper/tokio/TCP path), the difference being the Wasm part. Writes everything as JSON to
# ${OUT:-target/bench/http.json}. Timing never makes the script fail; a server that does not
# start or answers the wrong body does.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=$(realpath -m "${OUT:-$repo_root/target/bench/http.json}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-d SECONDS] [-r ROUNDS] [-c CONNECTIONS] [-t THREADS] [-w SECONDS]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

duration=10 rounds=3 connections=32 threads=2 warmup=3
while [ $# -gt 0 ]; do
    case "$1" in
        -d) [ $# -ge 2 ] || usage; duration=$2; shift ;;
        -r) [ $# -ge 2 ] || usage; rounds=$2; shift ;;
        -c) [ $# -ge 2 ] || usage; connections=$2; shift ;;
        -t) [ $# -ge 2 ] || usage; threads=$2; shift ;;
        -w) [ $# -ge 2 ] || usage; warmup=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
for v in duration rounds connections threads; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "-${v:0:1} wants a positive number, not '${!v}'"
done
[[ $warmup =~ ^[0-9]+$ ]] || die "-w wants a number of seconds, not '$warmup'"
[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

uptime_before=$(uptime)

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root" --no-busybox
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold wrk </dev/null >/dev/null
fi

wasmtime_version=48.0.8
wasmtime=${WASMTIME:-$repo_root/target/bench-tools/wasmtime-$wasmtime_version/bin/wasmtime}
if [ ! -x "$wasmtime" ]; then
    [ -z "${WASMTIME:-}" ] || die "WASMTIME=$WASMTIME is not an executable"
    log "installing wasmtime-cli $wasmtime_version into target/bench-tools (a long build)"
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo install --locked wasmtime-cli \
        --version "$wasmtime_version" --root "$repo_root/target/bench-tools/wasmtime-$wasmtime_version" \
        --target-dir "$repo_root/target/bench-tools/wasmtime-build"
fi
wasmtime_says=$("$wasmtime" --version)
[[ "$wasmtime_says " == "wasmtime $wasmtime_version "* ]] ||
    echo "warning: $wasmtime is '$wasmtime_says', not Kiln's Wasmtime $wasmtime_version" >&2

build_native "$repo_root" native-echo native-echo

# --- private containerd and images --------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-http.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"
wasmtime_pid=""
stop_wasmtime() {
    [ -z "$wasmtime_pid" ] || { kill -INT "$wasmtime_pid" 2>/dev/null; wait "$wasmtime_pid" 2>/dev/null; } || true
    wasmtime_pid=""
}
# Then the containerd cleanup, which reads the exit status from $?; set +e first, or a failed
# run's `(exit $rc)` would end the trap before the cleanup.
# shellcheck disable=SC2154 # rc is set inside the trap
trap 'rc=$?; set +e; stop_wasmtime; (exit $rc); _kiln_private_containerd_cleanup' EXIT

python3 scripts/make-busybox-image.py "$workdir/native-echo.tar" \
    --ref docker.io/kiln-test/native-echo:latest --exe "$native_exe" >&2

export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
log "starting a private containerd in $workdir"
# RUST_LOG for containerd (and so the shims) only: `wasmtime serve` would log every request.
sock=$(RUST_LOG=debug scripts/containerd-private.sh start "$workdir")
bench=(python3 "$repo_root/scripts/lib/bench.py")
host_json=$("${bench[@]}" host)
ctr() { command ctr --address "$sock" "$@"; }
ctr images import --all-platforms "$images/http-p2.tar" >/dev/null
ctr images import --all-platforms "$workdir/native-echo.tar" >/dev/null

# --- servers -----------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
labels=(kiln wasmtime native)
declare -A port pid
for l in "${labels[@]}"; do port[$l]=$(free_port); done

log "starting the servers: kiln on ${port[kiln]}, wasmtime on ${port[wasmtime]}, native on ${port[native]}"
ctr run -d --runtime io.containerd.kiln.v1 --net-host --env "KILN_HTTP_ADDR=127.0.0.1:${port[kiln]}" \
    --log-uri "file://$workdir/kiln.log" docker.io/kiln-test/http-p2:latest http-kiln >/dev/null
ctr run -d --runtime io.containerd.runc.v2 --net-host --env "KILN_HTTP_ADDR=127.0.0.1:${port[native]}" \
    --log-uri "file://$workdir/native.log" docker.io/kiln-test/native-echo:latest http-runc >/dev/null
"$wasmtime" serve -S cli --addr "127.0.0.1:${port[wasmtime]}" "$images/http-p2.wasm" \
    >"$workdir/wasmtime.log" 2>&1 &
wasmtime_pid=$!
pid[wasmtime]=$wasmtime_pid
task_pid() { ctr task ls | awk -v id="$1" '$1 == id { print $2 }'; }
pid[kiln]=$(task_pid http-kiln)
pid[native]=$(task_pid http-runc)

url() { echo "http://127.0.0.1:${port[$1]}/bench"; }
expected=$'method=GET\npath=/bench\nx-kiln-test absent'
for l in "${labels[@]}"; do
    body=""
    for _ in $(seq 1 300); do
        body=$(curl -fsS --max-time 2 "$(url "$l")" 2>/dev/null) && break
        body=""
        sleep 0.1
    done
    [ -n "$body" ] || { tail -n 20 "$workdir/$l.log" >&2 || true; die "$l does not answer on $(url "$l")"; }
    [ "$body" = "$expected" ] || die "$l answers '$body', not the echo of the others"
done
log "server processes: kiln $(cat "/proc/${pid[kiln]}/comm") ${pid[kiln]}," \
    "wasmtime ${pid[wasmtime]}, native $(cat "/proc/${pid[native]}/comm") ${pid[native]}"

# --- runs --------------------------------------------------------------------------------------
cat >"$workdir/report.lua" <<'LUA'
-- wrk's summary as one JSON object, to the file named by WRK_JSON.
done = function(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open(os.getenv("WRK_JSON"), "w"))
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.2f,"stdev":%.2f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99_9":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
  f:close()
end
LUA
# CPU time (clock ticks, all threads) of a process: utime + stime, fields 14 and 15 of its stat
# (counted after the ")" that ends the command name).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

runs_json=""
# wrk_run LABEL KIND ROUND SECONDS
wrk_run() {
    local l=$1 kind=$2 r=$3 secs=$4 c0 c1 json="$workdir/wrk-$1-$2-$3.json"
    c0=$(cpu_ticks "${pid[$l]}")
    WRK_JSON=$json wrk -t "$threads" -c "$connections" -d "${secs}s" --latency \
        -s "$workdir/report.lua" "$(url "$l")" >"$workdir/wrk-$l-$kind-$r.txt" 2>&1 ||
        echo "warning: wrk against $l (round $r) failed; see the report" >&2
    c1=$(cpu_ticks "${pid[$l]}")
    [ -s "$json" ] || echo '{}' >"$json"
    runs_json+="${runs_json:+,}{\"label\":\"$l\",\"kind\":\"$kind\",\"round\":$r,\"wrk\":$(cat "$json"),\"cpu_ticks\":$((c1 - c0))}"
}

if [ "$warmup" -gt 0 ]; then
    log "warm-up: ${warmup}s of wrk per server (untimed)"
    for l in "${labels[@]}"; do wrk_run "$l" warmup 0 "$warmup"; done
fi
log "$rounds rounds of ${duration}s per server (wrk -t$threads -c$connections)"
for ((r = 1; r <= rounds; r++)); do
    for l in "${labels[@]}"; do wrk_run "$l" sample "$r" "$duration"; done
    printf '.' >&2
done
echo >&2

# --- stop --------------------------------------------------------------------------------------
log "stopping the servers"
stop_task() {
    ctr task kill "$1" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        [ "$(ctr task ls | awk -v id="$1" '$1 == id { print $3 }')" = STOPPED ] && break
        sleep 0.1
    done
    sleep 0.5 # containerd reads the shim's last log lines before the task is deleted
    ctr task rm -f "$1" >/dev/null 2>&1 || true
    ctr containers rm "$1" >/dev/null 2>&1 || true
}
stop_task http-kiln
stop_task http-runc
stop_wasmtime
phases=$(grep -o 'http-kiln: http phases: [^"\\]*' "$workdir/containerd.log" | tail -n 1 |
    sed 's/^.*http phases: //' || true)
[ -n "$phases" ] || echo "warning: no 'http phases' line from Kiln's worker in containerd's log" >&2

# --- report ------------------------------------------------------------------------------------
# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"
mkdir -p "$(dirname "$out")"
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out"), "host": $host_json, "containerd_log": $(jstr "$workdir/containerd.log"),
 "duration_s": $duration, "rounds": $rounds, "connections": $connections, "threads": $threads,
 "warmup_s": $warmup, "clk_tck": $(getconf CLK_TCK),
 "wasmtime": $(jstr "$wasmtime_says"), "wrk": $(jstr "$(wrk -v 2>&1 | head -n 1)"),
 "kiln_phases": $(jstr "$phases"),
 "uptime_before": $(jstr "$uptime_before"), "uptime_after": $(jstr "$(uptime)"),
 "runs": [$runs_json]}
JSON
"${bench[@]}" http-report "$workdir/meta.json"
