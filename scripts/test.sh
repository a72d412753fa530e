#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, builds the
# Wasm test workloads and their images, checks formatting and lints, then runs the unit tests
# and the end-to-end tests (which start their own private containerd; the system's is never
# touched), last on a cgroup v2 node in a VM. Must run as root: the end-to-end tests mount
# rootfs snapshots and create cgroups.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TERM_COLOR=never
scripts/setup.sh
scripts/build-test-images.sh
echo "==> formatting"
cargo fmt --all -- --check
echo "==> lints"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> build"
cargo build --workspace
echo "==> tests"
cargo test --workspace -- --test-threads=2

# The whole suite above ran against containerd 1.6 (bookworm). Against 1.7 (trixie) and 2.x
# (sid) again: the basic runs and lifecycle (the shim's start reply and task service name must
# satisfy each; an exit is held until its output is read), the image tests (what each version
# imports and pulls, and which Wasm image forms it runs: layers, components) and the CRI tests
# (each one's CRI plugin: config version 2 for 1.x, 3 for 2.x; pods, pulls, every image form).
# Their binaries come from Debian's archive, unpacked into target/containerd without installing
# anything.
for suite in trixie sid; do
  bin=$(scripts/fetch-containerd.sh "$suite" "target/containerd/$suite")
  echo "==> end-to-end tests against $("$bin/containerd" --version)"
  # --workspace (not -p kiln-e2e): the same feature set as the run above, so nothing is rebuilt.
  KILN_E2E_CONTAINERD_BIN=$bin cargo test --workspace --test run --test lifecycle --test errors \
    --test first_start --test pull --test layers --test components --test cri_runc \
    --test cri_pull --test cri_kiln --test cri_forms --test output_drain -- --test-threads=2
done

# What CRI pulls of Wasm images become on containerd 2.x when its Transfer Service unpacks the
# host platform only (as 2.3 does by default; tests/tests/cri_pull.rs): fetched, not
# unpacked; and with use_local_image_pull = true, the setting that fixes it, unpacked again.
bin=$(scripts/fetch-containerd.sh sid target/containerd/sid)
echo "==> CRI pulls against $("$bin/containerd" --version), strict unpack, Transfer Service then local pull"
KILN_E2E_CONTAINERD_BIN=$bin KILN_CRI_STRICT_UNPACK=1 cargo test --workspace --test cri_pull -- --test-threads=2
KILN_E2E_CONTAINERD_BIN=$bin KILN_CRI_STRICT_UNPACK=1 KILN_CRI_LOCAL_PULL=1 \
  cargo test --workspace --test cri_pull -- --test-threads=2

# The cgroup v2 tests (tests/tests/cgroup_v2.rs, ignored elsewhere) on a cgroup v2 node: this
# machine mounts the v1 controllers, so scripts/vm-v2.sh boots one as an emulated VM, with the
# binaries built above. The focused subset only, on 1.6 and 2.x (1-2 minutes each): the whole of
# run and lifecycle under emulation takes 7-15 minutes more (`scripts/vm-v2.sh` alone runs them).
echo "==> cgroup v2 tests on a cgroup v2 node (VM), containerd 1.6 and 2.x"
scripts/vm-v2.sh --tests cgroup_v2
scripts/vm-v2.sh --tests cgroup_v2 --containerd sid
