#!/usr/bin/env bash
# Cold-start benchmark: wall time of `ctr run --rm` per runtime, on a private containerd.
#
#   scripts/bench-coldstart.sh [-n ROUNDS] [--runtime NAME=IMAGE[:ARGS]]...
#
#   -n ROUNDS     timed runs per runtime (default 20)
#   --runtime     a runtime to measure (repeatable; when given, replaces the default set):
#                   NAME   a containerd runtime (io.containerd.kiln.v1), or `kiln` / `runc`
#                          for io.containerd.kiln.v1 / io.containerd.runc.v2; NAME labels the
#                          results; LABEL@NAME measures NAME under the label LABEL (to measure
#                          one runtime with several images)
#                   IMAGE  a test image's short name (hello -> docker.io/kiln-test/hello:latest,
#                          imported from target/test-images/hello.tar) or a full reference
#                          host/path:tag (a tag is required there; images that are not test
#                          images are pulled)
#                   ARGS   the process's arguments, split on spaces; as with `ctr run`, they
#                          replace the image's command, so a Wasm image needs its module
#                          first: 'io.containerd.kiln.v1=printargs:/printargs.wasm a b'
#                 default: --runtime kiln=hello --runtime 'runc=busybox:echo hi'
#
# Builds Kiln (release) and the images, starts a private containerd (as scripts/demo.sh does)
# with its own compile cache, imports the images, runs each runtime once untimed (which fills
# the compile cache), then ROUNDS rounds, each running every runtime once in turn, so that a
# drift of the machine affects all runtimes alike. Each run is timed with `date +%s%N` around
# `ctr run`, so ctr's own start-up is included. Then, for each Kiln runtime, one more run
# right after the compile cache has been emptied (the first start of a module on a node).
#
# Prints min / median / p90 / max per runtime (ms) and the ratio of the medians to runc's;
# writes the raw samples and the summary as JSON to ${OUT:-target/bench/coldstart.json}, and a
# chart of the distributions (a box and the samples per runtime, and the cold-cache run) next
# to it as PNG (coldstart.png); the chart needs gnuplot, which is installed with apt-get
# (gnuplot-nox) when missing; without it the script warns and writes no chart.
# The private containerd is stopped and its directory removed on exit.
#
# KILN_BENCH_CONTAINERD_BIN, when set, is a directory holding another containerd and its ctr
# (scripts/fetch-containerd.sh trixie|sid unpacks 1.7 or 2.x): those are used instead of the
# ones on PATH (scripts/bench-forms.sh needs 1.7 for images with Wasm layers).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=$(realpath -m "${OUT:-$repo_root/target/bench/coldstart.json}")
cd "$repo_root"

usage() {
    echo "usage: $0 [-n ROUNDS] [--runtime NAME=IMAGE[:ARGS]]..." >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

rounds=20
specs=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --rounds) [ $# -ge 2 ] || usage; rounds=$2; shift ;;
        -n?*) rounds=${1#-n} ;;
        --rounds=*) rounds=${1#*=} ;;
        --runtime) [ $# -ge 2 ] || usage; specs+=("$2"); shift ;;
        --runtime=*) specs+=("${1#*=}") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number, not '$rounds'"
[ ${#specs[@]} -gt 0 ] || specs=("kiln=hello" "runc=busybox:echo hi")

# --- runtime specs -----------------------------------------------------------------------------
labels=() runtimes=() refs=() argss=()
for spec in "${specs[@]}"; do
    [[ $spec == ?*=?* ]] || die "--runtime wants [LABEL@]NAME=IMAGE[:ARGS], not '$spec'"
    name=${spec%%=*} rest=${spec#*=}
    # LABEL@RUNTIME: the same runtime more than once, under labels of its own.
    rt_name=${name#*@}
    name=${name%%@*}
    case "$rt_name" in
        kiln) runtime=io.containerd.kiln.v1 ;;
        runc) runtime=io.containerd.runc.v2 ;;
        *) runtime=$rt_name ;;
    esac
    if [[ $rest =~ ^([^\ :/]+(:[0-9]+)?/[^\ :]+:[^\ :/]+)(:(.*))?$ ]]; then
        ref=${BASH_REMATCH[1]} args=${BASH_REMATCH[4]}
    elif [[ $rest =~ ^([A-Za-z0-9][A-Za-z0-9._-]*)(:(.*))?$ ]]; then
        ref="docker.io/kiln-test/${BASH_REMATCH[1]}:latest" args=${BASH_REMATCH[3]}
    else
        die "cannot read the image in '$spec': use a test image's name or host/path:tag"
    fi
    for l in "${labels[@]}"; do [ "$l" != "$name" ] || die "runtime $name given twice"; done
    labels+=("$name") runtimes+=("$runtime") refs+=("$ref") argss+=("$args")
done
count=${#labels[@]}

[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root"
# The chart: gnuplot, installed the way scripts/setup.sh installs packages (only when missing).
if ! command -v gnuplot >/dev/null 2>&1; then
    log "installing gnuplot-nox (for the chart)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            gnuplot-nox </dev/null >/dev/null; } ||
        echo "warning: could not install gnuplot-nox; no chart will be written" >&2
fi

# --- private containerd ------------------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench.XXXXXX)
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"

export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
log "starting a private containerd in $workdir"
ctr_bin=$(command -v ctr)
bin_dir_args=()
if [ -n "${KILN_BENCH_CONTAINERD_BIN:-}" ]; then
    ctr_bin="$KILN_BENCH_CONTAINERD_BIN/ctr"
    bin_dir_args=(--bin-dir "$KILN_BENCH_CONTAINERD_BIN")
fi
ctr() { "$ctr_bin" "$@"; }
sock=$(scripts/containerd-private.sh start "$workdir" ${bin_dir_args[@]+"${bin_dir_args[@]}"})

imported=" "
for ref in "${refs[@]}"; do
    case "$imported" in *" $ref "*) continue ;; esac
    imported+="$ref "
    if [[ $ref =~ ^docker\.io/kiln-test/([^:/]+):latest$ ]] && [ -f "$images/${BASH_REMATCH[1]}.tar" ]; then
        log "importing $ref"
        ctr --address "$sock" images import --all-platforms "$images/${BASH_REMATCH[1]}.tar" >/dev/null
    else
        log "pulling $ref"
        ctr --address "$sock" images pull --all-platforms "$ref" >/dev/null
    fi
done

# --- runs --------------------------------------------------------------------------------------
samples="$workdir/samples.tsv"
: >"$samples"
seq_no=0

# run_one INDEX KIND ROUND: one timed `ctr run`; appends "index kind round ns" to the samples.
run_one() {
    local i=$1 kind=$2 round=$3 id t0 t1 rc=0 output
    local -a args=()
    seq_no=$((seq_no + 1))
    id="bench-$$-$seq_no"
    # shellcheck disable=SC2206 # ARGS are split on spaces, by design
    [ -z "${argss[$i]}" ] || args=(${argss[$i]})
    t0=$(date +%s%N)
    output=$(ctr --address "$sock" run --rm --runtime "${runtimes[$i]}" "${refs[$i]}" "$id" \
        ${args[@]+"${args[@]}"} 2>&1) || rc=$?
    t1=$(date +%s%N)
    if [ $rc != 0 ]; then
        printf '%s\n' "$output" >&2
        die "${labels[$i]} ($kind run $round) failed with exit status $rc"
    fi
    printf '%s\t%s\t%s\t%s\n' "$i" "$kind" "$round" "$((t1 - t0))" >>"$samples"
}

log "warm-up: one untimed run per runtime (fills the compile cache)"
for ((i = 0; i < count; i++)); do run_one "$i" warmup 0; done
# A first start runs baseline code and leaves the optimizing compile to a background fill
# (kiln-cache-fill); until it has stored the artifact, every start is a miss again.
wait_for_fills() {
    local waited=0
    while pgrep -f '^kiln-cache-fill' >/dev/null && [ "$waited" -lt 600 ]; do
        sleep 0.5
        waited=$((waited + 1))
    done
}
wait_for_fills

log "$rounds rounds"
for ((r = 1; r <= rounds; r++)); do
    for ((i = 0; i < count; i++)); do run_one "$i" sample "$r"; done
    printf '.' >&2
done
echo >&2

for ((i = 0; i < count; i++)); do
    [[ ${runtimes[$i]} == *kiln* ]] || continue
    log "${labels[$i]}: first run after emptying the compile cache"
    find "$KILN_CACHE_DIR" -mindepth 1 -delete 2>/dev/null || true
    run_one "$i" cold 1
    wait_for_fills
done

# --- summary -----------------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
meta="$workdir/runtimes.tsv"
for ((i = 0; i < count; i++)); do
    printf '%s\t%s\t%s\t%s\n' "${labels[$i]}" "${runtimes[$i]}" "${refs[$i]}" "${argss[$i]}"
done >"$meta"

commit=$(git rev-parse HEAD 2>/dev/null || true)
dirty=false
[ -z "$commit" ] || git diff --quiet HEAD 2>/dev/null || dirty=true

OUT_FILE="$out" ROUNDS="$rounds" COMMIT="$commit" DIRTY="$dirty" \
    CONTAINERD_VERSION="$("${KILN_BENCH_CONTAINERD_BIN:+$KILN_BENCH_CONTAINERD_BIN/}containerd" --version 2>/dev/null || true)" \
    RUNC_VERSION="$(runc --version 2>/dev/null | head -n 1 || true)" \
    python3 - "$meta" "$samples" <<'PY'
import datetime, json, os, platform, statistics, sys

meta_path, samples_path = sys.argv[1:3]
runtimes = []
for line in open(meta_path):
    label, runtime, image, args = line.rstrip("\n").split("\t")
    runtimes.append({"label": label, "runtime": runtime, "image": image,
                     "args": args.split(), "warmup_ms": None, "samples_ms": [],
                     "cold_cache_ms": None})
for line in open(samples_path):
    i, kind, _round, ns = line.split()
    ms = int(ns) / 1e6
    rt = runtimes[int(i)]
    if kind == "sample":
        rt["samples_ms"].append(round(ms, 3))
    elif kind == "warmup":
        rt["warmup_ms"] = round(ms, 3)
    elif kind == "cold":
        rt["cold_cache_ms"] = round(ms, 3)

def p90(xs):
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[8]

for rt in runtimes:
    xs = rt["samples_ms"]
    rt["summary"] = {
        "n": len(xs),
        "min_ms": round(min(xs), 3),
        "median_ms": round(statistics.median(xs), 3),
        "p90_ms": round(p90(xs), 3),
        "max_ms": round(max(xs), 3),
        "mean_ms": round(statistics.fmean(xs), 3),
    }

by_label = {rt["label"]: rt for rt in runtimes}
base = by_label.get("runc") or next(
    (rt for rt in runtimes if rt["runtime"] == "io.containerd.runc.v2"), None)
ratios = {}
if base is not None:
    for rt in runtimes:
        if rt is not base:
            ratios[f'{rt["label"]}/{base["label"]}'] = round(
                rt["summary"]["median_ms"] / base["summary"]["median_ms"], 3)

w = max(len("runtime"), *(len(rt["label"]) for rt in runtimes))
print()
print(f'cold start: wall time of `ctr run --rm`, ms ({int(os.environ["ROUNDS"])} rounds, interleaved)')
print(f'{"runtime":<{w}}  {"min":>8} {"median":>8} {"p90":>8} {"max":>8}  workload')
for rt in runtimes:
    s = rt["summary"]
    workload = " ".join([rt["image"], *rt["args"]])
    print(f'{rt["label"]:<{w}}  {s["min_ms"]:8.1f} {s["median_ms"]:8.1f} '
          f'{s["p90_ms"]:8.1f} {s["max_ms"]:8.1f}  {workload}')
for name, r in ratios.items():
    print(f"median ratio {name}: {r:.2f}")
for rt in runtimes:
    if rt["cold_cache_ms"] is not None:
        print(f'{rt["label"]}: first run after emptying the compile cache: '
              f'{rt["cold_cache_ms"]:.1f} ms (warm median {rt["summary"]["median_ms"]:.1f} ms)')

report = {
    "benchmark": "coldstart",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": os.environ.get("COMMIT") or None,
    "dirty": os.environ.get("DIRTY") == "true",
    "host": {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "containerd": os.environ.get("CONTAINERD_VERSION") or None,
        "runc": os.environ.get("RUNC_VERSION") or None,
    },
    "method": "wall time of `ctr run --rm --runtime RUNTIME IMAGE ID ARGS` measured with "
              "`date +%s%N` on a private containerd, ctr start-up included; one untimed "
              "warm-up run per runtime, then rounds running each runtime once in turn; "
              "p90 by linear interpolation; cold_cache_ms: one run right after the compile "
              "cache directory was emptied",
    "rounds": int(os.environ["ROUNDS"]),
    "runtimes": runtimes,
    "median_ratios": ratios,
}
out = os.environ["OUT_FILE"]
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
os.replace(tmp, out)
print(f"\nraw samples and summary: {out}")
PY
png="${out%.json}.png"
python3 "$repo_root/scripts/lib/bench.py" coldstart-plot "$out" "$png" ||
    echo "warning: no chart written" >&2
