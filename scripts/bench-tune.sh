#!/usr/bin/env bash
# Tuning sweep for simg convert's request size and queue depth (issue 3: "measure the best size
# and depth on this machine and make them the defaults"). Runs scripts/bench.sh for simg alone on
# workload 1 (-t none) and 1T (-t none -T none) for every buffer size x queue depth, on the same
# inputs as the benchmark, and prints a table of median seconds per combination.
#
# Environment (besides bench.sh's BENCH_DIR and SIMG):
#   TUNE_SIZES      request sizes (default "256K 1M 2M 4M 8M")
#   TUNE_DEPTHS     queue depths (default "4 8 16 32 64")
#   TUNE_WORKLOADS  bench.sh workloads (default "1,1T")
#   TUNE_RUNS       runs per combination (default 3)
#   TUNE_TSV        raw results file (default $BENCH_DIR/tune.tsv)
#   TUNE_SIZE_OPT / TUNE_DEPTH_OPT  simg's hidden option names (default --buffer-size / --queue-depth)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TUNE_SIZES=${TUNE_SIZES:-256K 1M 2M 4M 8M}
TUNE_DEPTHS=${TUNE_DEPTHS:-4 8 16 32 64}
TUNE_WORKLOADS=${TUNE_WORKLOADS:-1,1T}
TUNE_RUNS=${TUNE_RUNS:-3}
TUNE_SIZE_OPT=${TUNE_SIZE_OPT:---buffer-size}
TUNE_DEPTH_OPT=${TUNE_DEPTH_OPT:---queue-depth}

# Raw results (workload, tool, median s, peak RSS KiB, runs, simg options) are kept here.
tsv=${TUNE_TSV:-${BENCH_DIR:-/var/tmp/simg-bench}/tune.tsv}
mkdir -p "$(dirname "$tsv")"
: > "$tsv"

# One verified run with the defaults first: the sweep itself does not verify every combination.
BENCH_TOOLS=simg BENCH_ONLY=$TUNE_WORKLOADS BENCH_RUNS=1 BENCH_STATS=0 bash "$here/bench.sh" >/dev/null

for size in $TUNE_SIZES; do
    for depth in $TUNE_DEPTHS; do
        echo "tune: $TUNE_SIZE_OPT $size $TUNE_DEPTH_OPT $depth" >&2
        BENCH_TOOLS=simg BENCH_ONLY=$TUNE_WORKLOADS BENCH_RUNS=$TUNE_RUNS BENCH_VERIFY=0 \
            BENCH_STATS=0 BENCH_TSV=$tsv SIMG_ARGS="$TUNE_SIZE_OPT $size $TUNE_DEPTH_OPT $depth" \
            bash "$here/bench.sh" >/dev/null 2>&1 || echo "tune: failed for $size x $depth" >&2
    done
done

IFS=',' read -r -a workloads <<< "$TUNE_WORKLOADS"
for w in "${workloads[@]}"; do
    echo
    echo "workload $w: simg median seconds of $TUNE_RUNS runs and peak RSS (rows: request size, columns: queue depth)"
    echo
    printf '| size |'; for depth in $TUNE_DEPTHS; do printf ' qd %s |' "$depth"; done; echo
    printf '|---|'; for _ in $TUNE_DEPTHS; do printf -- '---:|'; done; echo
    for size in $TUNE_SIZES; do
        printf '| %s |' "$size"
        for depth in $TUNE_DEPTHS; do
            v=$(awk -F'\t' -v w="$w" -v a="$TUNE_SIZE_OPT $size $TUNE_DEPTH_OPT $depth" \
                '$1 == w && $2 == "simg" && $6 == a { printf "%s s, %.0f MiB", $3, $4 / 1024 }' "$tsv" | tail -n 1)
            printf ' %s |' "${v:--}"
        done
        echo
    done
done
