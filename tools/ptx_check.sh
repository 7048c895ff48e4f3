#!/usr/bin/env bash
# Register and spill counts of a kernel for sm_90 without a GPU: clang compiles
# cl/common.cl + tools/ptx_prelude.cl + the given kernel files for nvptx64, ptxas reads
# the PTX. The numbers are clang's code generation, not NVIDIA's OpenCL compiler, but
# they rank variants (the tensor-core kernels' tile sizes were chosen with them).
# Needs clang (15 or later) and ptxas (CUDA toolkit) on PATH or in /usr/local/cuda/bin.
# Usage: tools/ptx_check.sh "-DMODE=2 -DDK=128 ..." cl/warp_ops.cl cl/attend_setup.cl cl/attend_mma.cl
set -euo pipefail
cd "$(dirname "$0")/.."
defs="$1"
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat cl/common.cl tools/ptx_prelude.cl "$@" >"$tmp/src.cl"
CLANG=${CLANG:-$(command -v clang-15 || command -v clang)}
PTXAS=${PTXAS:-$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)}
# shellcheck disable=SC2086 # the defines are a list
"$CLANG" -x cl -cl-std=CL1.2 -target nvptx64-nvidia-nvcl -Xclang -finclude-default-header -O3 \
  -Wno-everything -S -DPTX_ASM=__asm__ $defs "$tmp/src.cl" -o "$tmp/out.ptx"
sed -i 's/^\.version .*/.version 8.0/; s/^\.target .*/.target sm_90/' "$tmp/out.ptx"
"$PTXAS" -arch=sm_90 -c -v "$tmp/out.ptx" -o "$tmp/out.o" 2>&1 |
  grep -A3 "Compiling entry" | grep -E "entry|Used|spill"
