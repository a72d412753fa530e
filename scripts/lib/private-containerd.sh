# Sourced by the scripts that run a private containerd (demo, benchmarks): on exit, whatever
# happened, stop it and remove its work dir; on failure, show the end of its log first.
#
#   . scripts/lib/private-containerd.sh
#   stop_private_containerd_on_exit "$repo_root" "$workdir"

stop_private_containerd_on_exit() {
    _kiln_repo=$1
    _kiln_workdir=$2
    trap _kiln_private_containerd_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

_kiln_private_containerd_cleanup() {
    local rc=$?
    if [ $rc != 0 ] && [ -f "$_kiln_workdir/containerd.log" ]; then
        echo "--- last lines of the private containerd's log ---" >&2
        tail -n 30 "$_kiln_workdir/containerd.log" >&2 || true
    fi
    "$_kiln_repo/scripts/containerd-private.sh" stop "$_kiln_workdir" >/dev/null 2>&1 || true
    rm -rf "$_kiln_workdir"
    exit $rc
}
