#!/usr/bin/env bash
# Runs each of Kiln's fuzz targets (fuzz/, cargo-fuzz) for SECONDS_PER_TARGET seconds.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 600)
#   FUZZ_TARGETS="plan resolve"  runs only those targets (default: all of them)
#
# One target at a time, one libFuzzer job, at nice 19: the machine's two cores are shared.
# Installs cargo-fuzz (pinned below) when it is missing. The targets need nightly features
# (sanitizers, sancov); RUSTC_BOOTSTRAP=1 lets the stable toolchain build them.
#
# The committed seeds (fuzz/corpus/<target>, written by fuzz/seeds) are read, never written:
# inputs the fuzzer finds go to target/fuzz-corpus/<target>, which later runs start from.
# Crashes go to target/fuzz-artifacts/<target>/ (reproduce one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz -a TARGET FILE`,
# minimise with `cargo fuzz tmin ...`); full logs to target/fuzz-logs/<target>.log.
#
# Prints, per target: executions, executions per second, final coverage (cov: edges,
# ft: features), the inputs added to the corpus, and the crashes this run found. Exits 1 when
# any target crashed (or leaked, timed out, ran out of memory).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
seconds="${1:-600}"
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2; }
read -r -a targets <<<"${FUZZ_TARGETS:-plan resolve image_layout manifest}"

export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
target_dir="$repo_root/target/fuzz"
fuzz_args=(--fuzz-dir fuzz --target-dir "$target_dir" --debug-assertions)

log() { printf '==> %s\n' "$*" >&2; }

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    nice -n 19 cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

log "building the fuzz targets"
nice -n 19 cargo fuzz build "${fuzz_args[@]}"

# Per target: dictionary and the largest input libFuzzer makes (image tarballs are several
# KiB; the default, the largest seed, would keep every input at a seed's size).
dict_of() { case "$1" in image_layout | manifest) echo image ;; *) echo "$1" ;; esac; }
max_len_of() { case "$1" in image_layout | manifest) echo 65536 ;; plan) echo 16384 ;; *) echo 4096 ;; esac; }

mkdir -p target/fuzz-logs
results=()
failed=0
for t in "${targets[@]}"; do
    corpus="target/fuzz-corpus/$t"
    artifacts="target/fuzz-artifacts/$t"
    tmp="target/fuzz-tmp/$t"
    logfile="target/fuzz-logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$tmp"
    marker="$(mktemp)"
    before=$(find "$corpus" -type f | wc -l)
    log "fuzzing $t for ${seconds}s (log: $logfile)"
    rc=0
    # TMPDIR: where the path targets make their file tree; removed below.
    TMPDIR="$repo_root/$tmp" nice -n 19 cargo fuzz run "${fuzz_args[@]}" "$t" \
        "$corpus" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len="$(max_len_of "$t")" -dict="fuzz/dict/$(dict_of "$t").dict" \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$logfile" 2>&1 || rc=$?
    rm -rf "$tmp"

    final_stat() { sed -n "s/^stat::$1: *//p" "$logfile" | tail -n 1; }
    runs="$(final_stat number_of_executed_units)"
    rate="$(final_stat average_exec_per_sec)"
    cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$logfile" | tail -n 1 || true)"
    after=$(find "$corpus" -type f | wc -l)
    mapfile -t crashes < <(find "$artifacts" -type f -newer "$marker" | sort)
    rm -f "$marker"
    if [[ $rc -ne 0 || ${#crashes[@]} -gt 0 ]]; then
        failed=1
    fi
    results+=("$(printf '%-13s %12s %9s  %-22s %6s  %s' "$t" "${runs:-?}" "${rate:-?}" \
        "${cov:-?}" "+$((after - before))" "${#crashes[@]} (exit $rc)")")
    for c in "${crashes[@]}"; do
        results+=("    crash: $c")
    done
done

printf '\n%-13s %12s %9s  %-22s %6s  %s\n' target runs exec/s coverage corpus crashes
printf '%s\n' "${results[@]}"
exit "$failed"
