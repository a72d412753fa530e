#!/usr/bin/env bash
# Installs Kiln on the node this runs on, from a privileged pod of deploy/installer/daemonset.yaml
# (host PID namespace, the host's shim directory and /etc/containerd mounted under /host), then
# stays up so that the DaemonSet's pod shows the node as done.
#
# 1. scripts/install.sh copies the shim into the host's directory and adds the `kiln` runtime
#    to the host's containerd config (only what is missing; the same logic as a manual install).
# 2. containerd is restarted on the host (nsenter into PID 1's mount namespace, systemctl) when
#    the config changed, and only then. A restart that has not succeeded yet is remembered in
#    CONFIG.kiln.restart-pending, so that a pod killed in between, or a restart that failed,
#    is retried by the next pod even though the config no longer changes. A new shim binary
#    alone needs no restart: containerd starts the binary anew for every shim.
# 3. The node gets the label KILN_NODE_LABEL (the RuntimeClass schedules pods by it), through
#    the API server with the pod's service account; after the restart, so that no pod is sent
#    to a node whose containerd does not know `kiln` yet.
# 4. KILN_READY_FILE is written (the pod's readiness probe), and the script sleeps until the pod
#    is stopped (SIGTERM), then exits 0. Nothing is undone on stop: see deploy/README.md.
#
# Every path and command is an environment variable, so that this runs without a cluster:
#   KILN_SHIM            the shim to install       (/opt/kiln/bin/containerd-shim-kiln-v1)
#   KILN_INSTALL_SH      scripts/install.sh        (install.sh beside this script, else the repo's)
#   KILN_HOST_BIN_DIR    the host's shim directory, as mounted here     (/host/usr/local/bin)
#   KILN_HOST_CONFIG     the host's containerd config, as mounted here  (/host/etc/containerd/config.toml)
#   KILN_CONTAINERD_CMD  the host's containerd, for `--version` when there is no config yet
#                        (nsenter --target 1 --mount -- containerd)
#   KILN_RESTART_CMD     restarts the host's containerd
#                        (nsenter --target 1 --mount -- systemctl restart containerd)
#   KILN_NODE_LABEL      KEY=VALUE to set on this node; empty: no label      (empty)
#   NODE_NAME            this node's name (the DaemonSet sets it from spec.nodeName)
#   KILN_KUBE_API        the API server (https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)
#   KILN_SA_DIR          the service account's token and ca.crt
#                        (/var/run/secrets/kubernetes.io/serviceaccount)
#   KILN_READY_FILE      written once the node is ready  (/tmp/kiln-installer.ready)
#   KILN_ONCE            1: exit after installing instead of sleeping
# The commands are split on spaces (no shell quoting).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
shim=${KILN_SHIM:-/opt/kiln/bin/containerd-shim-kiln-v1}
if [ -n "${KILN_INSTALL_SH:-}" ]; then
    install_sh=$KILN_INSTALL_SH
elif [ -f "$here/install.sh" ]; then
    install_sh=$here/install.sh # the image: both scripts in /opt/kiln
else
    install_sh=$here/../../scripts/install.sh # the repository
fi
bin_dir=${KILN_HOST_BIN_DIR:-/host/usr/local/bin}
config=${KILN_HOST_CONFIG:-/host/etc/containerd/config.toml}
containerd_cmd=${KILN_CONTAINERD_CMD:-nsenter --target 1 --mount -- containerd}
restart_cmd=${KILN_RESTART_CMD:-nsenter --target 1 --mount -- systemctl restart containerd}
node_label=${KILN_NODE_LABEL:-}
sa_dir=${KILN_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
ready_file=${KILN_READY_FILE:-/tmp/kiln-installer.ready}
pending=$config.kiln.restart-pending

log() { printf 'kiln-installer: %s\n' "$*"; }
die() { printf 'kiln-installer: error: %s\n' "$*" >&2; exit 1; }

rm -f "$ready_file"
[ -f "$install_sh" ] || die "$install_sh not found (set KILN_INSTALL_SH)"

# --- 1. shim and config ------------------------------------------------------------------------
fingerprint() { if [ -e "$config" ]; then sha256sum <"$config"; else echo missing; fi; }

# The marker goes down before install.sh can change the config, and comes off again at once if
# it changed nothing: a kill at any point leaves it wherever a restart may still be owed.
had_pending=0
[ ! -e "$pending" ] || had_pending=1
before=$(fingerprint)
mkdir -p "$(dirname "$config")"
touch "$pending"
rc=0
bash "$install_sh" --config "$config" --bin-dir "$bin_dir" --binary "$shim" \
    --containerd "$containerd_cmd" 2>&1 |
    sed '/^note: restart containerd/d; s/^/kiln-installer: install.sh: /' || rc=$?
if [ "$(fingerprint)" = "$before" ] && [ $had_pending = 0 ]; then
    rm -f "$pending"
fi
[ "$rc" = 0 ] || die "install.sh failed (exit $rc)"

# --- 2. restart --------------------------------------------------------------------------------
if [ -e "$pending" ]; then
    read -r -a cmd <<<"$restart_cmd"
    log "restarting containerd: $restart_cmd"
    "${cmd[@]}" || die "restarting containerd failed; the next start of this pod retries"
    rm -f "$pending"
    log "containerd restarted"
else
    log "containerd's config unchanged; not restarted"
fi

# --- 3. label ----------------------------------------------------------------------------------
label_node() {
    local key value api
    key=${node_label%%=*}
    value=${node_label#*=}
    [ "$key" != "$node_label" ] || die "KILN_NODE_LABEL=$node_label is not KEY=VALUE"
    # Kubernetes' own syntax for label keys and values; it also keeps the JSON below plain.
    local name='[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?'
    [[ $key =~ ^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?$name$ ]] || die "invalid label key: $key"
    [[ -z $value || $value =~ ^$name$ ]] || die "invalid label value: $value"
    [ -n "${NODE_NAME:-}" ] || die "KILN_NODE_LABEL is set but NODE_NAME is not"
    [[ $NODE_NAME =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "invalid node name: $NODE_NAME"
    if [ -n "${KILN_KUBE_API:-}" ]; then
        api=$KILN_KUBE_API
    else
        [ -n "${KUBERNETES_SERVICE_HOST:-}" ] || die "no API server: KUBERNETES_SERVICE_HOST is not set"
        local host=$KUBERNETES_SERVICE_HOST
        [[ $host != *:* ]] || host="[$host]" # IPv6
        api="https://$host:${KUBERNETES_SERVICE_PORT:-443}"
    fi
    [ -r "$sa_dir/token" ] || die "no service account token in $sa_dir"
    local args=(-sS --fail-with-body --retry 5 --retry-connrefused --retry-delay 2
        -X PATCH -H 'Content-Type: application/merge-patch+json' -H @-
        --data "{\"metadata\":{\"labels\":{\"$key\":\"$value\"}}}" -o /dev/null)
    [ ! -f "$sa_dir/ca.crt" ] || args+=(--cacert "$sa_dir/ca.crt")
    # The token goes in on stdin: on the command line every process on the host could read it.
    printf 'Authorization: Bearer %s\n' "$(cat "$sa_dir/token")" |
        curl "${args[@]}" "$api/api/v1/nodes/$NODE_NAME" ||
        die "labelling node $NODE_NAME with $key=$value failed"
    log "labelled node $NODE_NAME $key=$value"
}
if [ -n "$node_label" ]; then
    label_node
fi

# --- 4. ready, then wait -----------------------------------------------------------------------
touch "$ready_file"
if [ "${KILN_ONCE:-0}" = 1 ]; then
    log "done"
    exit 0
fi
log "done; sleeping until the pod stops"
sleeper=""
trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM INT
while :; do
    sleep 86400 &
    sleeper=$!
    wait "$sleeper" || true
done
