#!/usr/bin/env bash
# Installs the Debian packages simg needs to build and test, only if some are missing:
# the C libraries it links (libaio, zlib, zstd, libdeflate), qemu-utils (qemu-img, qemu-io and qemu-nbd, which
# the interoperability tests and the demo drive), strace (the crash-consistency tests kill simg
# at exact write boundaries with its fault injection) and libnbd-bin (nbdinfo: the bitmap tests read
# dirty bitmaps through a qemu-nbd export) and xfsprogs (mkfs.xfs: the reflink tests clone into an
# XFS made with reflink=1 on a loop device).
set -euo pipefail

packages=(libaio-dev zlib1g-dev libzstd-dev libdeflate-dev qemu-utils strace libnbd-bin xfsprogs)

missing=()
for package in "${packages[@]}"; do
    if ! dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
