#!/usr/bin/env bash
# Precise cold-start probe: the phases of one task's life, timed through containerd's gRPC API
# by target/release/kiln-probe (no `ctr` in the measured path), for Kiln and runc on a private
# containerd.
#
#   scripts/bench-probe.sh [-n ROUNDS]
#
#   -n ROUNDS     timed rounds per runtime (default 20)
#
# Builds Kiln and kiln-probe (release) and the images, starts a private containerd (as
# scripts/demo.sh does) with its own compile cache, imports the hello (Kiln) and busybox (runc)
# images, and runs the probe once per runtime untimed (which fills the compile cache). Then
# ROUNDS rounds; each round runs the probe once for Kiln (hello) and once for runc (busybox
# `echo hi`), alternating which goes first, so that a drift of the machine affects both alike.
# Each probe run is one fresh process, doing one task: snapshot prepare, container create,
# snapshot mounts, task create, start, start -> /tasks/exit event, then task delete, container
# delete and snapshot remove (docs/benchmarks.md says what each covers).
#
# Prints min / median / p90 / max per phase and runtime (ms), the medians side by side, and
# the ratio of the medians of the totals (kiln/runc); then the warnings and errors of the
# containerd log. Writes every round's figures and the summary as JSON to
# ${OUT_DIR:-target/bench}/probe.json, and the containerd log next to it. Timing never makes
# the script fail; a failed round is counted, and shown. KILN_SHIM_GROUPING, when set, is
# passed to containerd (and so to the shim) and recorded. The private containerd and its
# directory are removed on exit.
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

grouping=""
if [ -n "${KILN_SHIM_GROUPING+x}" ]; then
    grouping=$KILN_SHIM_GROUPING
    export KILN_SHIM_GROUPING # containerd inherits it, and passes it to the shims it starts
fi

# --- build -------------------------------------------------------------------------------------
# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root"
log "building kiln-probe (release)"
cargo build --release -p kiln-e2e --bin kiln-probe
probe="$repo_root/target/release/kiln-probe"

# --- private containerd ------------------------------------------------------------------------
workdir=$(mktemp -d /tmp/kiln-bench-probe.XXXXXX)
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
# The spec template, once: each probe run would otherwise start `ctr oci spec` itself.
ctr --address "$sock" oci spec >"$workdir/spec.json"

# shellcheck source=lib/json.sh
. "$repo_root/scripts/lib/json.sh"

# --- runs --------------------------------------------------------------------------------------
# label runtime image args (args split on spaces)
specs=(
    "kiln|io.containerd.kiln.v1|docker.io/kiln-test/hello:latest|"
    "runc|io.containerd.runc.v2|docker.io/kiln-test/busybox:latest|echo hi"
)
mkdir -p "$workdir/runs"
: >"$workdir/runs.tsv"

# probe_once INDEX KIND ROUND: one kiln-probe process doing one round; records
# "label kind round rc json" in runs.tsv, and returns the probe's exit status.
probe_once() {
    local label runtime ref args rc=0 json
    IFS='|' read -r label runtime ref args <<<"${specs[$1]}"
    json="$workdir/runs/$label-$2-$3.json"
    # shellcheck disable=SC2086 # ARGS are split on spaces, by design
    timeout 300 "$probe" --address "$sock" --image "$ref" --runtime "$runtime" --label "$label" \
        --spec "$workdir/spec.json" --rounds 1 --json "$json" ${args:+-- $args} \
        >>"$workdir/probe.out" 2>>"$workdir/probe.err" || rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$2" "$3" "$rc" "$json" >>"$workdir/runs.tsv"
    return "$rc"
}

log "warm-up: one untimed probe run per runtime (fills the compile cache)"
for i in "${!specs[@]}"; do
    if ! probe_once "$i" warmup 0; then
        cat "$workdir/probe.err" >&2
        die "${specs[$i]%%|*}: the warm-up run failed"
    fi
done

log "$rounds rounds"
for ((r = 1; r <= rounds; r++)); do
    order=(0 1)
    [ $((r % 2)) = 1 ] || order=(1 0)
    for i in "${order[@]}"; do probe_once "$i" sample "$r" || true; done
    printf '.' >&2
done
echo >&2

# --- report ------------------------------------------------------------------------------------
mkdir -p "$out_dir"
labels=() runtimes=() refs=() argss=()
for spec in "${specs[@]}"; do
    IFS='|' read -r label runtime ref args <<<"$spec"
    labels+=("$label") runtimes+=("$runtime") refs+=("$ref") argss+=("$args")
done
cat >"$workdir/meta.json" <<JSON
{"out": $(jstr "$out_dir/probe.json"), "host": $host_json,
 "shim_grouping": $(if [ -n "${KILN_SHIM_GROUPING+x}" ]; then jstr "$grouping"; else echo null; fi),
 "rounds": $rounds, "containerd_log": $(jstr "$workdir/containerd.log"),
 "runs": $(jstr "$workdir/runs.tsv"), "probe_stderr": $(jstr "$workdir/probe.err"),
 "labels": $(jarr "${labels[@]}"), "runtimes": $(jarr "${runtimes[@]}"),
 "images": $(jarr "${refs[@]}"), "args": $(jarr "${argss[@]}")}
JSON
python3 - "$workdir/meta.json" "$repo_root/scripts/lib" <<'PY'
import json, os, sys

meta_path, lib = sys.argv[1:3]
sys.path.insert(0, lib)
import bench  # noqa: E402  (scripts/lib/bench.py: summaries, host facts, the log scan)

meta = bench.load_json(meta_path)
PHASES = None
runtimes = []
for label, runtime, image, args in zip(meta["labels"], meta["runtimes"], meta["images"],
                                       meta["args"]):
    runtimes.append({"label": label, "runtime": runtime, "image": image,
                     "args": args.split(), "warmup": [], "rounds": [],
                     "failed_rounds": [], "probe_failures": []})
by_label = {rt["label"]: rt for rt in runtimes}

for line in bench.read(meta["runs"]).splitlines():
    label, kind, rnd, rc, path = line.split("\t")
    rt = by_label[label]
    doc = bench.load_json(path) if os.path.exists(path) else None
    if doc is None:
        # The probe could not even start its round (exit status 1, or killed).
        rt["probe_failures"].append({"round": int(rnd), "exit_status": int(rc)})
        continue
    PHASES = PHASES or doc["phases"]
    rt.setdefault("manifest", doc.get("manifest"))
    rt.setdefault("platform", doc.get("platform"))
    rt["args"] = doc.get("args", rt["args"])
    for r in doc["rounds"]:
        r = dict(r, round=int(rnd))
        if kind == "warmup":
            rt["warmup"].append(r)
        elif r["ok"]:
            rt["rounds"].append(r)
        else:
            rt["failed_rounds"].append(r)

PHASES = PHASES or []
for rt in runtimes:
    rt["summary"] = {p["key"]: bench.summary_ms([r["phases_ms"][p["key"]] for r in rt["rounds"]
                                                 if p["key"] in r["phases_ms"]])
                     for p in PHASES}
    statuses = {}
    for r in rt["rounds"]:
        statuses[str(r["exit_status"])] = statuses.get(str(r["exit_status"]), 0) + 1
    rt["exit_statuses"] = statuses
    rt["failures"] = len(rt["failed_rounds"]) + len(rt["probe_failures"])

def med(rt, key):
    return rt["summary"].get(key, {}).get("median_ms")

kiln, runc = by_label.get("kiln"), by_label.get("runc")
ratios = {}
if kiln and runc:
    for p in PHASES:
        a, b = med(kiln, p["key"]), med(runc, p["key"])
        if a is not None and b:
            ratios[p["key"]] = round(a / b, 3)

w = max([len(p["title"]) for p in PHASES] + [5])
grouping = meta.get("shim_grouping")
print(f'\nprecise probe: one task per kiln-probe run, phases timed over containerd\'s gRPC API, '
      f'ms ({meta["rounds"]} rounds, alternating; shim grouping: {bench.grouping_label(grouping)})')
for rt in runtimes:
    print(f'\n{rt["label"]}: {rt["runtime"]}, {rt["image"]} {" ".join(rt["args"])}'
          f' -- {len(rt["rounds"])} rounds completed, {rt["failures"]} failed; exit statuses '
          + (", ".join(f"{k} x{v}" for k, v in sorted(rt["exit_statuses"].items())) or "none"))
    print(f'{"phase":<{w}} {"n":>4} {"min":>8} {"median":>8} {"p90":>8} {"max":>8}')
    for p in PHASES:
        s = rt["summary"][p["key"]]
        if s["n"]:
            print(f'{p["title"]:<{w}} {s["n"]:>4} {s["min_ms"]:8.2f} {s["median_ms"]:8.2f} '
                  f'{s["p90_ms"]:8.2f} {s["max_ms"]:8.2f}')
        else:
            print(f'{p["title"]:<{w}} {0:>4}')
if kiln and runc:
    print('\nmedians side by side, ms')
    print(f'{"phase":<{w}} {"kiln":>8} {"runc":>8} {"kiln/runc":>10}')
    for p in PHASES:
        a, b = med(kiln, p["key"]), med(runc, p["key"])
        r = ratios.get(p["key"])
        fmt = lambda x: f"{x:8.2f}" if x is not None else f'{"-":>8}'
        print(f'{p["title"]:<{w}} {fmt(a)} {fmt(b)} {(f"{r:.2f}" if r is not None else "-"):>10}')
    if "total" in ratios:
        print(f'\nmedian ratio of the totals kiln/runc: {ratios["total"]:.2f}')
for rt in runtimes:
    for r in rt["failed_rounds"][:5]:
        print(f'{rt["label"]} round {r["round"]} failed: {r["error"]}')
    for f in rt["probe_failures"][:5]:
        print(f'{rt["label"]} round {f["round"]}: kiln-probe exited with {f["exit_status"]} '
              f'and wrote no report (see its stderr below)')
if any(rt["probe_failures"] for rt in runtimes):
    try:
        print("kiln-probe stderr (last lines):\n" +
              "\n".join(bench.read(meta["probe_stderr"]).splitlines()[-10:]))
    except OSError:
        pass

scan = bench.log_scan(meta["containerd_log"])
report = {
    "benchmark": "probe",
    "host": bench.end_of_run(meta["host"]),
    "shim_grouping": grouping,
    "method": "each round runs target/release/kiln-probe once per runtime (a fresh process, "
              "one task, --rounds 1), alternating which runtime goes first; the probe times "
              "containerd gRPC calls with a monotonic clock: Snapshots.Prepare, "
              "Containers.Create, Snapshots.Mounts, Tasks.Create (empty stdio), Tasks.Start, "
              "start to the arrival of the task's /tasks/exit event, total from Prepare to "
              "that event, cleanup = Tasks.Delete + Containers.Delete + Snapshots.Remove; one "
              "untimed probe run per runtime first; p90 by linear interpolation",
    "rounds": meta["rounds"],
    "phases": PHASES,
    "runtimes": runtimes,
    "median_ratios": {f"kiln/runc {k}": v for k, v in ratios.items()},
    "median_ratio_total": ratios.get("total"),
    "containerd_log": scan,
}
print()
bench.finish_report(meta, report, scan)
PY
