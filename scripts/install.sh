#!/usr/bin/env bash
# Installs the Kiln shim and registers the `kiln` runtime with containerd's CRI plugin.
#
#   scripts/install.sh [--config FILE] [--bin-dir DIR] [--binary PATH] [--containerd CMD] [--restart]
#
#   --binary PATH     the shim (default: target/release/containerd-shim-kiln-v1; build it with
#                     `cargo build --release -p kiln-shim`)
#   --bin-dir DIR     where to install it (default: /usr/local/bin, which is on containerd's PATH)
#   --config FILE     containerd's config (default: /etc/containerd/config.toml)
#   --containerd CMD  the containerd whose `--version` picks the format of a config this script
#                     creates (default: containerd on PATH); split on spaces, so a command that
#                     reaches the host's containerd from a container (nsenter ...) works too
#   --restart         restart containerd (systemctl) when it is active and has not loaded the
#                     current config yet; never done without this flag
#
# * The binary is copied only when its content differs (atomically: a running shim keeps its
#   old inode).
# * The config is only ever appended to (the first change keeps a copy in FILE.kiln.bak), and
#   only when it lacks the section, under the CRI plugin of its own config version:
#     version = 3 (containerd 2.x)     [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kiln]
#     version = 2 (containerd 1.6/1.7) [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kiln]
#     no version line: a file with settings is a version 1 config to containerd (which ignores
#     the names above in it), so it gets [plugins.cri.containerd.runtimes.kiln]; a file with
#     only comments gets a version line first, as a missing file does.
#   A missing file is created with the version matching `containerd --version` (1.x: 2, 2.x: 3).
#   Each gets `runtime_type = "io.containerd.kiln.v1"`.
# * Versions 1 and 2 also get runc's entry (runtime_type io.containerd.runc.v2) when they list
#   none: containerd 1.x replaces its built-in runtimes with those a config lists, and without
#   runc, the default runtime, its CRI plugin does not load at all. (containerd 2.x merges.)
# Running it again changes nothing and says `already installed`.
#
# Pods then use it with a RuntimeClass whose handler is `kiln`; `ctr run --runtime
# io.containerd.kiln.v1` only needs the binary on containerd's PATH. deploy/ has the
# Kubernetes side: RuntimeClass, a DaemonSet that runs this script on every node, k3s.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config=/etc/containerd/config.toml
bindir=/usr/local/bin
binary="$repo_root/target/release/containerd-shim-kiln-v1"
restart=0
containerd_cmd=containerd
runtime_type=io.containerd.kiln.v1
shim_name=containerd-shim-kiln-v1

usage() {
    echo "usage: $0 [--config FILE] [--bin-dir DIR] [--binary PATH] [--containerd CMD] [--restart]" >&2
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
        --containerd) [ $# -ge 2 ] || usage; containerd_cmd=$2; shift ;;
        --containerd=*) containerd_cmd=${1#*=} ;;
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
    local v major cmd
    read -r -a cmd <<<"$containerd_cmd"
    if ! v=$("${cmd[@]}" --version 2>/dev/null); then
        echo "warning: cannot run $containerd_cmd --version; writing a version 2 config (containerd 1.x)" >&2
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

# The CRI plugin's runtimes table for each config version, as written here...
runtimes_table() {
    case "$1" in
        1) echo 'plugins.cri.containerd.runtimes' ;;
        2) echo 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes' ;;
        3) echo 'plugins."io.containerd.cri.v1.runtime".containerd.runtimes' ;;
        *) die "unsupported containerd config version $1 in $config" ;;
    esac
}
# ...and as a regex for the headers others write (containerd 2.x quotes keys with ').
q="[\"']"
runtimes_re() {
    case "$1" in
        1) printf '%s' "plugins\\.(cri|${q}cri${q})\\.containerd\\.runtimes\\." ;;
        2) printf '%s' "plugins\\.${q}io\\.containerd\\.grpc\\.v1\\.cri${q}\\.containerd\\.runtimes\\." ;;
        3) printf '%s' "plugins\\.${q}io\\.containerd\\.cri\\.v1\\.runtime${q}\\.containerd\\.runtimes\\." ;;
    esac
}
# Whether $config has a header [<VERSION's runtimes table>.NAME]; with SUB=1 a subtable such as
# [....NAME.options] counts too (it creates NAME's entry all the same).
has_runtime() { # VERSION NAME SUB
    local end='[[:space:]]*\]'
    [ "$3" = 0 ] || end='([[:space:]]*\]|\.)'
    [ -f "$config" ] &&
        grep -Eq "^[[:space:]]*\[[[:space:]]*$(runtimes_re "$1")($2|${q}$2${q})$end" "$config"
}

snippet() { # TABLE NAME RUNTIME_TYPE COMMENT
    printf '\n# Added by Kiln (scripts/install.sh): %s\n' "$4"
    printf '[%s.%s]\n  runtime_type = "%s"\n' "$1" "$2" "$3"
}

config_changed=0
prefix="" # a version line to write first
if [ -e "$config" ]; then
    [ -f "$config" ] || die "$config is not a regular file"
    # The top-level `version` key: only lines before the first table header count.
    version=$(awk '/^[[:space:]]*\[/ {exit} /^[[:space:]]*version[[:space:]]*=/ {sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; exit}' "$config")
    if [ -z "$version" ]; then
        if grep -Eq '^[[:space:]]*[^#[:space:]]' "$config"; then
            version=1 # settings without a version line: containerd reads a version 1 config
        else
            version=$(containerd_config_version) # only comments: treat as a new file
            prefix="version = $version"
        fi
    fi
else
    version=$(containerd_config_version)
    prefix="version = $version"
fi
[[ $version =~ ^[0-9]+$ ]] || die "cannot read the version in $config: $version"
table=$(runtimes_table "$version")

want_kiln=1
has_runtime "$version" kiln 0 && want_kiln=0
if [ $want_kiln = 1 ] && [ -f "$config" ] &&
    grep -Eq "^[[:space:]]*\[[^#]*runtimes\.(kiln|${q}kiln${q})[[:space:]]*\]" "$config"; then
    echo "warning: $config has a runtimes.kiln section, but not under [$table], which containerd reads in a version $version config; adding one there" >&2
fi
want_runc=0
if [ "$version" -le 2 ] && ! has_runtime "$version" runc 1; then
    default_runtime=""
    [ ! -f "$config" ] || default_runtime=$(sed -nE "s/^[[:space:]]*default_runtime_name[[:space:]]*=[[:space:]]*${q}([^\"']*)${q}.*/\\1/p" "$config" | head -n 1)
    case "$default_runtime" in "" | runc) want_runc=1 ;; esac
fi

if [ $want_kiln = 0 ] && [ $want_runc = 0 ]; then
    echo "config: already installed ([$table.kiln] exists in $config)"
else
    added=()
    addition=$(
        # A file without a final newline must not glue its last line to ours.
        [ ! -s "$config" ] || [ -z "$(tail -c 1 "$config")" ] || echo
        [ -z "$prefix" ] || printf '%s\n' "$prefix"
        [ $want_kiln = 0 ] ||
            snippet "$table" kiln "$runtime_type" 'the Wasm runtime, for RuntimeClass handler "kiln".'
        [ $want_runc = 0 ] ||
            snippet "$table" runc io.containerd.runc.v2 'runc, the default runtime. containerd 1.x keeps
# only the runtimes a config lists, and its CRI plugin does not load without the default one.'
        echo x # keep the trailing newline through $(...)
    )
    addition=${addition%x}
    [ $want_kiln = 0 ] || added+=("[$table.kiln]")
    [ $want_runc = 0 ] || added+=("[$table.runc]")
    printf -v added_list '%s and ' "${added[@]}"
    added_list=${added_list% and }
    if [ ! -e "$config" ]; then
        mkdir -p "$(dirname "$config")"
        printf '%s' "${addition#$'\n'}" >"$config"
        echo "config: created $config (version $version) with $added_list"
    else
        # Refuse to append something containerd could not parse (e.g. runtimes given as an
        # inline table): check the result with Python's TOML parser when there is one.
        if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
            if ! err=$({ cat "$config"; printf '%s' "$addition"; } | python3 -c '
import sys, tomllib
try:
    tomllib.loads(sys.stdin.read())
except tomllib.TOMLDecodeError as e:
    print(e); sys.exit(1)' 2>&1); then
                die "appending $added_list to $config would not give valid TOML ($err); add it by hand"
            fi
        fi
        [ -e "$config.kiln.bak" ] || cp -p "$config" "$config.kiln.bak"
        printf '%s' "$addition" >>"$config"
        echo "config: added $added_list to $config (version $version; backup in $config.kiln.bak)"
    fi
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
