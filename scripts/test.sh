#!/usr/bin/env bash
# Runs every Swift Testing suite of the built test binary, one process per suite, several at a
# time. Why: most interop tests wait on qemu-img, strace, fsync and the disk, and Swift Testing
# runs synchronous tests on its cooperative pool (one thread per core), so a single process on
# two cores keeps the CPUs less than half busy. Suites are taken from a queue, the slowest known
# ones first, so the run ends when the longest suite does. Each suite's output goes to its own
# log; a failing suite's log is printed in full, and the run fails if any suite failed or if the
# binary lists a test no suite ran.
#
# Usage: scripts/test.sh [jobs]      (SIMG_TEST_JOBS overrides; default 4)
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${SIMG_TEST_JOBS:-${1:-4}}"
binary=$(swift build --show-bin-path)/simgPackageTests.xctest
[ -x "$binary" ] || { echo "test.sh: $binary is missing (run swift build --build-tests)" >&2; exit 1; }

logs=$(mktemp -d /tmp/simg-tests.XXXXXX)
trap 'rm -rf "$logs"' EXIT

"$binary" --testing-library swift-testing --list-tests 2>/dev/null | grep -v '^$' > "$logs/all"
cut -d/ -f1 "$logs/all" | sort -u > "$logs/suites"
[ -s "$logs/suites" ] || { echo "test.sh: the test binary lists no tests" >&2; exit 1; }

# Slowest first (measured on the 2-core CI machine); a suite not named here runs after them.
slow="InteropTests.CrashConsistencyTests InteropTests.AmendInteropTests
InteropTests.MeasureInteropTests InteropTests.MetadataInterruptTests InteropTests.DeviceTargetTests
InteropTests.ResizeInteropTests InteropTests.NameSyntaxTests InteropTests.CheckInteropTests
InteropTests.QCOW2WriteInteropTests InteropTests.CommitInteropTests InteropTests.CommitCrashTests
InteropTests.BitmapKeepTests InteropTests.BitmapInteropTests InteropTests.NeverDeleteTests"
{
    for s in $slow; do grep -qx "$s" "$logs/suites" && echo "$s"; done
    grep -vxF -f <(printf '%s\n' $slow) "$logs/suites" || true
} > "$logs/queue"

run_suite() {
    local suite=$1 logs=$2 binary=$3 start end status
    start=$(date +%s)
    # The suite's own tests only: its name anchored and followed by '/' (not a longer name).
    if "$binary" --testing-library swift-testing --filter "^${suite//./\\.}/" > "$logs/$suite.log" 2>&1; then
        status=ok
    else
        status=FAILED
    fi
    end=$(date +%s)
    echo "$status $((end - start))s $suite" | tee -a "$logs/results"
}
export -f run_suite

started=$(date +%s)
xargs -a "$logs/queue" -P "$jobs" -I{} bash -c 'run_suite "$@"' _ {} "$logs" "$binary" || true

failed=0
while read -r status seconds suite; do
    if [ "$status" != ok ]; then
        failed=1
        echo "==== $suite ($seconds) ===="
        cat "$logs/$suite.log"
    fi
done < "$logs/results"
ran=$(wc -l < "$logs/results"); expected=$(wc -l < "$logs/queue")
if [ "$ran" -ne "$expected" ]; then
    echo "test.sh: $ran of $expected suites reported" >&2
    failed=1
fi
passed=$(cat "$logs"/*.log | grep 'Test .* passed after' | grep -vc 'Test run with' || true)
total=$(wc -l < "$logs/all")
echo "test.sh: $expected suites, $passed of $total listed tests passed, $(( $(date +%s) - started ))s with $jobs at a time"
if [ "$failed" -ne 0 ]; then echo "test.sh: FAILED" >&2; exit 1; fi
