#!/usr/bin/env python3
"""Build a minimal Linux busybox OCI image tarball from the host's busybox.

Used to compare Kiln with runc on the same containerd: the image has the
same layout as the ones `kiln image build` writes (OCI image layout plus a
Docker manifest.json, one uncompressed layer, reproducible output), but holds
a native static busybox instead of a Wasm module.

With --pause it builds the CRI sandbox image instead: the static binary PAUSE
(scripts/lib/pause.c) as /pause, the entrypoint. A private containerd with the
CRI plugin has no internet to pull registry.k8s.io's, so it uses this one.
With --exe it does the same for any static program (scripts/bench-http.sh's
native echo server): EXE as /NAME (its file name), the entrypoint.

Usage:
    scripts/make-busybox-image.py OUT.tar [--ref kiln-test/busybox:latest]
                                          [--busybox /bin/busybox | --pause PAUSE | --exe EXE]

Needs Debian's busybox-static package (`apt-get install busybox-static`):
the image has no libc, so a dynamically linked busybox would not run.
Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import struct
import sys
import tarfile

DEFAULT_REF = "kiln-test/busybox:latest"
DEFAULT_BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "echo", "sleep", "cat", "ls", "true"]
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FIXED_MTIME = 0  # reproducible output: same busybox -> same digests

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

# ELF e_machine -> OCI architecture.
ELF_MACHINES = {62: "amd64", 183: "arm64"}
PT_INTERP = 3


class Error(Exception):
    """A user-facing error."""


def elf_info(path: str) -> tuple[str, bool]:
    """Return (OCI architecture, is_static) of the ELF file at `path`."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise Error(f"{path} is not an ELF executable")
    if data[4] != 2:
        raise Error(f"{path} is not a 64-bit ELF executable")
    endian = "<" if data[5] == 1 else ">"
    (e_machine,) = struct.unpack_from(endian + "H", data, 18)
    (e_phoff,) = struct.unpack_from(endian + "Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from(endian + "HH", data, 54)
    arch = ELF_MACHINES.get(e_machine)
    if arch is None:
        raise Error(f"{path}: unsupported ELF machine {e_machine}")
    static = True
    for i in range(e_phnum):
        (p_type,) = struct.unpack_from(endian + "I", data, e_phoff + i * e_phentsize)
        # A static-pie binary has PT_DYNAMIC but no interpreter; only an
        # interpreter (ld.so) means it needs shared libraries.
        if p_type == PT_INTERP:
            static = False
    return arch, static


_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def normalise_ref(ref: str) -> tuple[str, str, str]:
    """Normalise like Docker; return (full, familiar, tag)."""
    if not ref or "@" in ref:
        raise Error(f"invalid image reference {ref!r} (give NAME[:TAG])")
    slash = ref.rfind("/") + 1
    colon = ref.rfind(":", slash)
    name, tag = (ref[:colon], ref[colon + 1:]) if colon >= 0 else (ref, "latest")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    if not _TAG.match(tag) or not all(_COMPONENT.match(c) for c in path.split("/")):
        raise Error(f"invalid image reference {ref!r}")
    full = f"{domain}/{path}:{tag}"
    if domain != "docker.io":
        familiar = full
    elif path.startswith("library/") and "/" not in path[len("library/"):]:
        familiar = f"{path[len('library/'):]}:{tag}"
    else:
        familiar = f"{path}:{tag}"
    return full, familiar, tag


def tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    """A TarInfo with the fixed metadata every entry gets."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = FIXED_MTIME
    return info


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def to_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def build(busybox_path: str, ref: str, pause: bool = False,
          exe: bool = False) -> tuple[bytes, str, str]:
    """Return (tarball bytes, full reference, manifest digest). With `pause`, busybox_path is
    the pause binary and the image is the CRI sandbox image; with `exe`, it is a static
    program, the image's only file and its entrypoint."""
    full_ref, familiar, tag = normalise_ref(ref)
    if exe and not os.path.exists(busybox_path):
        raise Error(f"{busybox_path} not found")
    if not os.path.exists(busybox_path):
        if pause:
            raise Error(f"{busybox_path} not found (build scripts/lib/pause.c with cc -static)")
        raise Error(
            f"{busybox_path} not found; install Debian's busybox-static package "
            "(apt-get install busybox-static)"
        )
    arch, static = elf_info(busybox_path)
    if not static:
        if exe:
            raise Error(f"{busybox_path} is dynamically linked; the image has no libc")
        if pause:
            raise Error(f"{busybox_path} is dynamically linked; build it with cc -static")
        raise Error(
            f"{busybox_path} is dynamically linked; install busybox-static "
            "(apt-get install busybox-static), which replaces the busybox package"
        )
    with open(busybox_path, "rb") as f:
        binary = f.read()

    if pause or exe:
        name = "pause" if pause else os.path.basename(busybox_path)
        layer = make_tar([(tar_info(name, tarfile.REGTYPE, 0o755, len(binary)), binary)])
        image_config = {"Env": [ENV_PATH], "Entrypoint": [f"/{name}"]}
        comment = "CRI sandbox (pause)" if pause else f"static {name}"
    else:
        layer = make_tar(
            [(tar_info("bin/", tarfile.DIRTYPE, 0o755), None),
             (tar_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary)]
            + [(tar_info(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox"), None)
               for a in APPLETS]
        )
        image_config = {"Env": [ENV_PATH], "Cmd": ["/bin/sh"]}
        comment = "static busybox"
    layer_digest = sha256(layer)

    config = to_json({
        "architecture": arch,
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "make-busybox-image.py", "comment": comment}],
    })
    config_digest = sha256(config)

    manifest = to_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": len(layer)}],
    })
    manifest_digest = sha256(manifest)

    index = to_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest),
            "annotations": {
                "io.containerd.image.name": full_ref,
                "org.opencontainers.image.ref.name": tag,
            },
            "platform": {"architecture": arch, "os": "linux"},
        }],
    })

    def blob(digest: str) -> str:
        return "blobs/sha256/" + digest.split(":", 1)[1]

    docker_manifest = to_json([{
        "Config": blob(config_digest),
        "RepoTags": [familiar],
        "Layers": [blob(layer_digest)],
    }])

    def file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        return tar_info(name, tarfile.REGTYPE, 0o644, len(data)), data

    image = make_tar([
        file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        file("index.json", index),
        file("manifest.json", docker_manifest),
        (tar_info("blobs/", tarfile.DIRTYPE, 0o755), None),
        (tar_info("blobs/sha256/", tarfile.DIRTYPE, 0o755), None),
        file(blob(layer_digest), layer),
        file(blob(config_digest), config),
        file(blob(manifest_digest), manifest),
    ])
    return image, full_ref, manifest_digest


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Build a static busybox OCI image tarball (linux, uncompressed layer).")
    parser.add_argument("output", metavar="OUT.tar", help="tarball to write")
    parser.add_argument("--ref", default=DEFAULT_REF,
                        help=f"image reference (default: {DEFAULT_REF})")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--busybox", default=DEFAULT_BUSYBOX,
                      help=f"static busybox binary to pack (default: {DEFAULT_BUSYBOX})")
    what.add_argument("--pause", metavar="PAUSE",
                      help="build the CRI sandbox image from this static pause binary instead")
    what.add_argument("--exe", metavar="EXE",
                      help="build an image of this static program (as /NAME, the entrypoint)")
    args = parser.parse_args()
    try:
        if args.pause:
            image, full_ref, digest = build(args.pause, args.ref, pause=True)
        elif args.exe:
            image, full_ref, digest = build(args.exe, args.ref, exe=True)
        else:
            image, full_ref, digest = build(args.busybox, args.ref)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        tmp = os.path.join(out_dir, f".{os.path.basename(args.output)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(image)
            os.replace(tmp, args.output)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except (Error, OSError) as e:
        print(f"make-busybox-image: error: {e}", file=sys.stderr)
        return 1
    print(f"{full_ref} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
