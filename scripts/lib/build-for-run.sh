# Sourced by the scripts that run Kiln against runc (demo, benchmarks): install what is
# missing, build the release shim and CLI, and the test images (busybox too unless told not
# to). Sets `images` to the directory holding the image tarballs.
#
#   . scripts/lib/build-for-run.sh
#   build_for_run "$repo_root" [--no-busybox]

build_for_run() {
    local repo=$1 busybox=1
    [ "${2:-}" != --no-busybox ] || busybox=0
    "$repo/scripts/setup.sh"
    if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    fi
    echo "==> building Kiln (release)" >&2
    (cd "$repo" && cargo build --release -p kiln-shim -p kiln-cli)
    images="$repo/target/test-images"
    "$repo/scripts/build-test-images.sh" >&2
    if [ $busybox = 1 ]; then
        python3 "$repo/scripts/make-busybox-image.py" "$images/busybox.tar" >&2
    fi
}
