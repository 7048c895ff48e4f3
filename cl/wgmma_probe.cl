/* Probe of cl/wgmma_ops.cl, run once per context before a kernel with WGMMA = 1 is chosen
 * (src/mma.c). One warpgroup (one warp in the emulation) stages two B matrices with
 * small integer entries (exact in f16 and bf16) in the layouts of the kernels' tiles, a
 * K-major one (WG_N_S = 32 columns) and an MN-major one (WG_N_V = 64 columns), multiplies
 * its 64 x 16 A (from registers) by each with wg_mma_k and wg_mma_t, and writes every
 * lane's accumulators. The host recomputes them from closed forms: a driver that cannot
 * build the patched PTX, or a descriptor this project misread, fails here and the
 * context keeps the mma.sync kernels.
 */
#if WG_N_S != 32 || WG_N_V != 64
#error "wgmma_probe.cl: the host checks 32 and 64 columns"
#endif
inline float wgp_a(int r, int k) { return (float)((r * 3 + k * 5) % 7 - 3); }
inline float wgp_bk(int k, int n) { return (float)((k * 2 + n * 3) % 5 - 2); }
inline float wgp_bt(int k, int n) { return (float)((k * 5 + n) % 9 - 4); }

__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void wgmma_probe(__global float *out) {
  /* K-major: unit (n, k-octet kk) at (n / 8) * 16 + kk * 8 + n % 8 (lbo 8, sbo 16);
   * MN-major: unit (k, n-octet o) at (k / 8) * 64 + o * 8 + k % 8 (lbo 64, sbo 8) */
  __local uint4 tk[64] __attribute__((aligned(128)));
  __local uint4 tt[128] __attribute__((aligned(128)));
  __local ushort *hk = (__local ushort *)tk, *ht = (__local ushort *)tt;
  WARP_SCRATCH(wx);
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  for (int i = lid; i < 32 * 16; i += WG) {
    const int n = i / 16, k = i % 16;
    hk[((n / 8) * 16 + (k / 8) * 8 + n % 8) * 8 + k % 8] = (ushort)(pack2(wgp_bk(k, n), 0.0f));
  }
  for (int i = lid; i < 16 * 64; i += WG) {
    const int k = i / 64, n = i % 64;
    ht[((k / 8) * 64 + (n / 8) * 8 + k % 8) * 8 + n % 8] = (ushort)(pack2(wgp_bt(k, n), 0.0f));
  }
  wg_proxy_fence();
  barrier(CLK_LOCAL_MEM_FENCE);
  const int r0 = 16 * warp + gid, r1 = r0 + 8, c0 = 2 * tig;
  const uint4 a = (uint4)(pack2(wgp_a(r0, c0), wgp_a(r0, c0 + 1)), pack2(wgp_a(r1, c0), wgp_a(r1, c0 + 1)),
                          pack2(wgp_a(r0, c0 + 8), wgp_a(r0, c0 + 9)),
                          pack2(wgp_a(r1, c0 + 8), wgp_a(r1, c0 + 9)));
  float dk[16], dt[32];
  for (int i = 0; i < 16; i++) dk[i] = (float)i;
  for (int i = 0; i < 32; i++) dt[i] = 0.0f;
  wg_fence();
  wg_mma_k(dk, a, tk, 8, 16, wx);
  wg_mma_t(dt, a, tt, 64, 8, wx);
  wg_commit();
  wg_wait0();
  wg_hold(dk, 16);
  wg_hold(dt, 32);
  __global float *o = out + 48 * lid;
  for (int i = 0; i < 16; i++) o[i] = dk[i];
  for (int i = 0; i < 32; i++) o[16 + i] = dt[i];
}
