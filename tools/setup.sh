#!/usr/bin/env bash
# One-command set-up for clnsa on Debian/Ubuntu.
#   tools/setup.sh demo   install what is missing, build, run `clnsa demo` (the main job)
#   tools/setup.sh test   install what is missing, build, run the whole test suite:
#                         `meson test` (unit + device tests on CLNSA_DEVICE, PoCL by default),
#                         every kernel under Oclgrind, and the unit tests under ASan+UBSan.
# Packages are installed only when missing, with apt-get (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-demo}
packages=(build-essential meson ninja-build pkg-config python3 python3-numpy
  ocl-icd-opencl-dev opencl-headers opencl-c-headers ocl-icd-libopencl1 pocl-opencl-icd clinfo
  libcmocka-dev libxxhash-dev oclgrind)

install_missing() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build() {
  local dir=$1; shift
  [ -f "$dir/build.ninja" ] || meson setup "$dir" "$@"
  ninja -C "$dir"
}

install_missing
build build
case "$mode" in
  demo)
    build/tools/clnsa demo
    ;;
  test)
    meson test -C build --suite unit --suite gpu --print-errorlogs
    meson test -C build --suite oclgrind --print-errorlogs
    build build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      meson test -C build-asan --suite unit --print-errorlogs
    ;;
  *)
    echo "usage: tools/setup.sh demo|test" >&2
    exit 2
    ;;
esac
