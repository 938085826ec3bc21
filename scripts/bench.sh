#!/usr/bin/env bash
# simg against qemu-img on the same inputs (issue 3, "Benchmark"; commit, snapshot, resize: issue 12;
# amend: A; compare: K; map: L, measure: N; issue 14: G, H, 3Z, X, XC, Y, YC).
#
# Makes its inputs once in BENCH_DIR (kept between runs while they are valid), then for every
# workload runs simg and qemu-img in turn (simg, qemu-img, simg, qemu-img, ...) BENCH_RUNS times
# each with a fresh output every run, timing each run with GNU time (wall seconds, peak RSS).
# Every simg output is checked once against its source with `qemu-img compare` (and `qemu-img
# check` for qcow2), so a fast but wrong result cannot win. Prints a markdown table.
#
# Environment:
#   BENCH_DIR     work folder (default /var/tmp/simg-bench); must support O_DIRECT
#   BENCH_RUNS    timed runs per tool and workload (default 5)
#   BENCH_ONLY    workloads to run, comma separated, from: 1,1T,2,3,C,R,M,S,Z,A,K,L,N,G,H,3Z,X,XC,
#                 Y,YC (default all; C is check, R rebase, M commit, S snapshot, Z resize, A amend,
#                 K compare, L map, N measure; X, XC, Y and YC need root: they mount an XFS)
#   BENCH_REPEAT  invocations timed together in workloads L and N (default 50): one run of either
#                 takes milliseconds, below GNU time's 10 ms resolution
#   BENCH_TOOLS   simg,qemu-img (default both); the tuning script runs simg alone
#   SIMG          simg binary (default <repo>/.build/release/simg, what `make release` builds)
#   SIMG_ARGS     extra options given to `simg convert` (e.g. "--buffer-size 2M --queue-depth 16")
#   BENCH_VERIFY  1 (default) checks simg's output once per workload; 0 skips it
#   BENCH_STATS   1 (default) makes one extra, untimed simg run with --stats and prints its JSON
#   BENCH_TSV     if set, appends "workload tool median_s peak_rss_kib runs" rows to this file
#
# Workloads (the same cache flags for both tools):
#   1   w1.qcow2 (4 GiB virtual: 1.5 GiB random, 0.5 GiB written zeros, holes) -> raw, -t none
#   1T  the same with -t none -T none
#   2   w1.raw (the raw version of w1.qcow2, written zeros allocated) -> qcow2, -t none
#   3   text.raw (512 MiB of generated, compressible log text) -> qcow2, -c
#   R   rebase: a fresh copy of rov.qcow2 (empty overlay over w1.qcow2) onto rbase2.qcow2 (w1 with
#       1 MiB of every 4 MiB rewritten); the copy is made before the timer starts
#   M   commit: a fresh copy of ctop.qcow2 (4 GiB overlay holding w1's 1.5 GiB of data and its
#       zeros) and its empty base cbase.qcow2, then `commit ctop.qcow2` (qemu-img: a mirror job)
#   S   snapshot -c then -d on a fresh copy of check256.qcow2 (256G, preallocation=metadata:
#       every cluster's refcount changes twice)
#   Z   resize of a fresh 64M qcow2 to 16T and back with --shrink; BENCH_RESIZE_RUNS runs
#       (default 1: qemu-img's shrink takes minutes, it allocates and frees 32,767 L2 tables)
#   A   amend -o refcount_bits=64 on a fresh copy of w1.qcow2 (4 GiB, 2 GiB allocated): every
#       refcount rewritten at the new width; the copy is made before the timer starts
#   K   compare -f qcow2 -F raw w1.qcow2 w1.raw (identical: 2 GiB of data clusters read and
#       compared on both sides, the holes not read); simg is verified by its exit status 0
#   L   map --output=json frag.qcow2 (4 GiB virtual, 64 KiB clusters, 20,000 4 KiB writes at
#       scattered offsets: ~17,000 clusters allocated in write order, ~30,000 map entries),
#       BENCH_REPEAT invocations in a row per timed run; verified byte for byte against qemu-img's
#   N   measure -O qcow2 w1.qcow2, BENCH_REPEAT invocations in a row per timed run; verified
#       against qemu-img's output, human and --output=json
#   G   cloud.qcow2 (3 GiB virtual, 1.5 GiB of a tar of /usr, `qemu-img convert -c`) -> raw,
#       default cache (as users convert cloud images)
#   H   cloud.qcow2 -> qcow2 (uncompressed), default cache
#   3Z  text.raw -> qcow2, -c -o compression_type=zstd
#   X   on a fresh XFS (reflink=1, loop device): xsrc.raw (4 GiB, fully allocated random) -> raw
#       on the same XFS, both tools at their defaults (simg clones; qemu-img copies)
#   XC  the same, qemu-img given -C (copy_file_range, which clones on XFS); simg at its default
#   Y   on the XFS: xsrc.qcow2 (xsrc.raw as qcow2, every cluster allocated) -> qcow2, defaults
#   YC  the same, qemu-img given -C
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/simg-bench}
BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_ONLY=${BENCH_ONLY:-1,1T,2,3,C,R,M,S,Z,A,K,L,N,G,H,3Z,X,XC,Y,YC}
BENCH_REPEAT=${BENCH_REPEAT:-50}
BENCH_TOOLS=${BENCH_TOOLS:-simg,qemu-img}
SIMG=${SIMG:-$repo/.build/release/simg}
SIMG_ARGS=${SIMG_ARGS:-}
BENCH_VERIFY=${BENCH_VERIFY:-1}
BENCH_STATS=${BENCH_STATS:-1}
BENCH_TSV=${BENCH_TSV:-}

MiB=$((1024 * 1024))
GiB=$((1024 * MiB))
# Bump when the input layout changes: inputs with another stamp are made again.
LAYOUT="simg-bench layout 1"
# The XFS of workloads X, XC, Y, YC: a sparse file in BENCH_DIR on a loop device, mounted here
# for the run only (made by setup_xfs, always unmounted and detached by cleanup).
XFS_MNT=$BENCH_DIR/xfs.mnt
XFS_LOOP=""

say() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

have_tool() { [[ ",$BENCH_TOOLS," == *",$1,"* ]]; }

# ---------------------------------------------------------------------------------------------
# Tools

ensure_gnu_time() {
    if [ -x /usr/bin/time ] && /usr/bin/time -f '%e %M' true >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" -eq 0 ]; then
        say "installing GNU time (package time)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends time >&2 \
            || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y --no-install-recommends time >&2; }
    else
        die "GNU time (/usr/bin/time) is missing: install the 'time' package"
    fi
}

check_tools() {
    command -v qemu-img >/dev/null || die "qemu-img is missing (make deps installs qemu-utils)"
    command -v qemu-io >/dev/null || die "qemu-io is missing (make deps installs qemu-utils)"
    ensure_gnu_time
    if have_tool simg; then
        [ -x "$SIMG" ] || die "$SIMG is not there: build it first (make release)"
    fi
}

# ---------------------------------------------------------------------------------------------
# Work folder and inputs

free_kib() { df -Pk "$BENCH_DIR" | awk 'NR == 2 { print $4 }'; }

check_space() {
    local need_gib=$1 free
    free=$(free_kib)
    if [ "$free" -lt $((need_gib * 1024 * 1024)) ]; then
        die "$BENCH_DIR has $((free / 1024)) MiB free; the benchmark needs about ${need_gib} GiB"
    fi
}

check_odirect() {
    local probe=$BENCH_DIR/.odirect-probe
    if ! dd if=/dev/zero of="$probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
        rm -f "$probe"
        die "$BENCH_DIR: the filesystem refuses O_DIRECT; set BENCH_DIR to a folder on one that allows it"
    fi
    rm -f "$probe"
}

# w1 layout, per 256 MiB group (16 groups = 4 GiB virtual), offsets in MiB within the group:
#   [0,48) random  [48,64) hole  [64,96) written zeros  [96,144) random  [144,256) hole
# 16 x 96 MiB = 1.5 GiB random data, 16 x 32 MiB = 0.5 GiB written zeros, 2 GiB holes.
W1_GROUPS=16
W1_GROUP_MIB=256

make_w1() {
    local raw=$BENCH_DIR/w1.raw qcow=$BENCH_DIR/w1.qcow2 g base zeros_cmds=()
    say "making w1.raw (4 GiB: 1.5 GiB random, 0.5 GiB written zeros, holes)"
    rm -f "$raw" "$qcow"
    truncate -s $((W1_GROUPS * W1_GROUP_MIB))M "$raw"
    for ((g = 0; g < W1_GROUPS; g++)); do
        base=$((g * W1_GROUP_MIB))
        dd if=/dev/urandom of="$raw" bs=1M seek=$((base + 0)) count=48 conv=notrunc status=none
        dd if=/dev/zero of="$raw" bs=1M seek=$((base + 64)) count=32 conv=notrunc status=none
        dd if=/dev/urandom of="$raw" bs=1M seek=$((base + 96)) count=48 conv=notrunc status=none
        zeros_cmds+=(-c "write -q -P 0 $(((base + 64) * MiB)) 32M")
    done
    sync "$raw"

    say "making w1.qcow2 from it"
    # qemu-img convert detects the zeros and leaves those clusters unallocated, so they are
    # written again with qemu-io: `write -P 0` is an ordinary data write whose bytes are zero
    # (not `write -z`), so they become allocated data clusters that a converter has to read.
    qemu-img convert -f raw -O qcow2 "$raw" "$qcow"
    qemu-io -f qcow2 "${zeros_cmds[@]}" "$qcow" >/dev/null
    qemu-img check -q "$qcow"
}

# 512 MiB of log lines: a few fixed words with varying numbers, as real logs compress.
make_text() {
    local text=$BENCH_DIR/text.raw
    say "making text.raw (512 MiB of generated log text)"
    rm -f "$text"
    awk -v limit=$((512 * MiB)) 'BEGIN {
        split("sshd cron kernel nginx postgres systemd dockerd kubelet", daemon, " ")
        split("Accepted publickey for|session opened for user|connection reset by peer|GET /api/v1/items?page=|checkpoint complete: wrote|Started Daily apt upgrade and clean activities|pulling image layer|PLEG relist took", what, "|")
        split("alice bob carol dave erin frank", user, " ")
        srand(7); total = 0; t = 1700000000
        while (total < limit) {
            t += int(rand() * 3)
            d = int(rand() * 8) + 1; w = int(rand() * 8) + 1; u = int(rand() * 6) + 1
            line = sprintf("2026-11-%02d %02d:%02d:%02d host-%02d %s[%d]: %s %s %d from 10.%d.%d.%d port %d",
                int(t / 86400) % 28 + 1, int(t / 3600) % 24, int(t / 60) % 60, t % 60,
                int(rand() * 12), daemon[d], 1000 + int(rand() * 30000), what[w], user[u],
                int(rand() * 100000), int(rand() * 4), int(rand() * 256), int(rand() * 256),
                1024 + int(rand() * 60000))
            if (total + length(line) + 1 > limit) {
                printf "%s", substr(line "\n", 1, limit - total); total = limit
            } else {
                print line; total += length(line) + 1
            }
        }
    }' > "$text"
    [ "$(stat -c %s "$text")" -eq $((512 * MiB)) ] || die "text.raw has the wrong size"
}

make_check_image() {
    rm -f "$BENCH_DIR/check256.qcow2"
    qemu-img create -q -f qcow2 -o preallocation=metadata "$BENCH_DIR/check256.qcow2" 256G
}

inputs_valid() {
    [ -f "$BENCH_DIR/inputs.ok" ] && [ "$(cat "$BENCH_DIR/inputs.ok")" = "$LAYOUT" ] || return 1
    [ "$(stat -c %s "$BENCH_DIR/w1.raw" 2>/dev/null)" = $((4 * GiB)) ] || return 1
    [ "$(stat -c %s "$BENCH_DIR/text.raw" 2>/dev/null)" = $((512 * MiB)) ] || return 1
    qemu-img check -q "$BENCH_DIR/w1.qcow2" >/dev/null 2>&1 || return 1
    [ -f "$BENCH_DIR/check256.qcow2" ] || make_check_image
}

prepare_inputs() {
    mkdir -p "$BENCH_DIR"
    check_odirect
    if inputs_valid; then
        say "reusing inputs in $BENCH_DIR"
        check_space 3
        return
    fi
    rm -f "$BENCH_DIR/inputs.ok"
    check_space 9
    make_w1
    make_text
    make_check_image
    echo "$LAYOUT" > "$BENCH_DIR/inputs.ok"
    say "inputs ready: $(du -sh --apparent-size "$BENCH_DIR" | cut -f1) apparent," \
        "$(du -sh "$BENCH_DIR" | cut -f1) allocated"
}

# Rebase inputs, made only when workload R runs: rbase2.qcow2 is w1.qcow2 with 1 MiB of every
# 4 MiB rewritten (pattern 0x5a); rov.qcow2 is an empty overlay naming w1.qcow2 by absolute path.
make_rebase_inputs() {
    local r2=$BENCH_DIR/rbase2.qcow2 ov=$BENCH_DIR/rov.qcow2 cmds=() m
    if [ -f "$BENCH_DIR/rebase.ok" ] && [ "$(cat "$BENCH_DIR/rebase.ok")" = "$LAYOUT" ] && [ -f "$ov" ] \
            && qemu-img check -q "$r2" >/dev/null 2>&1; then
        return
    fi
    check_space 5
    say "making rbase2.qcow2 (w1.qcow2 with 1 MiB of every 4 MiB rewritten) and rov.qcow2"
    rm -f "$r2" "$ov" "$BENCH_DIR/rebase.ok"
    qemu-img convert -f qcow2 -O qcow2 "$BENCH_DIR/w1.qcow2" "$r2"
    for ((m = 0; m < W1_GROUPS * W1_GROUP_MIB; m += 4)); do
        cmds+=(-c "write -q -P 90 $((m * MiB)) 1M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$r2" >/dev/null
    qemu-img create -q -f qcow2 -b "$BENCH_DIR/w1.qcow2" -F qcow2 "$ov"
    echo "$LAYOUT" > "$BENCH_DIR/rebase.ok"
}

# Map input, made only when workload L runs: frag.qcow2, an empty 4 GiB qcow2 (64 KiB clusters)
# given 20,000 writes of 4 KiB at offsets from a fixed-seed Park-Miller generator (4 KiB aligned,
# anywhere in the 4 GiB), in four qemu-io invocations of 5,000 commands (cache=writeback: no
# flush per write). Each write into a new cluster allocates it at the end of the file, so the
# host offsets follow write order and almost no two neighbouring clusters merge in the map.
FRAG_WRITES=20000
make_frag_input() {
    local frag=$BENCH_DIR/frag.qcow2 cmds=() line
    if [ -f "$BENCH_DIR/frag.ok" ] && [ "$(cat "$BENCH_DIR/frag.ok")" = "$LAYOUT" ] \
            && qemu-img check -q "$frag" >/dev/null 2>&1; then
        return
    fi
    check_space 2
    say "making frag.qcow2 (4 GiB virtual, $FRAG_WRITES scattered 4 KiB writes)"
    rm -f "$frag" "$BENCH_DIR/frag.ok"
    qemu-img create -q -f qcow2 "$frag" $((W1_GROUPS * W1_GROUP_MIB))M
    # mawk's %d stops at 2^31 - 1: offsets are printed with %.0f (exact: below 2^53).
    while IFS= read -r line; do
        cmds+=(-c "$line")
        if [ ${#cmds[@]} -eq 10000 ]; then
            qemu-io -t writeback -f qcow2 "${cmds[@]}" "$frag" >/dev/null
            cmds=()
        fi
    done < <(awk -v n=$FRAG_WRITES 'BEGIN { x = 13
        for (i = 0; i < n; i++) {
            x = (x * 48271) % 2147483647
            printf "write -q -P %d %.0f 4k\n", i % 255 + 1, (x % 1048576) * 4096
        } }')
    [ ${#cmds[@]} -eq 0 ] || qemu-io -t writeback -f qcow2 "${cmds[@]}" "$frag" >/dev/null
    qemu-img check -q "$frag"
    echo "$LAYOUT" > "$BENCH_DIR/frag.ok"
}

# Cloud image, made only when workload G or H runs: cloud.raw, a 3 GiB raw whose first 1.5 GiB
# are a tar of /usr (real binaries and text, the rest a hole), compressed once with
# `qemu-img convert -c -O qcow2` into cloud.qcow2; the raw is removed then (the outputs are
# compared with cloud.qcow2).
CLOUD_DATA_MIB=1536
make_cloud_input() {
    local raw=$BENCH_DIR/cloud.raw qcow=$BENCH_DIR/cloud.qcow2
    if [ -f "$BENCH_DIR/cloud.ok" ] && [ "$(cat "$BENCH_DIR/cloud.ok")" = "$LAYOUT" ] \
            && qemu-img check -q "$qcow" >/dev/null 2>&1; then
        return
    fi
    check_space 6
    say "making cloud.raw (3 GiB, ${CLOUD_DATA_MIB} MiB of a tar of /usr) and cloud.qcow2 (convert -c)"
    rm -f "$raw" "$qcow" "$BENCH_DIR/cloud.ok"
    truncate -s 3G "$raw"
    # tar stops with SIGPIPE once head has its bytes; /usr is larger than 1.5 GiB on any Debian
    # with the toolchain installed, which the size check below confirms.
    (tar -cf - --ignore-failed-read /usr 2>/dev/null || true) | head -c $((CLOUD_DATA_MIB * MiB)) \
        | dd of="$raw" bs=1M conv=notrunc iflag=fullblock status=none
    [ "$(du -k "$raw" | cut -f1)" -ge $((CLOUD_DATA_MIB * 1024)) ] || die "/usr gave less than ${CLOUD_DATA_MIB} MiB"
    qemu-img convert -f raw -c -O qcow2 "$raw" "$qcow"
    qemu-img check -q "$qcow"
    rm -f "$raw"
    echo "$LAYOUT" > "$BENCH_DIR/cloud.ok"
}

# XFS sources, made once in BENCH_DIR when X, XC, Y or YC runs and copied onto the fresh XFS per
# bench run: xsrc.raw, XSRC_MIB of random data (fully allocated), and xsrc.qcow2 made from it
# (every cluster allocated, host-contiguous as qemu-img lays them out). 4 GiB: a clone takes a
# few tens of milliseconds, near GNU time's 10 ms resolution, so a smaller source would leave
# the ratio to rounding.
XSRC_MIB=4096
make_xfs_inputs() {
    if [ -f "$BENCH_DIR/xsrc.ok" ] && [ "$(cat "$BENCH_DIR/xsrc.ok")" = "$LAYOUT xsrc $XSRC_MIB" ] \
            && qemu-img check -q "$BENCH_DIR/xsrc.qcow2" >/dev/null 2>&1; then
        return
    fi
    check_space $((2 * XSRC_MIB / 1024 + 1))
    say "making xsrc.raw ($XSRC_MIB MiB random, allocated) and xsrc.qcow2 from it"
    rm -f "$BENCH_DIR/xsrc.raw" "$BENCH_DIR/xsrc.qcow2" "$BENCH_DIR/xsrc.ok"
    dd if=/dev/urandom of="$BENCH_DIR/xsrc.raw" bs=1M count=$XSRC_MIB status=none
    qemu-img convert -f raw -O qcow2 "$BENCH_DIR/xsrc.raw" "$BENCH_DIR/xsrc.qcow2"
    echo "$LAYOUT xsrc $XSRC_MIB" > "$BENCH_DIR/xsrc.ok"
}

# A fresh XFS with reflink on a loop device over a sparse file (room for both sources and one
# copied output), the two sources copied onto it (plain copies: their extents are their own).
# Torn down by cleanup, on every exit.
setup_xfs() {
    [ -z "$XFS_LOOP" ] || return 0
    [ "$(id -u)" -eq 0 ] || die "workloads X, XC, Y, YC mount an XFS on a loop device: run as root"
    command -v mkfs.xfs >/dev/null || die "mkfs.xfs is missing (package xfsprogs)"
    check_space $((3 * XSRC_MIB / 1024 + 1))
    rm -f "$BENCH_DIR/xfs.img"
    truncate -s $((4 * XSRC_MIB))M "$BENCH_DIR/xfs.img"
    mkfs.xfs -q -m reflink=1 "$BENCH_DIR/xfs.img"
    XFS_LOOP=$(losetup -f --show "$BENCH_DIR/xfs.img")
    mkdir -p "$XFS_MNT"
    mount -t xfs "$XFS_LOOP" "$XFS_MNT"
    say "XFS (reflink=1) on $XFS_LOOP at $XFS_MNT"
    cp --reflink=never "$BENCH_DIR/xsrc.raw" "$BENCH_DIR/xsrc.qcow2" "$XFS_MNT/"
    sync
}

teardown_xfs() {
    if mountpoint -q "$XFS_MNT" 2>/dev/null; then
        umount "$XFS_MNT" || say "could not unmount $XFS_MNT"
    fi
    if [ -n "$XFS_LOOP" ]; then
        losetup -d "$XFS_LOOP" || say "could not detach $XFS_LOOP"
        XFS_LOOP=""
    fi
    rmdir "$XFS_MNT" 2>/dev/null || true
    rm -f "$BENCH_DIR/xfs.img"
}

# Commit inputs, made only when workload M runs: cbase.qcow2 an empty 4 GiB image, ctop.qcow2
# an overlay over it (by the relative name cbase.qcow2) holding what w1.qcow2 holds.
make_commit_inputs() {
    local dir=$BENCH_DIR/commit
    if [ -f "$dir/commit.ok" ] && [ "$(cat "$dir/commit.ok")" = "$LAYOUT" ] \
            && qemu-img check -q "$dir/ctop.qcow2" >/dev/null 2>&1; then
        return
    fi
    check_space 4
    say "making commit/cbase.qcow2 (empty) and commit/ctop.qcow2 (w1.qcow2's data over it)"
    rm -rf "$dir"
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 "$dir/cbase.qcow2" $((W1_GROUPS * W1_GROUP_MIB))M
    (cd "$dir" && qemu-img convert -f qcow2 -O qcow2 -B cbase.qcow2 -F qcow2 "$BENCH_DIR/w1.qcow2" ctop.qcow2)
    echo "$LAYOUT" > "$dir/commit.ok"
}

# A fresh copy of the commit inputs in out.commit/ (both images change in a commit).
copy_commit_inputs() {
    rm -rf "$BENCH_DIR/out.commit"
    mkdir -p "$BENCH_DIR/out.commit"
    cp --sparse=always "$BENCH_DIR/commit/cbase.qcow2" "$BENCH_DIR/commit/ctop.qcow2" "$BENCH_DIR/out.commit/"
}

# ---------------------------------------------------------------------------------------------
# Workloads: name -> source format, source, output format, cache/other flags, description

workload() {
    case $1 in
        1)  echo "qcow2 $BENCH_DIR/w1.qcow2 raw -t none|w1.qcow2 -> raw, -t none" ;;
        1T) echo "qcow2 $BENCH_DIR/w1.qcow2 raw -t none -T none|w1.qcow2 -> raw, -t none -T none" ;;
        2)  echo "raw $BENCH_DIR/w1.raw qcow2 -t none|w1.raw -> qcow2, -t none" ;;
        3)  echo "raw $BENCH_DIR/text.raw qcow2 -c|text 512 MiB -> qcow2, -c" ;;
        # Not a conversion: `check` of a 256G image with every L2 table preallocated.
        C)  echo "check $BENCH_DIR/check256.qcow2 - -|check of 256G qcow2, preallocation=metadata" ;;
        # Not a conversion: `rebase FLAGS` of a fresh copy (out.qcow2) of the source overlay.
        R)  echo "rebase $BENCH_DIR/rov.qcow2 qcow2 -b $BENCH_DIR/rbase2.qcow2 -F qcow2|rebase of an overlay over w1.qcow2 onto a base differing in 1 MiB of 4" ;;
        # Not conversions: commit of a fresh copy of the commit inputs (out.commit/ctop.qcow2),
        # snapshot -c then -d of a fresh copy of check256.qcow2, resize of a fresh 64M image.
        M)  echo "commit $BENCH_DIR/commit/ctop.qcow2 qcow2 -|commit of a 4 GiB overlay holding 1.5 GiB onto its base" ;;
        S)  echo "snapshot $BENCH_DIR/check256.qcow2 qcow2 -|snapshot -c then -d on a 256G preallocation=metadata qcow2" ;;
        Z)  echo "resize - qcow2 -|resize of a 64M qcow2 to 16T and back with --shrink" ;;
        # Not a conversion: amend refcount_bits=64 of a fresh copy of w1.qcow2.
        A)  echo "amend $BENCH_DIR/w1.qcow2 qcow2 -|amend refcount_bits=64 of w1.qcow2 (4 GiB)" ;;
        # Not a conversion: compare of w1.qcow2 with its raw copy (exit 0 = identical).
        K)  echo "compare $BENCH_DIR/w1.qcow2 qcow2 -|compare of w1.qcow2 with w1.raw (4 GiB, identical)" ;;
        # Not conversions, and quick: BENCH_REPEAT invocations in a row are one timed run.
        L)  echo "map $BENCH_DIR/frag.qcow2 - -|map --output=json of frag.qcow2 (4 GiB, 20,000 scattered 4 KiB writes), ${BENCH_REPEAT} runs in a row" ;;
        N)  echo "measure $BENCH_DIR/w1.qcow2 - -|measure -O qcow2 of w1.qcow2 (4 GiB), ${BENCH_REPEAT} runs in a row" ;;
        # Issue 14. The third field, where there is one, is given to qemu-img alone.
        G)  echo "qcow2 $BENCH_DIR/cloud.qcow2 raw |cloud qcow2 (3 GiB, 1.5 GiB of /usr, compressed) -> raw" ;;
        H)  echo "qcow2 $BENCH_DIR/cloud.qcow2 qcow2 |cloud qcow2 (compressed) -> qcow2" ;;
        3Z) echo "raw $BENCH_DIR/text.raw qcow2 -c -o compression_type=zstd|text 512 MiB -> qcow2, -c zstd" ;;
        X)  echo "raw $XFS_MNT/xsrc.raw raw |XFS reflink: raw $((XSRC_MIB / 1024)) GiB -> raw, defaults" ;;
        XC) echo "raw $XFS_MNT/xsrc.raw raw |XFS reflink: raw $((XSRC_MIB / 1024)) GiB -> raw, qemu-img -C|-C" ;;
        Y)  echo "qcow2 $XFS_MNT/xsrc.qcow2 qcow2 |XFS reflink: qcow2 $((XSRC_MIB / 1024)) GiB -> qcow2, defaults" ;;
        YC) echo "qcow2 $XFS_MNT/xsrc.qcow2 qcow2 |XFS reflink: qcow2 $((XSRC_MIB / 1024)) GiB -> qcow2, qemu-img -C|-C" ;;
        *)  die "unknown workload '$1' (known: 1 1T 2 3 C R M S Z A K L N G H 3Z X XC Y YC)" ;;
    esac
}

# Runs one conversion under GNU time; prints "seconds peak_kib". Output goes to $out.
timed_convert() {
    local tool=$1 fmt=$2 src=$3 ofmt=$4 flags=$5 out=$6 timefile errfile
    timefile=$BENCH_DIR/.time errfile=$BENCH_DIR/.err
    rm -f "$out"
    [ "$fmt" = rebase ] && cp "$src" "$out"
    [ "$fmt" = snapshot ] && cp --sparse=always "$src" "$out"
    [ "$fmt" = amend ] && cp --sparse=always "$src" "$out"
    [ "$fmt" = resize ] && qemu-img create -q -f qcow2 "$out" 64M
    [ "$fmt" = commit ] && copy_commit_inputs
    sync
    local cmd bin=$SIMG
    [ "$tool" = simg ] || bin=qemu-img
    if [ "$fmt" = commit ]; then
        cmd=("$bin" commit "$BENCH_DIR/out.commit/ctop.qcow2")
    elif [ "$fmt" = snapshot ]; then
        cmd=(sh -c '"$1" snapshot -c s "$2" && "$1" snapshot -d s "$2"' sh "$bin" "$out")
    elif [ "$fmt" = amend ]; then
        cmd=("$bin" amend -o refcount_bits=64 "$out")
    elif [ "$fmt" = compare ]; then
        # Exit 0 only when the images are identical: any other status fails the run.
        cmd=("$bin" compare -f qcow2 -F raw "$src" "$BENCH_DIR/w1.raw")
    elif [ "$fmt" = map ] || [ "$fmt" = measure ]; then
        # The same command BENCH_REPEAT times; stdout is discarded (verify_output compares it).
        local args=(map --output=json "$src")
        [ "$fmt" = map ] || args=(measure -O qcow2 "$src")
        cmd=(sh -c 'n=$1; shift; i=0; while [ "$i" -lt "$n" ]; do "$@" >/dev/null || exit 1; i=$((i + 1)); done' \
             sh "$BENCH_REPEAT" "$bin" "${args[@]}")
    elif [ "$fmt" = resize ]; then
        cmd=(sh -c '"$1" resize -q "$2" 16T && "$1" resize -q --shrink "$2" 64M' sh "$bin" "$out")
    elif [ "$fmt" = rebase ]; then
        # shellcheck disable=SC2206
        cmd=("$SIMG" rebase $flags "$out")
        # shellcheck disable=SC2206
        [ "$tool" = simg ] || cmd=(qemu-img rebase $flags "$out")
    elif [ "$fmt" = check ]; then
        cmd=("$SIMG" check "$src")
        [ "$tool" = simg ] || cmd=(qemu-img check "$src")
    elif [ "$tool" = simg ]; then
        # shellcheck disable=SC2206 # flags and SIMG_ARGS are word lists on purpose
        cmd=("$SIMG" convert $SIMG_ARGS -f "$fmt" $flags -O "$ofmt" "$src" "$out")
    else
        # shellcheck disable=SC2206 # QEMU_ONLY: the workload's qemu-img-only flags (XC, YC: -C)
        cmd=(qemu-img convert $QEMU_ONLY -f "$fmt" $flags -O "$ofmt" "$src" "$out")
    fi
    if ! /usr/bin/time -f '%e %M' -o "$timefile" "${cmd[@]}" >/dev/null 2>"$errfile"; then
        say "FAILED: ${cmd[*]}"
        sed 's/^/bench:   /' "$errfile" >&2
        return 1
    fi
    tail -n 1 "$timefile"
}

verify_output() {
    local fmt=$1 src=$2 ofmt=$3 out=$4
    if [ "$fmt" = check ]; then
        # The same verdict and counts as qemu-img's, field for field.
        [ "$("$SIMG" check --output=json "$src")" = "$(qemu-img check --output=json "$src")" ]
        return
    fi
    if [ "$fmt" = commit ]; then
        # The base now reads what the top read through it; both are clean.
        qemu-img check -q "$BENCH_DIR/out.commit/cbase.qcow2" >&2 && qemu-img check -q "$BENCH_DIR/out.commit/ctop.qcow2" >&2 \
            && qemu-img compare -q "$src" "$BENCH_DIR/out.commit/cbase.qcow2" >&2
        return
    fi
    if [ "$fmt" = snapshot ]; then
        # Clean, no snapshot left, the same guest content.
        qemu-img check -q "$out" >&2 && [ -z "$(qemu-img snapshot -l "$out")" ] && qemu-img compare -q "$src" "$out" >&2
        return
    fi
    if [ "$fmt" = amend ]; then
        # Clean, 64-bit refcounts, the same guest content.
        qemu-img check -q "$out" >&2 && qemu-img info "$out" | grep -q '^    refcount bits: 64$' \
            && qemu-img compare -q "$src" "$out" >&2
        return
    fi
    if [ "$fmt" = resize ]; then
        qemu-img check -q "$out" >&2 && qemu-img info "$out" | grep -q '^virtual size: 64 MiB '
        return
    fi
    if [ "$fmt" = compare ]; then
        # The timed run exited 0 (identical); the same verdict line as qemu-img's.
        [ "$("$SIMG" compare -f qcow2 -F raw "$src" "$BENCH_DIR/w1.raw")" = "Images are identical." ]
        return
    fi
    if [ "$fmt" = map ]; then
        # Byte for byte qemu-img's output.
        cmp -s <("$SIMG" map --output=json "$src") <(qemu-img map --output=json "$src")
        return
    fi
    if [ "$fmt" = measure ]; then
        # qemu-img's numbers and layout, human and JSON.
        [ "$("$SIMG" measure -O qcow2 "$src")" = "$(qemu-img measure -O qcow2 "$src")" ] \
            && [ "$("$SIMG" measure -O qcow2 --output=json "$src")" = "$(qemu-img measure -O qcow2 --output=json "$src")" ]
        return
    fi
    if [ "$fmt" = rebase ]; then
        # The rebased copy reads what the overlay read through its old base, is clean, and
        # names the new base.
        qemu-img check -q "$out" >&2 && qemu-img compare -q "$src" "$out" >&2 \
            && qemu-img info "$out" | grep -qx "backing file: $BENCH_DIR/rbase2.qcow2"
        return
    fi
    if [ "$ofmt" = qcow2 ] && ! qemu-img check -q "$out" >&2; then
        return 1
    fi
    qemu-img compare -q -f "$fmt" -F "$ofmt" "$src" "$out" >&2
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max_of() { sort -n | tail -n 1; }

rows=()
stats_lines=()

run_workload() {
    local name=$1 spec fmt src ofmt flags desc out i tool result
    spec=$(workload "$name")
    desc=${spec#*|}; spec=${spec%%|*}
    QEMU_ONLY=""
    if [[ $desc == *"|"* ]]; then QEMU_ONLY=${desc#*|}; desc=${desc%%|*}; fi
    read -r fmt src ofmt flags <<< "$spec"
    out=$BENCH_DIR/out.$ofmt
    # The XFS workloads write next to their source: a clone needs one file system.
    [[ $src != "$XFS_MNT"/* ]] || out=$XFS_MNT/out.$ofmt
    local -A secs=() rss=() failed=()
    local verdict=""
    say "workload $name: $desc"
    local runs=$BENCH_RUNS
    [ "$fmt" = resize ] && runs=${BENCH_RESIZE_RUNS:-1}
    for ((i = 1; i <= runs; i++)); do
        for tool in simg qemu-img; do
            have_tool "$tool" || continue
            [ -z "${failed[$tool]:-}" ] || continue
            if result=$(timed_convert "$tool" "$fmt" "$src" "$ofmt" "$flags" "$out"); then
                say "  run $i $tool: ${result% *} s, $((${result#* } / 1024)) MiB"
                secs[$tool]+="${result% *}"$'\n'
                rss[$tool]+="${result#* }"$'\n'
                if [ "$tool" = simg ] && [ "$i" -eq 1 ] && [ "$BENCH_VERIFY" = 1 ]; then
                    if verify_output "$fmt" "$src" "$ofmt" "$out"; then
                        say "  simg output verified (against qemu-img)"
                    else
                        say "  simg output DIFFERS from the source"
                        verdict=" (WRONG OUTPUT)"
                        failed[simg]=1
                    fi
                fi
            else
                failed[$tool]=1
            fi
            rm -f "$out"
            rm -rf "$BENCH_DIR/out.commit"
        done
    done

    local sm qm sr qr ratio
    sm=$(printf '%s' "${secs[simg]:-}" | grep . | median || true)
    qm=$(printf '%s' "${secs[qemu-img]:-}" | grep . | median || true)
    sr=$(printf '%s' "${rss[simg]:-}" | grep . | max_of || true)
    qr=$(printf '%s' "${rss[qemu-img]:-}" | grep . | max_of || true)
    [ -n "${failed[simg]:-}" ] && sm="FAILED$verdict"
    [ -n "${failed[qemu-img]:-}" ] && qm="FAILED"
    ratio="-"
    if [[ $sm =~ ^[0-9.]+$ && $qm =~ ^[0-9.]+$ ]]; then
        ratio=$(awk -v a="$sm" -v b="$qm" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    fi
    local srm="-" qrm="-"
    [ -n "$sr" ] && srm=$(awk -v k="$sr" 'BEGIN { printf "%.1f", k / 1024 }')
    [ -n "$qr" ] && qrm=$(awk -v k="$qr" 'BEGIN { printf "%.1f", k / 1024 }')
    rows+=("| $name: $desc | ${sm:--} | ${qm:--} | $ratio | $srm | $qrm |")
    if [ -n "$BENCH_TSV" ]; then
        have_tool simg && printf '%s\tsimg\t%s\t%s\t%s\t%s\n' "$name" "${sm:--}" "${sr:--}" "$BENCH_RUNS" "$SIMG_ARGS" >> "$BENCH_TSV"
        have_tool qemu-img && printf '%s\tqemu-img\t%s\t%s\t%s\t-\n' "$name" "${qm:--}" "${qr:--}" "$BENCH_RUNS" >> "$BENCH_TSV"
    fi

    if have_tool simg && [ "$BENCH_STATS" = 1 ] && [ "$fmt" != check ] && [ "$fmt" != rebase ] \
            && [ "$fmt" != commit ] && [ "$fmt" != snapshot ] && [ "$fmt" != resize ] && [ "$fmt" != amend ] \
            && [ "$fmt" != compare ] && [ "$fmt" != map ] && [ "$fmt" != measure ] && [ -z "${failed[simg]:-}" ]; then
        rm -f "$out"
        # shellcheck disable=SC2086
        if "$SIMG" convert $SIMG_ARGS --stats -f "$fmt" $flags -O "$ofmt" "$src" "$out" \
                >/dev/null 2>"$BENCH_DIR/.stats"; then
            stats_lines+=("$name: $(tr -d '\n' < "$BENCH_DIR/.stats")")
        fi
        rm -f "$out"
    fi
}

cleanup() {
    rm -rf "$BENCH_DIR"/out.* "$BENCH_DIR"/.time "$BENCH_DIR"/.err "$BENCH_DIR"/.stats 2>/dev/null || true
    teardown_xfs
}

main() {
    check_tools
    prepare_inputs
    [ "${BENCH_INPUTS_ONLY:-0}" = 1 ] && return
    trap cleanup EXIT
    trap 'exit 130' INT TERM  # so that the EXIT trap unmounts the XFS on ^C too
    local name
    IFS=',' read -r -a names <<< "$BENCH_ONLY"
    for name in "${names[@]}"; do
        workload "$name" >/dev/null
        [ "$name" != R ] || make_rebase_inputs
        [ "$name" != L ] || make_frag_input
        [ "$name" != M ] || make_commit_inputs
        [[ $name != [GH] ]] || make_cloud_input
        if [[ $name == X || $name == XC || $name == Y || $name == YC ]]; then
            make_xfs_inputs
            setup_xfs
        fi
    done
    for name in "${names[@]}"; do
        run_workload "$name"
    done

    echo
    echo "simg vs qemu-img: median of $BENCH_RUNS runs (Z: ${BENCH_RESIZE_RUNS:-1}), $(date -u '+%Y-%m-%d %H:%M UTC')"
    [ -n "$SIMG_ARGS" ] && echo "simg options: $SIMG_ARGS"
    echo
    echo "| workload | simg median s | qemu-img median s | ratio simg/qemu-img | simg peak RSS MiB | qemu-img peak RSS MiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
    if [ ${#stats_lines[@]} -gt 0 ]; then
        echo
        echo "simg --stats (one extra untimed run per workload):"
        echo
        printf '    %s\n' "${stats_lines[@]}"
    fi
}

main "$@"
