# Source on the lent NVIDIA machine from the repo root (see docs/GPU.md): unpacks the Debian
# packages carried in .ocl/ (fetched here by tools/gpu-fetch-debs.sh) into /tmp/ocl and points
# pkg-config, the compiler, the linker and the OpenCL ICD loader at them and at NVIDIA's driver.
mkdir -p /tmp/ocl /tmp/vend
for f in .ocl/*.deb; do dpkg -x "$f" /tmp/ocl; done
echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /tmp/vend/nvidia.icd
export OCL_ICD_VENDORS=/tmp/vend
export PKG_CONFIG_PATH=/tmp/ocl/usr/lib/x86_64-linux-gnu/pkgconfig:/tmp/ocl/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=/tmp/ocl
export LD_LIBRARY_PATH=/tmp/ocl/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CPATH=/tmp/ocl/usr/include
export LIBRARY_PATH=/tmp/ocl/usr/lib/x86_64-linux-gnu
export CLNSA_DEVICE=${CLNSA_DEVICE:-NVIDIA}
