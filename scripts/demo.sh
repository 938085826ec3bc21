#!/usr/bin/env bash
# `make demo`: makes a sample qcow2 image with real content using simg and qemu-io, then shows
# what simg reports about it. The images are left in $DEMO_DIR (a new temporary folder unless set).
set -euo pipefail
cd "$(dirname "$0")/.."

SIMG=${SIMG:-$PWD/.build/release/simg}
DEMO_DIR=${DEMO_DIR:-$(mktemp -d /tmp/simg-demo.XXXXXX)}
mkdir -p "$DEMO_DIR"
cd "$DEMO_DIR"

# Shows a command (quoted so it can be pasted into a shell), then runs it.
step() {
    printf '\n$'
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then printf ' %s' "$word"; else printf " '%s'" "$word"; fi
    done
    printf '\n'
    "$@"
}
simg() { "$SIMG" "$@"; }

echo "simg demo in $DEMO_DIR (binary: $SIMG)"
rm -f disk.qcow2 overlay.qcow2 disk.raw

step simg --version
step simg create -f qcow2 -o cluster_size=64k,lazy_refcounts=off disk.qcow2 256M

# Content: two data patterns, a zeroed range and a compressed cluster, written by QEMU's own tool.
step qemu-io -c 'write -P 0xaa 0 4M' -c 'write -P 0x55 100M 1M' -c 'write -z 200M 2M' \
    -c 'write -c -P 0x11 250M 64k' disk.qcow2
step qemu-img snapshot -c first-boot disk.qcow2

step simg info disk.qcow2
step simg info --output=json disk.qcow2

# An overlay on top of it: a backing chain.
step simg create -f qcow2 -b disk.qcow2 -F qcow2 overlay.qcow2
step qemu-io -c 'write -P 0xcc 1M 64k' overlay.qcow2
step simg info --backing-chain overlay.qcow2

# simg's report is qemu-img's, byte for byte.
for output in human json; do
    if cmp -s <("$SIMG" info --output=$output --backing-chain overlay.qcow2) \
              <(qemu-img info --output=$output --backing-chain overlay.qcow2); then
        echo "simg info --output=$output --backing-chain: identical to qemu-img's"
    else
        echo "simg info --output=$output --backing-chain: DIFFERS from qemu-img's" >&2
        exit 1
    fi
done

# QEMU agrees the images simg made are sound.
step qemu-img check disk.qcow2
step qemu-img check overlay.qcow2

# --- convert -----------------------------------------------------------------------------------
# Runs once simg has a convert command: flattens the chain to raw and checks the data is the same.
if "$SIMG" convert --help >/dev/null 2>&1; then
    step simg convert -O raw overlay.qcow2 disk.raw
    step qemu-img compare -f qcow2 -F raw overlay.qcow2 disk.raw
    step simg info disk.raw
else
    echo
    echo "(simg convert is not available yet: the convert step of this demo is skipped)"
fi
# -----------------------------------------------------------------------------------------------

echo
echo "Demo images are in $DEMO_DIR"
