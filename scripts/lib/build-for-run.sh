# Sourced by the scripts that run Kiln against runc (demo, benchmarks): install what is
# missing, build the release shim and CLI, and the test images (busybox too unless told not
# to). Sets `images` to the directory holding the image tarballs. `build_native` builds one of
# bench/'s native programs (each its own workspace) as a static host binary for a runc image,
# and sets `native_exe` to it.
#
#   . scripts/lib/build-for-run.sh
#   build_for_run "$repo_root" [--no-busybox]
#   build_native "$repo_root" CRATE BIN      # bench/CRATE, its binary BIN

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

build_native() {
    local repo=$1 crate=$2 bin=$3 triple dir
    echo "==> building bench/$crate (release, static)" >&2
    triple=$(rustc -vV | sed -n 's/^host: //p')
    dir="$repo/target/bench-tools/$crate"
    # From its directory: its .cargo/config.toml (static linking) is found from the working
    # directory; an explicit --target keeps build scripts and proc macros dynamic.
    (cd "$repo/bench/$crate" && cargo build --release --locked --target "$triple" \
        --target-dir "$dir" -j "${CARGO_BUILD_JOBS:-1}")
    native_exe="$dir/$triple/release/$bin"
}
