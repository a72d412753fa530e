#!/usr/bin/env bash
# Installs what building and running Kiln needs on Debian 12 (run as root, non-interactive).
#
#   scripts/setup.sh
#
# * Debian packages, with apt-get, only for what is missing (`apt-get update` only then):
#     containerd        containerd, ctr
#     runc              runc
#     protobuf-compiler protoc
#     containernetworking-plugins  the CNI plugins (bridge, host-local, loopback) of the CRI
#                       tests' pod network
#     iproute2          ip (the CRI tests' network namespace)
#     docker-registry, skopeo  a private registry the pull and CRI tests push to and pull from
#                       (tests/src/registry.rs, tests/src/cri.rs)
#     busybox-static    a static /bin/busybox (for the runc comparison image)
#     python3           python3
#     python3-yaml      PyYAML (tests/tests/deploy.rs parses deploy/'s manifests with it)
#     curl              the node installer's API call, tested by tests/tests/deploy.rs
#     ca-certificates   /etc/ssl/certs/ca-certificates.crt
#     gcc, libc6-dev    cc (cargo links through it)
# * Rust: when cargo is missing, rustup with the stable toolchain (from sh.rustup.rs); a
#   toolchain older than the workspace's rust-version is updated when it is rustup's stable.
# * The wasm32-wasip1 and wasm32-wasip2 Rust targets (the test workloads), when missing.
#
# Idempotent and quiet: prints nothing when everything is present. No stdin is read.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
wasm_targets=(wasm32-wasip1 wasm32-wasip2)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
deb_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# apt-get and dpkg need the sbin directories, which `su` without `-` leaves out of PATH.
for d in /usr/local/sbin /usr/sbin /sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
done
export PATH

# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH yet.
if ! have cargo && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

# --- Debian packages --------------------------------------------------------------------------
missing=()
{ have containerd && have ctr; } || missing+=(containerd)
have runc || missing+=(runc)
have protoc || missing+=(protobuf-compiler)
for p in bridge host-local loopback; do
    [ -x "/usr/lib/cni/$p" ] || { missing+=(containernetworking-plugins); break; }
done
have ip || missing+=(iproute2)
have docker-registry || missing+=(docker-registry)
have skopeo || missing+=(skopeo)
# The dynamically linked `busybox` package also provides /bin/busybox, but the busybox image
# has no libc: only busybox-static will do (installing it replaces busybox).
if have dpkg-query; then
    { deb_installed busybox-static && [ -x /bin/busybox ]; } || missing+=(busybox-static)
else
    [ -x /bin/busybox ] || missing+=(busybox-static)
fi
have python3 || missing+=(python3)
if have dpkg-query; then
    deb_installed python3-yaml || missing+=(python3-yaml)
fi
have curl || missing+=(curl)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
have cc || missing+=(gcc libc6-dev)
# The CRI tests' pause program is linked statically: libc.a comes with libc6-dev.
if have cc && have dpkg-query && ! deb_installed libc6-dev; then missing+=(libc6-dev); fi
need_rust=0
have cargo || need_rust=1

if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run $0 as root"
    have apt-get || die "missing packages: ${missing[*]}, and apt-get is not available"
    log "installing ${missing[*]}"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null >/dev/null
    # Debian's docker-registry enables a system registry on :5000 (all interfaces); the tests
    # start their own on 127.0.0.1, so keep the system one off where systemd runs it.
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    fi
fi

# --- Rust -------------------------------------------------------------------------------------
if [ $need_rust = 1 ]; then
    log "installing Rust (rustup, stable toolchain) into ${CARGO_HOME:-$HOME/.cargo}"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs </dev/null |
        sh -s -- -y --profile minimal --default-toolchain stable >/dev/null
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    have cargo || die "rustup did not install cargo"
fi

required=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1)
if [ -n "$required" ]; then
    current=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$required" "$current" | sort -V | head -n 1)" != "$required" ]; then
        if have rustup && rustup show active-toolchain 2>/dev/null | grep -q '^stable'; then
            log "Rust $current is older than the required $required: updating the stable toolchain"
            rustup update stable --no-self-update </dev/null >/dev/null
        else
            die "Rust $current is older than the required $required (rust-version in Cargo.toml)"
        fi
    fi
fi

# --- wasm32-wasip1, wasm32-wasip2 -------------------------------------------------------------
for wasm_target in "${wasm_targets[@]}"; do
    if have rustup; then
        if ! rustup target list --installed | grep -qx "$wasm_target"; then
            log "installing Rust target $wasm_target"
            rustup target add "$wasm_target" </dev/null >/dev/null
        fi
    elif [ ! -d "$(rustc --print sysroot)/lib/rustlib/$wasm_target" ]; then
        die "the Rust target $wasm_target is missing and rustup is not available to install it"
    fi
done
