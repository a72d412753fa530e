#!/usr/bin/env bash
# Builds the WASI test workloads in test-images/ and packs each one into an
# OCI image tarball with the `kiln` CLI.
#
# Usage: scripts/build-test-images.sh [OUTDIR]
#   OUTDIR defaults to target/test-images (relative to the repository root;
#   a relative OUTDIR given on the command line is relative to the cwd).
#
# Produces, for each workload NAME:
#   OUTDIR/NAME.wasm   the module
#   OUTDIR/NAME.tar    image kiln-test/NAME:latest (platform wasi/wasm)
#
# Idempotent: re-running rebuilds incrementally and overwrites the outputs
# (image builds are reproducible, so unchanged modules give identical tars).
# Set CARGO_BUILD_JOBS to limit build parallelism (default: 1).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo_root/target/test-images}"
jobs="${CARGO_BUILD_JOBS:-1}"
target=wasm32-wasip1
workloads=(hello printargs fileio exitcode trap sleep memgrow big)

log() { printf '==> %s\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "error: cargo not found in PATH" >&2; exit 1; }

if command -v rustup >/dev/null; then
    if ! rustup target list --installed | grep -qx "$target"; then
        log "installing Rust target $target"
        rustup target add "$target"
    fi
else
    echo "warning: rustup not found; assuming the $target target is installed" >&2
fi

log "building test workloads ($target, release)"
(cd "$repo_root/test-images" && cargo build --release --target "$target" -j "$jobs")

log "building the kiln CLI (release)"
(cd "$repo_root" && cargo build --release -p kiln-cli -j "$jobs")

kiln="$repo_root/target/release/kiln"
[[ -x "$kiln" ]] || { echo "error: $kiln was not built" >&2; exit 1; }

mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
wasm_dir="$repo_root/test-images/target/$target/release"

for name in "${workloads[@]}"; do
    wasm="$wasm_dir/$name.wasm"
    [[ -f "$wasm" ]] || { echo "error: $wasm missing after build" >&2; exit 1; }
    cp -f "$wasm" "$outdir/$name.wasm"
    "$kiln" image build "$outdir/$name.wasm" \
        --tag "kiln-test/$name:latest" \
        --path "/$name.wasm" \
        --output "$outdir/$name.tar"
done

log "images written to $outdir"
