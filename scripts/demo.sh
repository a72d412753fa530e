#!/usr/bin/env bash
# Kiln in one command, on a fresh Debian 12 machine (as root):
#
#   scripts/demo.sh
#
# 1. installs what is missing (scripts/setup.sh: containerd, runc, Rust's wasm32-wasip1 ...);
# 2. builds Kiln in release mode, the hello Wasm image and a busybox image;
# 3. starts a PRIVATE containerd in ${KILN_DEMO_DIR:-/tmp/kiln-demo} (its own socket, root,
#    state and compile cache: the system's containerd and /var/lib/containerd are not used);
# 4. runs the hello module with Kiln twice (the first run compiles it into the cache, the
#    second maps the cached artifact) and busybox with runc, timing each `ctr run`.
#
# The private containerd is stopped and its directory removed on exit, whatever happens.
# Exits non-zero when a Kiln run does not print "Hello from Kiln!".
# CARGO_BUILD_JOBS limits the build's parallelism.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" = 0 ] || die "run as root: containerd and runc need it"

workdir=$(realpath -m "${KILN_DEMO_DIR:-/tmp/kiln-demo}")
case "$workdir" in
    / | /tmp | /var | /var/tmp | /run | /root | /home | /usr* | /etc* | /var/lib | \
        /var/lib/containerd* | /run/containerd* | "$repo_root" | "$HOME")
        die "refusing to use $workdir as the demo directory (it is removed on exit)" ;;
esac

# --- work directory (checked before the slow build) -------------------------------------------
if [ -e "$workdir" ]; then
    [ -f "$workdir/.kiln-demo" ] || [ -z "$(ls -A "$workdir")" ] ||
        die "$workdir exists and is not a Kiln demo directory; set KILN_DEMO_DIR"
    if [ -f "$workdir/containerd.pid" ] && kill -0 "$(cat "$workdir/containerd.pid")" 2>/dev/null; then
        die "a demo is already running in $workdir (containerd pid $(cat "$workdir/containerd.pid")); set KILN_DEMO_DIR"
    fi
    # Left over by an interrupted demo: clean it up.
    scripts/containerd-private.sh stop "$workdir" >/dev/null 2>&1 || true
    rm -rf "$workdir"
fi
mkdir -p "$(dirname "$workdir")"
mkdir -m 0700 "$workdir"
touch "$workdir/.kiln-demo"
# From here on, whatever happens: stop the private containerd, remove its directory.
# shellcheck source=lib/private-containerd.sh
. "$repo_root/scripts/lib/private-containerd.sh"
stop_private_containerd_on_exit "$repo_root" "$workdir"

# --- build -------------------------------------------------------------------------------------
step "checking prerequisites (scripts/setup.sh)"
scripts/setup.sh
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

step "building Kiln (release)"
cargo build --release -p kiln-shim -p kiln-cli

step "building the test images"
scripts/build-test-images.sh
images="$repo_root/target/test-images"
python3 scripts/make-busybox-image.py "$images/busybox.tar"

# --- private containerd ------------------------------------------------------------------------
export PATH="$repo_root/target/release:$PATH"
export KILN_CACHE_DIR="$workdir/cache"
step "starting a private containerd in $workdir"
sock=$(scripts/containerd-private.sh start "$workdir")
echo "socket: $sock (the system containerd is not used)"

ctr_() { ctr --address "$sock" "$@"; }

step "importing the images"
for name in hello busybox; do
    ctr_ images import --all-platforms "$images/$name.tar"
done

# --- runs --------------------------------------------------------------------------------------
# Prints a command in a shell-readable form.
show() {
    local out="$" a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@+-]+$ ]]; then out+=" $a"; else out+=" '$a'"; fi
    done
    printf '%s\n' "$out"
}

# run_timed VAR CMD...: runs CMD, prints it, its output and its wall time; the time in ms
# goes to VAR, the output to VAR_out.
run_timed() {
    local var=$1; shift
    local t0 t1 ns out rc=0
    echo
    show "$@"
    t0=$(date +%s%N)
    out=$("$@" 2>&1) || rc=$?
    t1=$(date +%s%N)
    ns=$((t1 - t0))
    [ -z "$out" ] || printf '%s\n' "$out"
    printf -v "$var" '%d.%d' $((ns / 1000000)) $((ns / 100000 % 10))
    printf -v "${var}_out" '%s' "$out"
    printf '  (%s ms' "${!var}"
    [ $rc = 0 ] && echo ")" || echo ", exit status $rc)"
    return $rc
}

kiln=(ctr --address "$sock" run --rm --runtime io.containerd.kiln.v1 docker.io/kiln-test/hello:latest)
runc=(ctr --address "$sock" run --rm --runtime io.containerd.runc.v2 docker.io/kiln-test/busybox:latest)

# shellcheck disable=SC2034 # set by run_timed, read through ${!var}
t_first="" t_first_out="" t_cached="" t_cached_out="" t_runc="" t_runc_out=""
step "Kiln, first run: compiles the module into the compile cache"
run_timed t_first "${kiln[@]}" "kiln-demo-$$-1" || true
step "Kiln, second run: maps the cached artifact"
run_timed t_cached "${kiln[@]}" "kiln-demo-$$-2" || true
step "runc, for comparison: busybox echo"
run_timed t_runc "${runc[@]}" "runc-demo-$$" echo 'Hello from runc!' || true

fail=0
for v in t_first t_cached; do
    out_var="${v}_out"
    if ! grep -qF 'Hello from Kiln!' <<<"${!out_var}"; then
        echo "error: a Kiln run did not print 'Hello from Kiln!'" >&2
        fail=1
    fi
done
grep -qF 'Hello from runc!' <<<"$t_runc_out" || echo "warning: the runc run did not print 'Hello from runc!'" >&2

step "summary (wall time of each \`ctr run --rm\`, ctr's own start-up included)"
printf '  %-44s %8s ms\n' \
    "Kiln, first run (compile + cache)" "$t_first" \
    "Kiln, second run (cached)" "$t_cached" \
    "runc (busybox echo)" "$t_runc"
[ $fail = 0 ] || exit 1
