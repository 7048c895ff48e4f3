#!/usr/bin/env bash
# Runs on the lent NVIDIA machine (docs/GPU.md): build, the whole test suite on the NVIDIA
# device, the demo and the benchmark, with logs under $OUT. Usage: tools/gpu-run.sh [bench args]
# Environment: TESTS="attend forward ..." runs only those meson tests (default: the unit
# and gpu suites); TEST_TIMEOUT (seconds, 900) caps them so that a hang leaves time for the
# benchmark; SKIP_BENCH=1 skips the benchmark. It writes five files (the device tool
# brings back at most eight): device.txt (devices, demo), build.log, test.log, bench.txt,
# bench.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu-env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export CLNSA_CACHE_DIR=/tmp/clnsa-cache
{ clinfo -l; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; } \
  >"$OUT/device.txt" 2>&1
meson setup /tmp/b -Dbuildtype=release >"$OUT/build.log" 2>&1 && ninja -C /tmp/b >>"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
/tmp/b/tools/clnsa devices >>"$OUT/device.txt" 2>&1
grep -E "^\[|tensor cores" "$OUT/device.txt"
if [ -n "${TESTS:-}" ]; then
  # shellcheck disable=SC2086 # a list of test names
  timeout "${TEST_TIMEOUT:-900}" meson test -C /tmp/b $TESTS --print-errorlogs >"$OUT/test.log" 2>&1
else
  timeout "${TEST_TIMEOUT:-900}" meson test -C /tmp/b --suite unit --suite gpu --print-errorlogs \
    >"$OUT/test.log" 2>&1
fi
echo "tests: exit $?"; grep -E "^(Ok|Fail|Skipped|Timeout):|FAIL|TIMEOUT" "$OUT/test.log"
/tmp/b/tools/clnsa demo 2>&1 | tee -a "$OUT/device.txt"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  /tmp/b/tools/clnsa bench --quiet --json "$OUT/bench.jsonl" "$@" 2>&1 | tee "$OUT/bench.txt"
fi
