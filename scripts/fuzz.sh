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

# All in a function: bash reads the whole of it before running, so editing this file while a
# run is going does not change what the run does.
main() {

    root=$(cd "$(dirname "$0")/.." && pwd)
    seconds=${FUZZ_SECONDS:-300}
    work="$root/Fuzz/work"
    mkdir -p "$work/corpus" "$work/artifacts"
    seeds="$work/seeds"
    rm -rf "$seeds"

    sanitizers=(--sanitize=fuzzer)
    scratch="$root/Fuzz/.build"
    extra=()
    if [ "${FUZZ_ASAN:-0}" = 1 ]; then
        # SwiftPM leaves the coverage instrumentation off the dependencies (ImageFormats,
        # DiskIO) when two sanitizers are given: ask swiftc for both directly too.
        sanitizers+=(--sanitize=address -Xswiftc -sanitize=fuzzer,address)
        scratch="$root/Fuzz/.build-asan"
        # A fallible allocation that fails (the check's capped count array) is handled, not a bug:
        # let it return NULL, and let libFuzzer's malloc limit sit above that cap (16 GiB).
        export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
        extra+=(-malloc_limit_mb=17000)
    fi
    echo "fuzz.sh: building the fuzzer (${sanitizers[*]})"
    build=(swift build --package-path "$root/Fuzz" --scratch-path "$scratch" -c release "${sanitizers[@]}")
    if ! "${build[@]}" >"$work/build.log" 2>&1; then
        cat "$work/build.log" >&2
        echo "fuzz.sh: the fuzzer did not build" >&2
        exit 2
    fi
    bin=$("${build[@]}" --show-bin-path)/simg-fuzz

    bash "$root/scripts/fuzz-seeds.sh" "$seeds"
    before=$(ls "$work/artifacts" | wc -l)
    mkdir -p "$work/logs"
    log="$work/logs/run-$(date -u +%Y%m%dT%H%M%SZ).log"
    ln -sfn "$log" "$work/last-run.log"
    echo "fuzz.sh: fuzzing for $seconds s (log: $log)"
    # SWIFT_BACKTRACE=enable=no: otherwise Swift's crash handler takes the trap's signal and
    # libFuzzer never writes the crashing input. SIMG_FUZZ_IN_FOLDER=1: the harness works in its
    # private folder (all paths given here are absolute). -fork=1 with -ignore_*: one worker
    # process at a time that is restarted after a crash, so one run can find several bugs.
    # -handle_xfsz=0: the harness caps file growth (RLIMIT_FSIZE) and ignores SIGXFSZ, so a repair
    # growing its copy past the cap gets EFBIG; libFuzzer would count the signal as a crash.
    set +e
    SWIFT_BACKTRACE=enable=no SIMG_FUZZ_IN_FOLDER=1 "$bin" \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 -handle_xfsz=0 \
        -max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-2}" -rss_limit_mb=2048 -max_len=262144 \
        -dict="$root/Fuzz/qcow2.dict" -artifact_prefix="$work/artifacts/" \
        ${extra[@]+"${extra[@]}"} ${FUZZ_ARGS:-} "$work/corpus" "$seeds" >"$log" 2>&1
    status=$?
    set -e

    # The last status line: "#EXECS: cov: C ft: F corp: N exec/s: E oom/timeout/crash: O/T/C time: ..."
    last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1)
    execs=$(sed -nE 's/^#([0-9]+):.*/\1/p' <<<"$last")
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' <<<"$last" || true)
    found=$(grep -oE 'oom/timeout/crash: [0-9/]+' <<<"$last" || true)
    corpus=$(ls "$work/corpus" | wc -l)
    after=$(ls "$work/artifacts" | wc -l)
    echo "fuzz.sh: libFuzzer exit status $status; executions ${execs:-?}; ${cov:-cov: ?}; corpus $corpus inputs; ${found:-}; new artifacts $((after - before))"
    printf '%s seconds=%s status=%s execs=%s %s corpus=%s %s new_artifacts=%s\n' "$(date -u +%FT%TZ)" \
        "$seconds" "$status" "${execs:-?}" "${cov:-}" "$corpus" "${found:-}" "$((after - before))" >> "$work/history.txt"
    if [ "$after" -gt "$before" ]; then
        echo "fuzz.sh: new inputs in $work/artifacts; each replayed alone (a timeout under load may be fast alone):" >&2
        for f in $(ls -t "$work/artifacts" | head -n $((after - before))); do
            start=$(date +%s.%N)
            rc=0
            SWIFT_BACKTRACE=enable=no timeout 60 "$bin" -handle_xfsz=0 "$work/artifacts/$f" >/dev/null 2>&1 || rc=$?
            awk -v f="$f" -v rc="$rc" -v a="$start" -v b="$(date +%s.%N)" \
                'BEGIN { printf "  %s: exit %s in %.2f s\n", f, rc, b - a }' >&2
        done
        echo "fuzz.sh: fix each, then add it to Fuzz/regressions/ (replay with a backtrace: $bin -handle_xfsz=0 FILE)" >&2
        exit 1
    fi
    [ "$status" -eq 0 ] || { echo "fuzz.sh: libFuzzer failed; see $log" >&2; exit 1; }
}

main "$@"
