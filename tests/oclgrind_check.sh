#!/usr/bin/env bash
# Runs a test program under Oclgrind's simulator and fails on any report: out-of-bounds
# access, data race (--data-races), barrier divergence, and, with --uninitialized as the
# first argument, reads of uninitialized values.
#   oclgrind_check.sh [--uninitialized] PROGRAM [ARGS...]
# Kernels are built with -cl-opt-disable: Oclgrind 21.10's uninitialized-value plugin
# aborts on LLVM's `freeze` instruction, which the optimizer emits. Its shadow memory also
# does not carry initialization from one kernel to the next (a buffer written by kernel A
# reads as uninitialized in kernel B), so --uninitialized is used on stages fed from the
# host (tests/test_tiny.c "stages"), and the chained forward + backward runs without it.
set -u
extra=()
if [ "${1:-}" = --uninitialized ]; then extra+=(--uninitialized); shift; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Under Oclgrind the simulator is the only device, whatever CLNSA_DEVICE names.
env -u CLNSA_DEVICE CLNSA_CACHE_DIR=off oclgrind --data-races "${extra[@]}" --build-options -cl-opt-disable \
  --log "$log" "$@"
rc=$?
if [ -s "$log" ]; then
  echo "oclgrind reported:"
  head -100 "$log"
  exit 1
fi
if [ $rc -eq 77 ]; then
  echo "the program found no Oclgrind device: the check did not run"
  exit 1
fi
exit $rc
