#!/usr/bin/env bash
# Image forms benchmark: first start (compile) and warm starts of the same hello module as a
# file in the rootfs and as an OCI Wasm layer, and of a component command, against runc, in one
# interleaved run of scripts/bench-coldstart.sh on containerd 1.7 (1.6 does not import images
# with Wasm layers).
#
#   scripts/bench-forms.sh [-n ROUNDS]      (default 20)
#
# Runtimes measured (labels in the table):
#   kiln-file    hello.wasm as a file in the image's tar layer (the compat form)
#   kiln-layer   the same bytes as runwasi's component layer: the shim reads the layer from
#                containerd's content store; no hashing at start, the cache is keyed by its digest
#   kiln-p2      cli-p2, a wasm32-wasip2 command component (`exit-with-code 0`)
#   runc         busybox `echo hi`
# The "cold" row of each Kiln runtime is its first start after the compile cache is emptied.
# Writes ${OUT:-target/bench/forms.json} and forms.png (see bench-coldstart.sh).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
rounds=20
while [ $# -gt 0 ]; do
    case "$1" in
        -n) [ $# -ge 2 ] || { echo "usage: $0 [-n ROUNDS]" >&2; exit 2; }; rounds=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [-n ROUNDS]" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=lib/build-for-run.sh
. "$repo_root/scripts/lib/build-for-run.sh"
build_for_run "$repo_root"
bin=$(scripts/fetch-containerd.sh trixie target/containerd/trixie)
# The layer form of the very hello.wasm the file form holds, next to the other test images.
target/release/kiln image build --format layer -t kiln-test/hello-layer:latest \
    -o "$images/hello-layer.tar" "$images/hello.wasm" >/dev/null
OUT=${OUT:-$repo_root/target/bench/forms.json} KILN_BENCH_CONTAINERD_BIN=$bin \
    exec scripts/bench-coldstart.sh -n "$rounds" \
    --runtime kiln-file@kiln=hello --runtime kiln-layer@kiln=hello-layer \
    --runtime 'kiln-p2@kiln=cli-p2:/cli-p2.wasm exit-with-code 0' --runtime 'runc=busybox:echo hi'
