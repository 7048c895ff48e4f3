#!/usr/bin/env bash
# Runs on the lent NVIDIA machine (docs/GPU.md): build, the whole test suite on the NVIDIA
# device, the demo and the benchmark, with logs under $OUT. Usage: tools/gpu-run.sh [bench args]
# Environment: TESTS="attend forward ..." runs only those meson tests (default: the unit
# and gpu suites); TEST_TIMEOUT (seconds, 400) caps each so that a hang leaves time for the
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
# Each test in its own `meson test` process, all at once: the tests are serial within
# meson (is_parallel: false, for the CPU device), but here the GPU is shared and their
# float64 references spread over the host's cores (the whole suite: 107 s on the H100
# machine, against more than one 10-minute call one after another).
# (the listing reads "clnsa:unit / npy" or, in newer meson, "unit - clnsa:npy")
names=${TESTS:-$(meson test -C /tmp/b --list --suite unit --suite gpu 2>/dev/null |
  grep 'clnsa:' | awk '{print $NF}' | sed 's/.*://')}
for n in $names; do
  (timeout "${TEST_TIMEOUT:-400}" meson test -C /tmp/b --no-rebuild --logbase "log_$n" "$n" \
    --print-errorlogs >"/tmp/test_$n.log" 2>&1) &
done
wait
for n in $names; do cat "/tmp/test_$n.log"; done >"$OUT/test.log"
grep -E "^ *[0-9]+/[0-9]+ " "$OUT/test.log"
echo "tests: $(grep -cE '^ *[0-9]+/[0-9]+ .* OK ' "$OUT/test.log") of $(echo "$names" | wc -w) OK"
/tmp/b/tools/clnsa demo 2>&1 | tee -a "$OUT/device.txt"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  /tmp/b/tools/clnsa bench --quiet --json "$OUT/bench.jsonl" "$@" 2>&1 | tee "$OUT/bench.txt"
fi
