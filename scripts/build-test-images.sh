#!/usr/bin/env bash
# Builds the WASI test workloads in test-images/ and packs each one into an
# OCI image tarball with the `kiln` CLI.
#
# Usage: scripts/build-test-images.sh [OUTDIR]
#   OUTDIR defaults to target/test-images (relative to the repository root;
#   a relative OUTDIR given on the command line is relative to the cwd).
#
# Produces, for each workload NAME:
#   OUTDIR/NAME.wasm   the module or component
#   OUTDIR/NAME.tar    image kiln-test/NAME:latest (platform wasi/wasm)
#
# Three kinds of workload:
#   test-images/        wasm32-wasip1 core modules (Rust)
#   test-images/wat/    wasm32-wasip1 core modules written in WAT, turned into
#                       .wasm by test-images/wat2wasm (built for the host)
#   test-images/p2/     wasm32-wasip2 components (Rust): command components
#                       (bins) and the wasi:http/proxy component http-p2 (the
#                       package's cdylib, which cargo names http_p2.wasm)
#
# Idempotent: re-running rebuilds incrementally and overwrites the outputs
# (image builds are reproducible, so unchanged modules give identical tars).
# Set CARGO_BUILD_JOBS to limit build parallelism (default: 1).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo_root/target/test-images}"
jobs="${CARGO_BUILD_JOBS:-1}"
p1_target=wasm32-wasip1
p2_target=wasm32-wasip2
p1_workloads=(hello printargs fileio exitcode trap sleep memgrow big spin)
wat_workloads=(tablegrow)
p2_bin_workloads=(cli-p2 net-p2)
p2_lib_workloads=(http-p2)

log() { printf '==> %s\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "error: cargo not found in PATH" >&2; exit 1; }

if command -v rustup >/dev/null; then
    installed="$(rustup target list --installed)"
    for target in "$p1_target" "$p2_target"; do
        if ! grep -qx "$target" <<<"$installed"; then
            log "installing Rust target $target"
            rustup target add "$target"
        fi
    done
else
    echo "warning: rustup not found; assuming the $p1_target and $p2_target targets are installed" >&2
fi

# Each workspace's own target dir, given explicitly so that a CARGO_TARGET_DIR
# in the environment does not move the outputs away from where they are read.
p1_target_dir="$repo_root/test-images/target"
p2_target_dir="$repo_root/test-images/p2/target"
wat2wasm_target_dir="$repo_root/test-images/wat2wasm/target"

log "building test workloads ($p1_target, release)"
(cd "$repo_root/test-images" &&
    cargo build --release --target "$p1_target" --target-dir "$p1_target_dir" -j "$jobs")

log "building test components ($p2_target, release)"
(cd "$repo_root/test-images/p2" &&
    cargo build --release --target "$p2_target" --target-dir "$p2_target_dir" -j "$jobs")

log "building wat2wasm (host, release)"
(cd "$repo_root/test-images/wat2wasm" &&
    cargo build --release --target-dir "$wat2wasm_target_dir" -j "$jobs")

log "building the kiln CLI (release)"
(cd "$repo_root" && cargo build --release -p kiln-cli -j "$jobs")

kiln="$repo_root/target/release/kiln"
[[ -x "$kiln" ]] || { echo "error: $kiln was not built" >&2; exit 1; }

mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
p1_dir="$p1_target_dir/$p1_target/release"
p2_dir="$p2_target_dir/$p2_target/release"
wat2wasm="$wat2wasm_target_dir/release/wat2wasm"
wat_dir="$p1_target_dir/wat"
mkdir -p "$wat_dir"

# Copies the built module or component $2 to OUTDIR/$1.wasm and packs it.
pack() {
    local name="$1" wasm="$2"
    [[ -f "$wasm" ]] || { echo "error: $wasm missing after build" >&2; exit 1; }
    cp -f "$wasm" "$outdir/$name.wasm"
    "$kiln" image build "$outdir/$name.wasm" \
        --tag "kiln-test/$name:latest" \
        --path "/$name.wasm" \
        --output "$outdir/$name.tar"
}

for name in "${p1_workloads[@]}"; do
    pack "$name" "$p1_dir/$name.wasm"
done
for name in "${wat_workloads[@]}"; do
    "$wat2wasm" "$repo_root/test-images/wat/$name.wat" "$wat_dir/$name.wasm"
    pack "$name" "$wat_dir/$name.wasm"
done
for name in "${p2_bin_workloads[@]}"; do
    pack "$name" "$p2_dir/$name.wasm"
done
for name in "${p2_lib_workloads[@]}"; do
    pack "$name" "$p2_dir/${name//-/_}.wasm"
done

log "images written to $outdir"
