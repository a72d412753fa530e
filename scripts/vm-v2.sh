#!/usr/bin/env bash
# A cgroup v2 node for the tests: this machine mounts the v1 controllers, so Kiln's v2 paths
# (memory.max, cpu.max, pids.max, v2 statistics, clone3 into the cgroup) run in a small VM.
#
#   scripts/vm-v2.sh [OPTIONS]              build Kiln and the e2e tests, run the v2 suite in the VM
#   scripts/vm-v2.sh [OPTIONS] -- CMD...    run CMD in the VM instead, in the repository
#
# The VM: bookworm's qemu 7.2 (microvm machine, TCG emulation: nested KVM does not work on these
# machines), Debian's cloud kernel, cgroup2 alone at /sys/fs/cgroup with every controller enabled
# in the root's cgroup.subtree_control, tmpfs /tmp and /run. Its root disk carries this host's
# containerd (bookworm's 1.6.20), ctr, runc and basic tools; a second disk carries Kiln's freshly
# built (debug) binaries, the e2e test binaries, scripts/ and target/test-images, mounted at this
# repository's path so that the paths compiled into the tests hold. Both disks are copy-on-write
# (qemu's snapshot=on): nothing the VM writes survives it. scripts/vm/prepare.sh builds and caches
# the parts that rarely change under target/vm; the payload disk is rebuilt on every run.
#
# The default run: `cargo build --workspace`, `cargo test --no-run` of the e2e binaries, then in
# the VM cgroup_v2 (with --ignored: its tests are ignored elsewhere), run and lifecycle.
#
# Options:
#   --containerd SUITE|DIR  trixie (1.7) or sid (2.x), unpacked by scripts/fetch-containerd.sh,
#                           or a directory holding containerd and ctr (default: this host's)
#   --tests LIST            e2e test binaries of the default run, comma-separated
#                           (default cgroup_v2,run,lifecycle; cgroup_v2 runs with --ignored)
#   --test-args ARGS        more arguments for each test binary (split on spaces), e.g. a
#                           test name filter: --tests cgroup_v2 --test-args the_worker
#   --timing N              after the tests, N warm starts of the hello image through kiln-probe
#                           with the release shim (builds it), and the shim's own phase timings
#   --include PATH          also put PATH (a file or directory inside the repository) on the
#                           payload disk; repeatable
#   --no-build              use what is built already
#   --log FILE              the VM's serial output (default target/vm/serial.log); it is also
#                           streamed to stdout
#   --timeout SECS          deadline for the whole VM run (default 1800: emulation is slow)
#   --mem MIB, --cpus N     the VM's memory (default 2048) and CPUs (default 2)
#
# KILN_E2E_SLOW (default 4 here) multiplies the e2e harness's deadlines inside the VM.
#
# Exit status: the inner command's (the v2 suite: 0 when every test binary passed), or
#   90  the VM could not be built (a missing host tool, apt, the build, the disks)
#   91  the VM did not boot: it stopped or hung before its node was set up
#   92  the VM stopped without reporting the command's status (a crash, or the --timeout)
# Must run as root.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

readonly EXIT_PREPARE=90 EXIT_BOOT=91 EXIT_LOST=92
log() { printf '==> [vm] %s\n' "$*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
cannot_build() {
    printf 'error: [vm] the cgroup v2 VM cannot be built: %s\n' "$*" >&2
    exit $EXIT_PREPARE
}

containerd_sel="" tests="cgroup_v2,run,lifecycle" test_args="" timing=0 build=1 timeout=1800 mem=2048 cpus=2
serial_log="$repo_root/target/vm/serial.log"
includes=() cmd=()
while [ $# -gt 0 ]; do
    case "$1" in
        --containerd) [ $# -ge 2 ] || usage; containerd_sel=$2; shift ;;
        --tests) [ $# -ge 2 ] || usage; tests=$2; shift ;;
        --test-args) [ $# -ge 2 ] || usage; test_args=$2; shift ;;
        --timing) [ $# -ge 2 ] || usage; timing=$2; shift ;;
        --include) [ $# -ge 2 ] || usage; includes+=("$2"); shift ;;
        --no-build) build=0 ;;
        --log) [ $# -ge 2 ] || usage; serial_log=$(realpath -m "$2"); shift ;;
        --timeout) [ $# -ge 2 ] || usage; timeout=$2; shift ;;
        --mem) [ $# -ge 2 ] || usage; mem=$2; shift ;;
        --cpus) [ $# -ge 2 ] || usage; cpus=$2; shift ;;
        -h | --help) usage ;;
        --) shift; cmd=("$@"); break ;;
        *) usage ;;
    esac
    shift
done
for n in "$timing" "$timeout" "$mem" "$cpus"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "error: not a number: $n" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || cannot_build "run as root (containerd in the VM, dpkg -x and mke2fs -d here)"
for t in cargo objcopy python3 mke2fs; do
    command -v "$t" >/dev/null || cannot_build "$t is not installed (scripts/setup.sh)"
done
export CARGO_TERM_COLOR=never

vmdir=$repo_root/target/vm
mkdir -p "$vmdir"
# One VM at a time per checkout: they would share the payload disk and the serial log.
exec 9>"$vmdir/lock"
if ! flock -n 9; then
    log "another scripts/vm-v2.sh is running in this checkout; waiting for it"
    flock 9
fi

# --- what the VM runs ---------------------------------------------------------------------------
IFS=, read -r -a test_names <<<"$tests"
test_exes=()   # "name path" of each e2e binary, default run only
if [ ${#cmd[@]} = 0 ]; then
    if [ $build = 1 ]; then
        log "building Kiln and the e2e binaries (${test_names[*]})"
        # --workspace: the feature set of scripts/test.sh's build, so nothing is rebuilt there.
        cargo build --workspace || cannot_build "cargo build failed"
    fi
    targs=()
    for t in "${test_names[@]}"; do targs+=(--test "$t"); done
    json=$(cargo test --workspace --no-run --message-format=json "${targs[@]}") ||
        cannot_build "cargo test --no-run failed (run it to see why)"
    mapfile -t test_exes < <(python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' <<<"$json")
    [ ${#test_exes[@]} = ${#test_names[@]} ] || cannot_build "expected e2e binaries for ${test_names[*]}, cargo built: ${test_exes[*]:-none}"
    if [ "$timing" -gt 0 ] && [ $build = 1 ]; then
        log "building the release shim and kiln-probe (for --timing)"
        # Two commands: --bin would apply to both packages.
        { cargo build --release -p kiln-shim && cargo build --release -p kiln-e2e --bin kiln-probe; } ||
            cannot_build "release build failed"
    fi
fi
for f in target/debug/containerd-shim-kiln-v1 target/debug/kiln; do
    [ -x "$f" ] || cannot_build "$f is not built (cargo build --workspace)"
done
images=$repo_root/target/test-images
if ! ls "$images"/hello.tar "$images"/memgrow.tar "$images"/sleep.tar >/dev/null 2>&1; then
    log "building the test images"
    scripts/build-test-images.sh >&2 || cannot_build "scripts/build-test-images.sh failed"
fi

containerd_bin=""
case "$containerd_sel" in
    "" | bookworm) ;;
    trixie | sid)
        containerd_bin=$(scripts/fetch-containerd.sh "$containerd_sel" "target/containerd/$containerd_sel") ||
            cannot_build "scripts/fetch-containerd.sh $containerd_sel failed" ;;
    *)
        if [ ! -x "$containerd_sel/containerd" ] || [ ! -x "$containerd_sel/ctr" ]; then
            cannot_build "$containerd_sel holds no containerd and ctr"
        fi
        containerd_bin=$(realpath "$containerd_sel") ;;
esac

# --- the payload disk ---------------------------------------------------------------------------
stage=$vmdir/payload.d
rm -rf "$stage"
mkdir -p "$stage/.kiln-vm" "$stage/target/debug/deps"
# Debug info is most of a debug binary's size and nothing in the VM reads it.
put_elf() { # SRC DEST-relative-to-the-repo
    mkdir -p "$stage/$(dirname "$2")"
    objcopy --strip-debug "$1" "$stage/$2" || cannot_build "objcopy --strip-debug $1"
}
cp -a scripts "$stage/scripts"
mkdir -p "$stage/target"
cp -a "$images" "$stage/target/test-images"
payload_elves=()
for b in containerd-shim-kiln-v1 kiln; do
    put_elf "target/debug/$b" "target/debug/$b"
    payload_elves+=("$repo_root/target/debug/$b")
done
for te in "${test_exes[@]}"; do
    path=${te#* }
    rel=${path#"$repo_root"/}
    put_elf "$path" "$rel"
    payload_elves+=("$path")
done
if [ "$timing" -gt 0 ]; then
    for b in containerd-shim-kiln-v1 kiln-probe; do
        [ -x "target/release/$b" ] || cannot_build "target/release/$b is not built (--timing)"
        mkdir -p "$stage/target/release"
        cp "target/release/$b" "$stage/target/release/$b"
        payload_elves+=("$repo_root/target/release/$b")
    done
fi
vm_containerd_bin=""
if [ -n "$containerd_bin" ]; then
    case "$containerd_bin" in
        "$repo_root"/*) rel=${containerd_bin#"$repo_root"/} ;;
        *) rel=.kiln-vm/containerd-bin ;;
    esac
    mkdir -p "$stage/$rel"
    cp -a "$containerd_bin"/. "$stage/$rel/"
    vm_containerd_bin=$repo_root/$rel
    for f in "$containerd_bin"/*; do [ -f "$f" ] && payload_elves+=("$f"); done
fi
for inc in "${includes[@]}"; do
    abs=$(realpath -m "$inc")
    case "$abs" in "$repo_root"/*) ;; *) cannot_build "--include $inc is not inside $repo_root" ;; esac
    [ -e "$abs" ] || cannot_build "--include $inc does not exist"
    rel=${abs#"$repo_root"/}
    mkdir -p "$stage/$(dirname "$rel")"
    cp -a "$abs" "$stage/$rel"
done

# The job: PID 1 of the VM runs it with bash, in the repository, and reports its status.
job=$stage/.kiln-vm/job.sh
{
    echo "# Written by scripts/vm-v2.sh for one VM run."
    echo "cd $(printf %q "$repo_root") || exit 1"
    # The harness's deadlines are a real node's; emulation is 10-50 times slower, more when
    # this host is busy.
    echo "export KILN_E2E_SLOW=$(printf %q "${KILN_E2E_SLOW:-4}")"
    if [ -n "$vm_containerd_bin" ]; then
        echo "export KILN_E2E_CONTAINERD_BIN=$(printf %q "$vm_containerd_bin")"
        # shellcheck disable=SC2016 # expanded in the VM
        echo 'echo "==> [vm] containerd under test: $("$KILN_E2E_CONTAINERD_BIN/containerd" --version)"'
    fi
    if [ ${#cmd[@]} -gt 0 ]; then
        printf 'exec'
        printf ' %q' "${cmd[@]}"
        echo
    else
        cat <<'JOB'
status=0
run_tests() { # NAME BINARY ARGS...
    local name=$1 bin=$2 t0=$SECONDS rc=0
    shift 2
    echo "==> [vm] e2e tests: $name ($*)"
    "$bin" --color never "$@" || rc=$?
    echo "==> [vm] e2e tests: $name: exit status $rc after $((SECONDS - t0)) s"
    [ $rc = 0 ] || status=$rc
}
JOB
        # In the order asked for; one test at a time: two at once on two emulated CPUs (each
        # start compiling its module) made ctr's 30 s deadlines expire.
        for t in "${test_names[@]}"; do
            for te in "${test_exes[@]}"; do
                name=${te%% *}
                path=${te#* }
                [ "$name" = "$t" ] || continue
                args="--test-threads=1"
                [ "$name" != cgroup_v2 ] || args="--ignored --test-threads=1"
                extra=()
                read -r -a extra <<<"$test_args"
                [ ${#extra[@]} = 0 ] || args+=$(printf ' %q' "${extra[@]}")
                echo "run_tests $(printf %q "$name") $(printf %q "$path") $args"
            done
        done
        if [ "$timing" -gt 0 ]; then
            echo "scripts/vm/timing.sh $timing || status=\$?"
        fi
        echo "exit \$status"
    fi
} >"$job"
chmod +x "$job"
echo "$repo_root" >"$stage/.kiln-vm/repo"

payload_img=$vmdir/payload.img
size=$(($(du -sm "$stage" | cut -f1) * 5 / 4 + 64))
rm -f "$payload_img"
mke2fs -q -t ext4 -O ^has_journal -L kiln-payload -d "$stage" -F "$payload_img" "${size}M" 2>&1 |
    grep -v '^Creating regular file' >&2 || true
[ -s "$payload_img" ] || cannot_build "mke2fs of the payload disk failed"
rm -rf "$stage"

# --- the cached parts ---------------------------------------------------------------------------
declare -A vm=()
prep=$(scripts/vm/prepare.sh "$vmdir" "${payload_elves[@]}") ||
    cannot_build "scripts/vm/prepare.sh could not prepare the VM's kernel, qemu or root disk (see above)"
while IFS='=' read -r k v; do vm[$k]=$v; done <<<"$prep"

# --- boot and run -------------------------------------------------------------------------------
mkdir -p "$(dirname "$serial_log")"
: >"$serial_log"
# Under TCG the guest's TSC runs at the host's rate, and the kernel's calibration of it against
# the emulated PIT fails when the host is busy (then the boot hangs): tell it the rate. The
# kernel finds the vCPUs' TSCs "unsynchronized" and would fall back to jiffies (4 ms steps in
# every timing the shim logs); they are the host's one TSC, so tsc=reliable.
tsc_khz=""
if grep -qw constant_tsc /proc/cpuinfo; then
    tsc_khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
fi
qemu_cmd=("${vm[QEMU]}")
[ -z "${vm[QEMU_DATA]}" ] || qemu_cmd+=(-L "${vm[QEMU_DATA]}")
# shellcheck disable=SC2054 # the commas are qemu's, inside single arguments
qemu_cmd+=(
    -M microvm,x-option-roms=off,rtc=on -accel tcg,thread=multi -cpu "${KILN_VM_CPU:-max}"
    -m "$mem" -smp "$cpus" -no-reboot -display none -monitor none
    -kernel "${vm[KERNEL]}" -initrd "${vm[INITRD]}"
    -append "console=ttyS0 quiet panic=-1 random.trust_cpu=on${tsc_khz:+ tsc_early_khz=$tsc_khz tsc=reliable}"
    -chardev "stdio,id=con,signal=off,logfile=$serial_log"
    -serial chardev:con
    -drive "file=${vm[BASE]},format=raw,if=none,id=base,snapshot=on"
    -device virtio-blk-device,drive=base
    -drive "file=$payload_img,format=raw,if=none,id=payload,snapshot=on"
    -device virtio-blk-device,drive=payload
)
log "booting the cgroup v2 node (${vm[KERNEL_PACKAGE]}, $cpus CPUs, $mem MiB, TCG); serial log: $serial_log"
t0=$(date +%s.%N)
# qemu's temporary copy-on-write files go to TMPDIR.
# shellcheck disable=SC2086 # QEMU_ENV is a list of NAME=VALUE words
env ${vm[QEMU_ENV]} "${qemu_cmd[@]}" </dev/null &
qpid=$!
trap 'kill $qpid 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

boot_deadline=120
booted="" outcome=""
while kill -0 $qpid 2>/dev/null; do
    now=$(date +%s.%N)
    elapsed=$(awk -v a="$t0" -v b="$now" 'BEGIN {printf "%d", b - a}')
    if [ -z "$booted" ]; then
        if grep -q '^KILN-VM-READY' "$serial_log"; then
            booted=$(awk -v a="$t0" -v b="$now" 'BEGIN {printf "%.1f", b - a}')
        elif [ "$elapsed" -ge $boot_deadline ]; then
            outcome="boot-timeout"
            break
        fi
    fi
    if [ "$elapsed" -ge "$timeout" ]; then
        outcome="timeout"
        break
    fi
    sleep 0.2
done
if [ -n "$outcome" ]; then
    kill $qpid 2>/dev/null || true
fi
wait $qpid 2>/dev/null || true
trap - EXIT
wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
echo
log "VM wall time: $wall s (node ready after ${booted:-?} s)"

failed=$(grep -a -m1 '^KILN-VM-BOOT-FAILED' "$serial_log" || true)
status=$(grep -a -m1 -o '^KILN-VM-EXIT=[0-9]*' "$serial_log" | cut -d= -f2 || true)
if [ -n "$failed" ]; then
    echo "error: [vm] the VM did not boot: ${failed#KILN-VM-BOOT-FAILED: } (serial log: $serial_log)" >&2
    exit $EXIT_BOOT
fi
if [ -z "$booted" ]; then
    case "$outcome" in
        boot-timeout) echo "error: [vm] the VM did not boot within ${boot_deadline} s (serial log: $serial_log)" >&2 ;;
        *) echo "error: [vm] the VM stopped before its node was set up (serial log: $serial_log)" >&2 ;;
    esac
    exit $EXIT_BOOT
fi
if [ -z "$status" ]; then
    case "$outcome" in
        timeout) echo "error: [vm] no result within --timeout $timeout s; the VM was stopped (serial log: $serial_log)" >&2 ;;
        *) echo "error: [vm] the VM stopped without reporting the command's status (serial log: $serial_log)" >&2 ;;
    esac
    exit $EXIT_LOST
fi
[ "$status" = 0 ] || log "the command in the VM failed with exit status $status"
exit "$status"
