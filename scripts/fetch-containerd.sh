#!/usr/bin/env bash
# Fetches the binaries of another Debian containerd release into a directory of our own,
# without installing it: Kiln is tested against containerd 1.6 (bookworm), 1.7 (trixie) and
# 2.x (sid). The suite is added to apt's sources with pin priority 1, so nothing on the
# machine is ever upgraded from it; `apt-get download` + `dpkg -x` unpack the one package.
#
#   fetch-containerd.sh SUITE DEST     e.g. fetch-containerd.sh trixie target/containerd/trixie
#
# Prints the directory holding `containerd` and `ctr` (DEST/usr/bin). Idempotent.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SUITE DEST" >&2; exit 2; }
suite=$1
dest=$(realpath -m "$2")
if [ -x "$dest/usr/bin/containerd" ] && [ -x "$dest/usr/bin/ctr" ]; then
  echo "$dest/usr/bin"
  exit 0
fi
list=/etc/apt/sources.list.d/kiln-$suite.sources
pin=/etc/apt/preferences.d/kiln-$suite
if [ ! -f "$list" ]; then
  cat >"$list" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >"$pin" <<PIN
Package: *
Pin: release n=$suite
Pin-Priority: 1
PIN
  apt-get update -qq >&2
fi
version=$(apt-cache madison containerd | awk -v s="$suite" '$0 ~ "/debian "s"/" || $0 ~ " "s"/main" {print $3; exit}')
if [ -z "$version" ]; then
  # madison prints "containerd | VERSION | URL SUITE/main amd64 Packages"
  version=$(apt-cache madison containerd | grep " $suite/" | awk '{print $3}' | head -1)
fi
[ -n "$version" ] || { echo "no containerd package in suite $suite" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "containerd=$version" >&2)
mkdir -p "$dest"
dpkg -x "$work"/containerd_*.deb "$dest"
echo "$dest/usr/bin"
