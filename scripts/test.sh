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

# The end-to-end tests again against containerd 1.7 (trixie) and 2.x (sid): the shim's start
# reply and task service name must satisfy each. Their binaries come from Debian's archive,
# unpacked into target/containerd without installing anything.
for suite in trixie sid; do
  bin=$(scripts/fetch-containerd.sh "$suite" "target/containerd/$suite")
  echo "==> end-to-end tests against $("$bin/containerd" --version)"
  # --workspace (not -p kiln-e2e): the same feature set as the run above, so nothing is rebuilt.
  KILN_E2E_CONTAINERD_BIN=$bin cargo test --workspace --test run --test lifecycle --test errors \
    --test isolation --test shared_shim --test first_start --test first_start_optimized \
    -- --test-threads=2
done

# The cgroup v2 tests (tests/tests/cgroup_v2.rs, ignored elsewhere), and run and lifecycle again,
# on a cgroup v2 node: this machine mounts the v1 controllers, so scripts/vm-v2.sh boots one as
# an emulated VM, with the binaries built above (it prints the VM's wall time: 7-8 minutes on an
# idle machine, up to 15 when others load it).
echo "==> end-to-end tests on a cgroup v2 node (VM)"
scripts/vm-v2.sh
