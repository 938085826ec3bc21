#!/usr/bin/env bash
# Makes the fuzzer's seed corpus: small images (a few KiB each, at most 256 KiB) that reach the
# interesting parts of the qcow2 and raw/probe read paths, made with qemu-img and qemu-io.
#
#   scripts/fuzz-seeds.sh OUT_DIR
#
# Names the seeds give (backing file "backing.raw", external data file "data.raw") are files
# the fuzz harness provides in its private folder, so the fuzzer can follow them there.
set -euo pipefail

out=${1:?usage: fuzz-seeds.sh OUT_DIR}
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "fuzz-seeds.sh: $tool is missing (make deps installs qemu-utils)" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/simg-fuzz-seeds.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

maxlen=$((256 * 1024))
count=0
# keep NAME FILE: copies FILE into the corpus if it is small enough for the fuzzer.
keep() {
    local size
    size=$(stat -c %s "$2")
    if [ "$size" -le "$maxlen" ]; then
        cp "$2" "$out/$1"
        count=$((count + 1))
    else
        echo "fuzz-seeds.sh: $1 is $size bytes, over $maxlen: left out" >&2
    fi
}
qimg() { qemu-img "$@" >/dev/null; }
qio() { qemu-io "$@" >/dev/null; }

# Helper files the seeds name (the harness has its own with the same names).
qimg create -f raw backing.raw 64k
qio -f raw -c "write -P 0x5a 0 64k" backing.raw
qimg create -f raw data.raw 64k

# Plain qcow2 v3 and v2 with data, zero clusters, discarded clusters, at small cluster sizes.
for cs in 512 1024 4096; do
    qimg create -f qcow2 -o cluster_size=$cs v3-$cs.qcow2 256k
    qio -c "write -P 0x11 0 3k" -c "write -z 8k 4k" -c "write -P 0x22 20k 1k" \
        -c "discard 20k 1k" -c "write -P 0x33 100k 5k" v3-$cs.qcow2
    keep "qcow2-v3-cluster$cs.qcow2" v3-$cs.qcow2
done
qimg create -f qcow2 -o compat=0.10,cluster_size=1024 v2.qcow2 128k
qio -c "write -P 0x44 0 2k" -c "write -z 4k 2k" -c "write -P 0x45 64k 1k" v2.qcow2
keep qcow2-v2-cluster1024.qcow2 v2.qcow2
qimg create -f qcow2 -o cluster_size=512 empty.qcow2 1M
keep qcow2-empty.qcow2 empty.qcow2
# Refcount widths other than 16 bits.
for bits in 1 8 64; do
    qimg create -f qcow2 -o cluster_size=512,refcount_bits=$bits rc$bits.qcow2 64k
    qio -c "write -P 0x66 0 2k" rc$bits.qcow2
    keep "qcow2-refcount-bits$bits.qcow2" rc$bits.qcow2
done

# Compressed clusters, zlib and zstd.
qimg create -f raw src.raw 64k
qio -f raw -c "write -P 0x61 0 16k" -c "write -P 0x62 32k 4k" -c "write -P 0x63 40k 2k" src.raw
for ct in zlib zstd; do
    for cs in 512 4096; do
        qimg convert -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$ct src.raw c.qcow2
        keep "qcow2-compressed-$ct-cluster$cs.qcow2" c.qcow2
    done
done

# Extended L2 entries (subclusters): needs 16 KiB clusters.
qimg create -f qcow2 -o extended_l2=on,cluster_size=16384 x.qcow2 256k
qio -c "write -P 0x71 0 1k" -c "write -z 2k 1k" -c "write -P 0x72 17k 512" x.qcow2
keep qcow2-extended-l2.qcow2 x.qcow2

# Snapshots (internal), and a persistent dirty bitmap.
qimg create -f qcow2 -o cluster_size=512 snap.qcow2 64k
qio -c "write -P 0x81 0 2k" snap.qcow2
qimg snapshot -c first snap.qcow2
qio -c "write -P 0x82 1k 2k" snap.qcow2
qimg snapshot -c second snap.qcow2
keep qcow2-snapshots.qcow2 snap.qcow2
qimg create -f qcow2 -o cluster_size=4096 bm.qcow2 64k
if qemu-img bitmap --add bm.qcow2 b0 >/dev/null 2>&1; then
    qio -c "write -P 0x91 0 4k" bm.qcow2
    keep qcow2-bitmap.qcow2 bm.qcow2
fi

# Backing file (raw, and qcow2 with a backing format extension), external data file.
qimg create -f qcow2 -o cluster_size=512 -b backing.raw -F raw over.qcow2 64k
qio -c "write -P 0xa1 4k 1k" -c "write -z 8k 1k" over.qcow2
keep qcow2-backing-raw.qcow2 over.qcow2
# The backing file is qcow2: the harness's backing.qcow2 (over backing.raw), a chain of three.
qimg create -f qcow2 -o cluster_size=512 -b backing.raw -F raw backing.qcow2 512k
qimg create -f qcow2 -o cluster_size=512 -b backing.qcow2 -F qcow2 over2.qcow2 1M
qio -c "write -P 0xa2 0 1k" -c "write -z 600k 1k" over2.qcow2
keep qcow2-backing-qcow2.qcow2 over2.qcow2
# A chain that comes back to itself (the harness names its input "input").
qimg create -f qcow2 -o cluster_size=512 -u -b input -F qcow2 loop.qcow2 64k
keep qcow2-backing-loop.qcow2 loop.qcow2
qimg create -f qcow2 -o data_file=data.raw,cluster_size=4096 ext.qcow2 64k
qio -c "write -P 0xb1 0 8k" ext.qcow2
keep qcow2-data-file.qcow2 ext.qcow2
qimg create -f qcow2 -o data_file=data.raw,data_file_raw=on,cluster_size=4096 extraw.qcow2 64k
keep qcow2-data-file-raw.qcow2 extraw.qcow2

# Lazy refcounts, and an image marked dirty the way a crash leaves it is left to the fuzzer.
qimg create -f qcow2 -o lazy_refcounts=on,cluster_size=512 lazy.qcow2 64k
qio -c "write -P 0xc1 0 1k" lazy.qcow2
keep qcow2-lazy-refcounts.qcow2 lazy.qcow2

# Raw images: data, zeros, an odd size.
qimg create -f raw r.raw 16k
qio -f raw -c "write -P 0xd1 0 4k" r.raw
keep raw-data.raw r.raw
head -c 4096 /dev/zero > z.raw
keep raw-zeros.raw z.raw
head -c 1000 /dev/urandom > odd.raw
keep raw-odd-size.raw odd.raw

# Other formats' headers, for the probe (the first 4 KiB is enough to recognise them).
for fmt in vmdk vdi vpc vhdx qed parallels qcow; do
    if qemu-img create -q -f $fmt other.$fmt 1M >/dev/null 2>&1; then
        head -c 4096 other.$fmt > head.$fmt
        keep "probe-$fmt.$fmt" head.$fmt
    fi
done
# A fixed-size VHD has its footer at the end only.
if qemu-img create -q -f vpc -o subformat=fixed fixed.vpc 64k >/dev/null 2>&1; then
    keep probe-vpc-fixed.vpc fixed.vpc
fi
printf 'version=1\nCID=fffffffe\n' > desc.vmdk
keep probe-vmdk-descriptor.vmdk desc.vmdk

echo "fuzz-seeds.sh: $count seeds in $out"
