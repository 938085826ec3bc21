#!/usr/bin/env bash
# Fuzzes simg's read path (probe, qcow2 and raw open, info, block status, reads, read-only
# check) with libFuzzer for a set time: `make fuzz`, or
#
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#
# Builds Fuzz/ (its own package, so the main build stays plain) with -sanitize=fuzzer, makes the
# seed corpus (scripts/fuzz-seeds.sh), then runs one libFuzzer process. New interesting inputs
# go to Fuzz/work/corpus (kept between runs), crashes, timeouts and out-of-memory inputs to
# Fuzz/work/artifacts. Every one found must become a file in Fuzz/regressions/ (replayed by
# `make test`) with the fix. Exits 1 if the run found one.
#
# Settings: FUZZ_SECONDS (default 300), FUZZ_ASAN=1 (also AddressSanitizer: slower, catches
# memory errors in unsafe pointer code), FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${FUZZ_SECONDS:-300}
work="$root/Fuzz/work"
mkdir -p "$work/corpus" "$work/artifacts"
seeds="$work/seeds"
rm -rf "$seeds"

sanitizers=(--sanitize=fuzzer)
if [ "${FUZZ_ASAN:-0}" = 1 ]; then sanitizers+=(--sanitize=address); fi
echo "fuzz.sh: building the fuzzer (${sanitizers[*]})"
swift build --package-path "$root/Fuzz" --scratch-path "$root/Fuzz/.build" -c release "${sanitizers[@]}" 2>&1 \
    | grep -vE '^\[[0-9]+/[0-9]+\] (Compiling|Write|Emitting)' || true
bin=$(swift build --package-path "$root/Fuzz" --scratch-path "$root/Fuzz/.build" -c release "${sanitizers[@]}" --show-bin-path)/simg-fuzz
[ -x "$bin" ] || { echo "fuzz.sh: the fuzzer did not build" >&2; exit 2; }

bash "$root/scripts/fuzz-seeds.sh" "$seeds"
before=$(ls "$work/artifacts" | wc -l)
log="$work/last-run.log"
echo "fuzz.sh: fuzzing for $seconds s (log: $log)"
# SWIFT_BACKTRACE=enable=no: otherwise Swift's crash handler takes the trap's signal and
# libFuzzer never writes the crashing input. SIMG_FUZZ_IN_FOLDER=1: the harness works in its
# private folder (all paths given here are absolute).
set +e
SWIFT_BACKTRACE=enable=no SIMG_FUZZ_IN_FOLDER=1 "$bin" \
    -max_total_time="$seconds" -timeout=2 -rss_limit_mb=2048 -max_len=262144 \
    -dict="$root/Fuzz/qcow2.dict" -artifact_prefix="$work/artifacts/" -print_final_stats=1 \
    ${FUZZ_ARGS:-} "$work/corpus" "$seeds" >"$log" 2>&1
status=$?
set -e

execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
corpus=$(ls "$work/corpus" | wc -l)
after=$(ls "$work/artifacts" | wc -l)
echo "fuzz.sh: libFuzzer exit status $status; executions ${execs:-?}; $cov; corpus $corpus inputs; new crashes $((after - before))"
printf '%s seconds=%s status=%s execs=%s %s corpus=%s new_artifacts=%s\n' "$(date -u +%FT%TZ)" \
    "$seconds" "$status" "${execs:-?}" "$cov" "$corpus" "$((after - before))" >> "$work/history.txt"
if [ "$after" -gt "$before" ]; then
    echo "fuzz.sh: new crash inputs in $work/artifacts (replay: $bin FILE); see the end of $log" >&2
    ls -t "$work/artifacts" | head -n $((after - before)) >&2
    exit 1
fi
[ "$status" -eq 0 ] || { echo "fuzz.sh: libFuzzer failed; see $log" >&2; exit 1; }
