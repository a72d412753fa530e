#!/usr/bin/env bash
# Installs the Kiln shim and registers the `kiln` runtime with containerd's CRI plugin.
#
#   scripts/install.sh [--config FILE] [--bin-dir DIR] [--binary PATH] [--restart]
#
#   --binary PATH   the shim (default: target/release/containerd-shim-kiln-v1; build it with
#                   `cargo build --release -p kiln-shim`)
#   --bin-dir DIR   where to install it (default: /usr/local/bin, which is on containerd's PATH)
#   --config FILE   containerd's config (default: /etc/containerd/config.toml)
#   --restart       restart containerd (systemctl) when it is active and has not loaded the
#                   current config yet; never done without this flag
#
# * The binary is copied only when its content differs (atomically: a running shim keeps its
#   old inode).
# * The config is only ever appended to, and only when it has no `runtimes.kiln]` section yet
#   (the first change keeps a copy in FILE.kiln.bak):
#     version = 3 (containerd 2.x)     [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kiln]
#     version = 2 (containerd 1.6/1.7) [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln]
#     no version line: a file with settings is a version 1 config to containerd (which ignores
#     the names above in it), so it gets [plugins.cri.containerd.runtimes.kiln]; a file with
#     only comments gets a version line first, as a missing file does.
#   A missing file is created with the version matching `containerd --version` (1.x: 2, 2.x: 3).
#   Each gets `runtime_type = "io.containerd.kiln.v1"`.
# Running it again changes nothing and says `already installed`.
#
# Pods then use it with a RuntimeClass whose handler is `kiln`; `ctr run --runtime
# io.containerd.kiln.v1` only needs the binary on containerd's PATH.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config=/etc/containerd/config.toml
bindir=/usr/local/bin
binary="$repo_root/target/release/containerd-shim-kiln-v1"
restart=0
runtime_type=io.containerd.kiln.v1
shim_name=containerd-shim-kiln-v1

usage() {
    echo "usage: $0 [--config FILE] [--bin-dir DIR] [--binary PATH] [--restart]" >&2
    exit 2
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --config) [ $# -ge 2 ] || usage; config=$2; shift ;;
        --config=*) config=${1#*=} ;;
        --bin-dir) [ $# -ge 2 ] || usage; bindir=$2; shift ;;
        --bin-dir=*) bindir=${1#*=} ;;
        --binary) [ $# -ge 2 ] || usage; binary=$2; shift ;;
        --binary=*) binary=${1#*=} ;;
        --restart) restart=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
    shift
done

[ -f "$binary" ] ||
    die "$binary not found; build it with: cargo build --release -p kiln-shim (or pass --binary)"
[ -x "$binary" ] || die "$binary is not executable"

changed=0

# --- the binary --------------------------------------------------------------------------------
dest="$bindir/$shim_name"
if [ -f "$dest" ] && cmp -s "$binary" "$dest"; then
    echo "shim: already installed at $dest"
else
    mkdir -p "$bindir"
    tmp=$(mktemp "$bindir/.$shim_name.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    install -m 0755 "$binary" "$tmp"
    mv -f "$tmp" "$dest"
    trap - EXIT
    echo "shim: installed $binary -> $dest"
    changed=1
fi

# --- the config --------------------------------------------------------------------------------
# The version containerd itself would write: 2 for 1.x, 3 for 2.x.
containerd_config_version() {
    local v major
    if ! v=$(containerd --version 2>/dev/null); then
        echo "warning: containerd not found; writing a version 2 config (containerd 1.x)" >&2
        echo 2
        return
    fi
    # "containerd github.com/containerd/containerd 1.6.20~ds1 ..." / "... v2.0.0 ..."
    major=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^v?[0-9]+\.[0-9]+/) {sub(/^v/, "", $i); split($i, p, "."); print p[1]; exit}}' <<<"$v")
    case "$major" in
        1) echo 2 ;;
        2) echo 3 ;;
        *) echo "warning: unrecognised containerd version ($v); assuming 2.x" >&2; echo 3 ;;
    esac
}

section_for() {
    case "$1" in
        1) echo 'plugins.cri.containerd.runtimes.kiln' ;;
        2) echo 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln' ;;
        3) echo 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kiln' ;;
        *) die "unsupported containerd config version $1 in $config" ;;
    esac
}

snippet() { # SECTION
    printf '\n# Added by Kiln (scripts/install.sh): the Wasm runtime, for RuntimeClass handler "kiln".\n'
    printf '[%s]\n  runtime_type = "%s"\n' "$1" "$runtime_type"
}

config_changed=0
if [ -f "$config" ] && grep -Eq '^[[:space:]]*\[[^#]*runtimes\.kiln\][[:space:]]*(#.*)?$' "$config"; then
    echo "config: already installed (a runtimes.kiln section exists in $config)"
elif [ ! -e "$config" ]; then
    version=$(containerd_config_version)
    mkdir -p "$(dirname "$config")"
    { printf 'version = %s\n' "$version"; snippet "$(section_for "$version")"; } >"$config"
    echo "config: created $config (version $version) with the kiln runtime"
    config_changed=1
else
    [ -f "$config" ] || die "$config is not a regular file"
    # The top-level `version` key: only lines before the first table header count.
    version=$(awk '/^[[:space:]]*\[/ {exit} /^[[:space:]]*version[[:space:]]*=/ {sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; exit}' "$config")
    prefix=""
    if [ -z "$version" ]; then
        if grep -Eq '^[[:space:]]*[^#[:space:]]' "$config"; then
            version=1 # settings without a version line: containerd reads a version 1 config
        else
            version=$(containerd_config_version) # only comments: treat as a new file
            prefix="version = $version"
        fi
    fi
    [[ $version =~ ^[0-9]+$ ]] || die "cannot read the version in $config: $version"
    section=$(section_for "$version")
    addition=$(
        # A file without a final newline must not glue its last line to ours.
        [ ! -s "$config" ] || [ -z "$(tail -c 1 "$config")" ] || echo
        [ -z "$prefix" ] || printf '%s\n' "$prefix"
        snippet "$section"
        echo x # keep the trailing newline through $(...)
    )
    addition=${addition%x}
    # Refuse to append something containerd could not parse (e.g. runtimes given as an
    # inline table): check the result with Python's TOML parser when there is one.
    if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
        if ! err=$({ cat "$config"; printf '%s' "$addition"; } | python3 -c '
import sys, tomllib
try:
    tomllib.loads(sys.stdin.read())
except tomllib.TOMLDecodeError as e:
    print(e); sys.exit(1)' 2>&1); then
            die "appending [$section] to $config would not give valid TOML ($err); add it by hand"
        fi
    fi
    [ -e "$config.kiln.bak" ] || cp -p "$config" "$config.kiln.bak"
    printf '%s' "$addition" >>"$config"
    echo "config: added [$section] to $config (version $version; backup in $config.kiln.bak)"
    config_changed=1
fi
changed=$((changed | config_changed))

if grep -Eq '^[[:space:]]*disabled_plugins[[:space:]]*=.*"(cri|io\.containerd\.grpc\.v1\.cri)"' "$config"; then
    echo "warning: the CRI plugin is disabled in $config (disabled_plugins): Kubernetes cannot use kiln" >&2
fi

# --- restart -----------------------------------------------------------------------------------
if [ $restart = 1 ]; then
    if ! command -v systemctl >/dev/null || ! systemctl is-active --quiet containerd 2>/dev/null; then
        echo "containerd: not active under systemd; not restarted"
    else
        # Restart when the config changed now, or changed after containerd started.
        started=$(systemctl show -p ActiveEnterTimestamp --value containerd 2>/dev/null || true)
        started_s=$(date -d "$started" +%s 2>/dev/null || echo 0)
        if [ $config_changed = 1 ] || [ "$(stat -c %Y "$config")" -ge "$started_s" ]; then
            systemctl restart containerd
            echo "containerd: restarted"
        else
            echo "containerd: already running with this config; not restarted"
        fi
    fi
elif [ $config_changed = 1 ]; then
    echo "note: restart containerd to load the kiln runtime (systemctl restart containerd, or rerun with --restart)"
fi

[ $changed = 1 ] || echo "already installed"
