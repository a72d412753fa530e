#!/usr/bin/env bash
# Prepares the parts of the cgroup v2 node (scripts/vm-v2.sh) that do not change from run to
# run, cached under DIR (target/vm) and rebuilt only when their inputs change:
#
#   DIR/qemu/       bookworm's qemu-system-x86 (7.2) and the libraries this host lacks, unpacked
#                   with apt-get download + dpkg -x: installing it would replace the qemu-utils
#                   from backports some machines have. A qemu-system-x86 installed on the host
#                   is used instead; KILN_VM_QEMU=/path/to/qemu-system-x86_64 overrides both.
#   DIR/kernel/     the kernel of the newest linux-image-*-cloud-amd64 (the version comes from
#                   the linux-image-cloud-amd64 metapackage), unpacked, never installed
#   DIR/initrd.gz   busybox-static, the modules the root disk needs (virtio-mmio, virtio-blk)
#                   plus overlay, and scripts/vm/initramfs-init
#   DIR/base.img    the node's root disk (ext4, label kiln-base): this host's containerd, ctr,
#                   runc and containerd-shim-runc-v2, bash, coreutils, util-linux, grep, sed, awk,
#                   findutils, procps, the libraries of all of them and of every ELF file given
#                   as an argument (the payload's binaries), scripts/vm/node-init as
#                   /sbin/kiln-node-init, and busybox for the rest
#
#   prepare.sh DIR [ELF...]
#
# Prints `KEY=VALUE` lines for scripts/vm-v2.sh: QEMU, QEMU_ENV (LD_LIBRARY_PATH=… or empty),
# QEMU_DATA (firmware directory, for -L), KERNEL, INITRD, BASE, KERNEL_PACKAGE. Progress goes to
# stderr. Must run as root (dpkg -x and mke2fs -d keep owners and modes).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 DIR [ELF...]" >&2; exit 2; }
dir=$(realpath -m "$1")
shift
extra_elves=("$@")

log() { printf '==> [vm] %s\n' "$*" >&2; }
die() { printf 'error: [vm] %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing on this host ($2)"; }

for d in /usr/local/sbin /usr/sbin /sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
done
need apt-get "Debian's apt"
need dpkg "Debian's dpkg"
need mke2fs "e2fsprogs"
need ldd "libc-bin"
need gzip "gzip"
# The initramfs has no libc: its busybox must be the static one.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } ||
    die "/bin/busybox is missing or not static (apt-get install busybox-static)"
[ "$(id -u)" = 0 ] || die "run as root"
mkdir -p "$dir"

apt_download() { # DEST PKG[=VER]...
    local dest=$1
    shift
    (cd "$dest" && apt-get -o APT::Sandbox::User=root download -qq "$@" >&2)
}
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }

# What apt would pick only changes with apt's lists or the installed packages: asking apt-cache
# costs seconds, so the answers are kept until either changes.
apt_key="$(stat -c %Y /var/lib/apt/lists /var/lib/dpkg/status | tr '\n' ' ')"
resolved() { # NAME COMMAND...: COMMAND's output, cached under apt_key
    local f=$dir/resolved/$1
    shift
    if [ -f "$f" ] && [ "$(head -1 "$f")" = "$apt_key" ]; then
        tail -n +2 "$f"
        return
    fi
    local out
    out=$("$@")
    mkdir -p "$dir/resolved"
    printf '%s\n%s\n' "$apt_key" "$out" >"$f"
    printf '%s\n' "$out"
}

# --- qemu ---------------------------------------------------------------------------------------
qemu_env=""
qemu_data=""
if [ -n "${KILN_VM_QEMU:-}" ]; then
    qemu=$KILN_VM_QEMU
    [ -x "$qemu" ] || die "KILN_VM_QEMU=$qemu is not executable"
elif [ "$(dpkg-query -W -f='${db:Status-Status}' qemu-system-x86 2>/dev/null)" = installed ]; then
    qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86 is installed but qemu-system-x86_64 is not on PATH"
else
    qdir=$dir/qemu
    want=$(resolved qemu candidate qemu-system-x86)
    if [ -z "$want" ] || [ "$want" = "(none)" ]; then
        die "apt knows no qemu-system-x86 (is bookworm in apt's sources?)"
    fi
    if [ "$(cat "$qdir/stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$qdir/root/usr/bin/qemu-system-x86_64" ]; then
        log "fetching qemu-system-x86 $want (unpacked under $qdir, not installed)"
        rm -rf "$qdir"
        mkdir -p "$qdir/debs" "$qdir/root"
        # What an installation would add: exactly the packages this host lacks.
        mapfile -t pkgs < <(apt-get install -s --no-install-recommends qemu-system-x86 2>/dev/null |
            awk '/^Inst / {v = $3; gsub(/[()]/, "", v); print $2 "=" v}')
        [ ${#pkgs[@]} -gt 0 ] || die "apt-get install -s qemu-system-x86 listed nothing to fetch"
        apt_download "$qdir/debs" "${pkgs[@]}" || die "apt-get download of qemu-system-x86 and its libraries failed"
        for deb in "$qdir"/debs/*.deb; do dpkg -x "$deb" "$qdir/root"; done
        rm -rf "$qdir/debs"
        echo "$want" >"$qdir/stamp"
    fi
    qemu=$qdir/root/usr/bin/qemu-system-x86_64
    qemu_env="LD_LIBRARY_PATH=$qdir/root/usr/lib/x86_64-linux-gnu:$qdir/root/lib/x86_64-linux-gnu QEMU_MODULE_DIR=$qdir/root/usr/lib/x86_64-linux-gnu/qemu"
    qemu_data=$qdir/root/usr/share/qemu
    # shellcheck disable=SC2086 # qemu_env is a list of NAME=VALUE words
    missing=$(env $qemu_env ldd "$qemu" | grep "not found" || true)
    [ -z "$missing" ] || die "the unpacked qemu lacks libraries: $missing"
fi

# --- kernel -------------------------------------------------------------------------------------
kernel_package() {
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] && echo "$pkg $(candidate "$pkg")"
}
read -r kpkg kver < <(resolved kernel kernel_package) || true
if [ -z "${kpkg:-}" ] || [ -z "${kver:-}" ]; then
    die "cannot resolve linux-image-cloud-amd64 to a kernel package (apt-get update?)"
fi
kdir=$dir/kernel
if [ "$(cat "$kdir/stamp" 2>/dev/null)" != "$kpkg $kver" ]; then
    log "fetching $kpkg $kver (unpacked under $kdir, not installed)"
    rm -rf "$kdir"
    mkdir -p "$kdir/deb"
    apt_download "$kdir/deb" "$kpkg=$kver" || die "apt-get download $kpkg failed"
    dpkg -x "$kdir"/deb/*.deb "$kdir/root"
    rm -rf "$kdir/deb"
    echo "$kpkg $kver" >"$kdir/stamp"
fi
kernel=$(ls "$kdir"/root/boot/vmlinuz-*)
modroot=$(ls -d "$kdir"/root/lib/modules/*)

# --- initramfs ----------------------------------------------------------------------------------
# The modules in load order: each one's `depends=` (from its .modinfo) first.
declare -A loaded=()
order=()
load() {
    local m=$1 f deps d
    [ -z "${loaded[$m]:-}" ] || return 0
    f=$(find "$modroot/kernel" -name "$m.ko" -print -quit)
    [ -n "$f" ] || die "module $m is not in $kpkg"
    deps=$(grep -a -o 'depends=[[:print:]]*' "$f" | head -1 | cut -d= -f2)
    for d in ${deps//,/ }; do load "$d"; done
    loaded[$m]=$f
    order+=("$m")
}
for m in virtio_mmio virtio_blk overlay; do load "$m"; done
irdstamp="$kpkg $kver $(sha256sum "$here/initramfs-init" | cut -d' ' -f1) $(stat -c '%s %Y' /bin/busybox) ${order[*]}"
if [ "$(cat "$dir/initrd.stamp" 2>/dev/null)" != "$irdstamp" ] || [ ! -s "$dir/initrd.gz" ]; then
    log "building the initramfs (${order[*]})"
    ird=$dir/initrd.d
    rm -rf "$ird"
    mkdir -p "$ird"/{bin,dev,proc,sys,newroot,modules}
    cp /bin/busybox "$ird/bin/busybox"
    for m in "${order[@]}"; do cp "${loaded[$m]}" "$ird/modules/"; done
    printf '%s\n' "${order[@]}" >"$ird/modules/order"
    install -m 0755 "$here/initramfs-init" "$ird/init"
    (cd "$ird" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$dir/initrd.gz.new"
    mv "$dir/initrd.gz.new" "$dir/initrd.gz"
    rm -rf "$ird"
    echo "$irdstamp" >"$dir/initrd.stamp"
fi

# --- base root disk -----------------------------------------------------------------------------
# Programs: whole packages where the tests' scripts may call anything of them, plus containerd's.
progs=()
for pkg in bash coreutils util-linux mount grep sed mawk findutils procps gzip tar; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || continue
    while read -r f; do
        case "$f" in */bin/* | */sbin/*) [ -f "$f" ] && [ ! -L "$f" ] && progs+=("$f") ;; esac
    done < <(dpkg -L "$pkg")
done
for p in containerd ctr runc containerd-shim-runc-v2 containerd-shim containerd-shim-runc-v1; do
    if f=$(command -v "$p"); then
        progs+=("$f")
    else
        case $p in containerd | ctr | runc) die "$p is not installed (scripts/setup.sh installs it)" ;; esac
    fi
done
# Symlinked commands the scripts call by their usual names (awk is an alternative of mawk).
links=()
for l in /usr/bin/awk /bin/sh; do [ -L "$l" ] && links+=("$l"); done

# The disk is rebuilt when a program, the payload's binaries' set of libraries or the installed
# packages (a new glibc) change; the payload's binaries themselves change on every build, and
# their libraries are looked up only then.
libs_of() { { ldd "$1" 2>/dev/null || true; } | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'; }
elves_key=$(stat -c '%n %s %Y' "${extra_elves[@]}" /dev/null | sha256sum | cut -d' ' -f1)
if [ "$(head -1 "$dir/payload-libs" 2>/dev/null)" = "$elves_key" ]; then
    mapfile -t elf_libs < <(tail -n +2 "$dir/payload-libs")
else
    mapfile -t elf_libs < <(for f in "${extra_elves[@]}"; do libs_of "$f"; done | sort -u)
    printf '%s\n' "$elves_key" "${elf_libs[@]}" >"$dir/payload-libs"
fi
manifest=$( {
    echo "kernel $kpkg $kver"
    stat -c '%n %s %Y' "$here/node-init" /bin/busybox /var/lib/dpkg/status "${progs[@]}"
    printf '%s\n' "${elf_libs[@]}"
    for l in "${links[@]}"; do echo "$l -> $(readlink "$l")"; done
} | sha256sum | cut -d' ' -f1)
if [ "$(cat "$dir/base.stamp" 2>/dev/null)" != "$manifest" ] || [ ! -s "$dir/base.img" ]; then
    mapfile -t libs < <({ for f in "${progs[@]}"; do libs_of "$f"; done; printf '%s\n' "${elf_libs[@]}"; } | grep . | sort -u)
    log "building the base disk (${#progs[@]} programs, ${#libs[@]} libraries)"
    st=$dir/base.d
    rm -rf "$st"
    mkdir -p "$st"
    # The host's /usr merge, so that /bin/sh, /lib64/ld-linux… and /usr/bin/… all resolve.
    for top in bin sbin lib lib64; do
        if [ -L "/$top" ]; then ln -s "$(readlink "/$top")" "$st/$top"; fi
    done
    mkdir -p "$st"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,run,root,mnt,var/lib,var/tmp,usr/lib/kiln-vm/bin}
    copy() { mkdir -p "$st$(dirname "$1")" && cp -L --preserve=mode "$1" "$st$1"; }
    for f in "${progs[@]}" "${libs[@]}"; do copy "$f"; done
    for l in "${links[@]}"; do
        mkdir -p "$st$(dirname "$l")"
        ln -sfn "$(readlink -f "$l")" "$st$l"
    done
    cp /bin/busybox "$st/usr/lib/kiln-vm/busybox"
    # busybox only for what the host's packages did not bring (it comes last on PATH).
    for a in $(/bin/busybox --list); do
        ln -s ../busybox "$st/usr/lib/kiln-vm/bin/$a"
    done
    install -m 0755 "$here/node-init" "$st/sbin/kiln-node-init"
    echo "root:x:0:0:root:/root:/bin/bash" >"$st/etc/passwd"
    echo "root:x:0:" >"$st/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files\n' >"$st/etc/nsswitch.conf"
    echo "127.0.0.1 localhost kiln-v2" >"$st/etc/hosts"
    echo kiln-v2 >"$st/etc/hostname"
    ln -s /proc/self/mounts "$st/etc/mtab"
    size=$(($(du -sm "$st" | cut -f1) * 5 / 4 + 64))
    rm -f "$dir/base.img"
    mke2fs -q -t ext4 -O ^has_journal -L kiln-base -d "$st" -F "$dir/base.img" "${size}M" >&2 ||
        die "mke2fs of the base disk failed"
    rm -rf "$st"
    echo "$manifest" >"$dir/base.stamp"
fi

echo "QEMU=$qemu"
echo "QEMU_ENV=$qemu_env"
echo "QEMU_DATA=$qemu_data"
echo "KERNEL=$kernel"
echo "INITRD=$dir/initrd.gz"
echo "BASE=$dir/base.img"
echo "KERNEL_PACKAGE=$kpkg $kver"
