#!/usr/bin/env bash
# Run here (Debian): downloads the packages the GPU machine lacks into .ocl/ (git-ignored),
# to be carried there and unpacked by tools/gpu-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .ocl && cd .ocl
apt-get download ocl-icd-libopencl1 ocl-icd-opencl-dev opencl-c-headers opencl-headers \
  libcmocka0 libcmocka-dev libclblast1 libclblast-dev clinfo libxxhash0 libxxhash-dev
