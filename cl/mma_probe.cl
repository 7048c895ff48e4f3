/* Probe of cl/warp_ops.cl, run once per context before any tensor-core kernel is chosen
 * (src/mma.c). One warp builds its fragments of A (16x16) and B (16x8) from closed forms
 * with small integer values (exact in f16 and bf16), multiplies them with mma_16816, and
 * writes, per lane: the 4 accumulators, a movmatrix transpose of an 8x8 matrix of
 * element numbers, a butterfly shuffle of the lane number, pack2 of two constants, and
 * the 4 words of an ldmatrix_x4_t of four 8x8 matrices of element numbers in local memory
 * (PROBE_OUT floats a lane).
 * The host recomputes everything from the documented fragment layouts: a driver that
 * miscompiles the PTX, or a layout this project misread, fails here and the context keeps
 * the portable kernels.
 */
inline float probe_a(int r, int k) { return (float)((r * 3 + k * 5) % 7 - 3); }
inline float probe_b(int k, int n) { return (float)((k * 2 + n * 3) % 5 - 2); }

#define PROBE_OUT 12

__kernel __attribute__((reqd_work_group_size(32, 1, 1))) void mma_probe(__global float *out) {
  WARP_SCRATCH(wx);
  __local uint4 rows[32] __attribute__((aligned(16)));
  const int lane = get_local_id(0), gid = lane >> 2, tig = lane & 3;
  const int c0 = 2 * tig;
  const uint a0 = pack2(probe_a(gid, c0), probe_a(gid, c0 + 1));
  const uint a1 = pack2(probe_a(gid + 8, c0), probe_a(gid + 8, c0 + 1));
  const uint a2 = pack2(probe_a(gid, c0 + 8), probe_a(gid, c0 + 9));
  const uint a3 = pack2(probe_a(gid + 8, c0 + 8), probe_a(gid + 8, c0 + 9));
  const uint b0 = pack2(probe_b(c0, gid), probe_b(c0 + 1, gid));
  const uint b1 = pack2(probe_b(c0 + 8, gid), probe_b(c0 + 9, gid));
  float c[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  mma_16816(c, a0, a1, a2, a3, b0, b1, wx);
  const uint t = movmatrix_t(pack2((float)(gid * 8 + c0), (float)(gid * 8 + c0 + 1)), wx);
  const float s = shfl_xor((float)lane, 5, wx);
  const uint p = pack2(1.5f, -2.0f);
  /* row lane % 8 of matrix lane / 8: element j is 64 (lane / 8) + 8 (lane % 8) + j */
  uint w[4];
  for (int j = 0; j < 4; j++)
    w[j] = pack2((float)(8 * lane + 2 * j), (float)(8 * lane + 2 * j + 1));
  rows[lane] = (uint4)(w[0], w[1], w[2], w[3]);
  barrier(CLK_LOCAL_MEM_FENCE);
  const uint4 lm = ldmatrix_x4_t(rows + lane, wx);
  __global float *o = out + PROBE_OUT * lane;
  o[0] = c[0], o[1] = c[1], o[2] = c[2], o[3] = c[3];
  o[4] = as_float(t), o[5] = s, o[6] = as_float(p), o[7] = 0.0f;
  o[8] = as_float(lm.x), o[9] = as_float(lm.y), o[10] = as_float(lm.z), o[11] = as_float(lm.w);
}
