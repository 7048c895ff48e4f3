/* Bodies for the OpenCL builtins the kernels call, so that clang's nvptx output links
 * inside ptxas without libclc (tools/ptx_check.sh: register and spill counts only). */
size_t __attribute__((overloadable)) get_group_id(uint d) {
  return d == 0 ? __nvvm_read_ptx_sreg_ctaid_x() : d == 1 ? __nvvm_read_ptx_sreg_ctaid_y() : __nvvm_read_ptx_sreg_ctaid_z();
}
size_t __attribute__((overloadable)) get_local_id(uint d) {
  return d == 0 ? __nvvm_read_ptx_sreg_tid_x() : d == 1 ? __nvvm_read_ptx_sreg_tid_y() : __nvvm_read_ptx_sreg_tid_z();
}
void __attribute__((overloadable)) barrier(cl_mem_fence_flags f) { (void)f; __nvvm_bar_sync(0); }
int __attribute__((overloadable)) min(int a, int b) { return a < b ? a : b; }
int __attribute__((overloadable)) max(int a, int b) { return a > b ? a : b; }
int __attribute__((overloadable)) clamp(int x, int a, int b) { return x < a ? a : x > b ? b : x; }
float __attribute__((overloadable)) fmax(float a, float b) { return __nvvm_fmax_f(a, b); }
float __attribute__((overloadable)) exp2(float a) { return __nvvm_ex2_approx_f(a); }
float __attribute__((overloadable)) log2(float a) { return __nvvm_lg2_approx_f(a); }
int __attribute__((overloadable)) isnan(float a) { return a != a; }
float __attribute__((overloadable)) fmin(float a, float b) { return __nvvm_fmin_f(a, b); }
uint __attribute__((overloadable)) popcount(uint x) { return __builtin_popcount(x); }
