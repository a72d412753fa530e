#!/usr/bin/env bash
# Warm starts on the cgroup v2 node, run inside the VM by `scripts/vm-v2.sh --timing N`: the
# hello image N times through kiln-probe (containerd's gRPC API, no ctr) with the release shim,
# after one untimed run whose cache fill is waited for, then the phases Kiln logs at debug level
# for those rounds (medians, ms). The VM emulates its CPUs: the figures compare runs and phases
# of one VM, they are not a real node's. Never fails on a figure; fails when a round fails.
#
#   scripts/vm/timing.sh N
set -euo pipefail
n=${1:?usage: timing.sh N}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

dir=$(mktemp -d /tmp/kiln-timing.XXXXXX)
stop() { scripts/containerd-private.sh stop "$dir" >/dev/null 2>&1 || true; }
trap stop EXIT
export PATH="$repo/target/release:$PATH" KILN_CACHE_DIR="$dir/cache" CONTAINERD_LOG_LEVEL=debug
bindir=()
[ -z "${KILN_E2E_CONTAINERD_BIN:-}" ] || bindir=(--bin-dir "$KILN_E2E_CONTAINERD_BIN")
sock=$(scripts/containerd-private.sh start "$dir" "${bindir[@]}")
ctr=$(cat "$dir/ctr-bin")
"$ctr" -a "$sock" images import --all-platforms target/test-images/hello.tar >/dev/null
ref=docker.io/kiln-test/hello:latest
probe=(kiln-probe --address "$sock" --image "$ref" --runtime io.containerd.kiln.v1)

echo "==> [vm] timing: first start, then waiting for the compile cache"
"${probe[@]}" --rounds 1 --label first >/dev/null
for _ in $(seq 1 300); do
    [ -z "$(find "$dir/cache" -name '*.cwasm' 2>/dev/null)" ] || break
    sleep 1
done
[ -n "$(find "$dir/cache" -name '*.cwasm' 2>/dev/null)" ] || { echo "the compile cache was not filled" >&2; exit 1; }

echo "==> [vm] timing: $n warm starts"
"${probe[@]}" --warmup 1 --rounds "$n" --label timed --json "$dir/probe.json"

# Phases from the debug log, for the timed rounds' containers: probe-timed-PID-N (the warm-up
# round's id ends in -wN instead).
echo "==> [vm] timing: Kiln's own phases of the warm rounds (median ms, n)"
grep -E 'probe-timed-[0-9]+-[0-9]+[^0-9w]' "$dir/containerd.log" | grep -o 'msg="[^"]*"' | awk '
    function ms(d) {   # a Rust Duration Debug: 1.5ms, 812.3µs, 2.1s, 950ns
        if (d ~ /µs$/) return substr(d, 1, length(d) - 2) / 1000
        if (d ~ /ms$/) return substr(d, 1, length(d) - 2) + 0
        if (d ~ /ns$/) return substr(d, 1, length(d) - 2) / 1e6
        if (d ~ /s$/) return substr(d, 1, length(d) - 1) * 1000
        return -1
    }
    function add(k, v) { if (v >= 0) vals[k] = vals[k] " " v }
    /create .*: plan / {
        gsub(/,/, "")
        for (i = 1; i <= NF; i++) {
            if ($i == "plan" || $i == "cgroup" || $i == "spawn" || $i == "ready") add("shim create: " $i " (cumulative)", ms($(i + 1)))
        }
    }
    /joined cgroup in/ { for (i = 1; i <= NF; i++) if ($i == "in") { v = $(i + 1); sub(/,$/, "", v); add("worker: join cgroup", ms(v)) } }
    /loaded \(Hit\) in/ { for (i = 1; i <= NF; i++) if ($i == "in") add("worker: module load (cache hit)", $(i + 1) / 1000) }
    /instantiated in/ { v = $NF; sub(/"$/, "", v); add("worker: Start -> instantiated", ms(v)) }
    /guest finished with/ { v = $NF; sub(/"$/, "", v); add("worker: Start -> guest finished", ms(v)) }
    END {
        for (k in vals) {
            m = split(substr(vals[k], 2), a, " ")
            for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
            printf "  %-42s %9.3f  (n=%d)\n", k, med, m
        }
    }' | sort
if ! grep -q 'create probe-timed-[^ ]*: plan' "$dir/containerd.log"; then
    echo "  (no \`create ID: plan …\` lines: the shim did not log its own debug lines)"
fi
