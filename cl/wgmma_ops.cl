/* Hopper's warpgroup matrix instructions (wgmma, PTX target sm_90a) for the tensor-core
 * kernels whose work-groups are whole warpgroups (4 consecutive warps); needs
 * cl/warp_ops.cl first. Used by the compressed and window branches of cl/attend_mma.cl
 * (WGMMA = 1, opt-in through CLNSA_TUNE=WGMMA=1), where a group's rows share every staged
 * K/V tile. Off by default: the 48 KiB of local memory a work-group gets under NVIDIA's
 * OpenCL hold tiles of 32 or 64 keys, and wgmma that narrow ran slower than mma.sync
 * (docs/PERFORMANCE.md, section 6).
 *
 * NVIDIA's OpenCL compiler targets sm_90, where ptxas refuses wgmma. Each instruction is
 * therefore written as a PTX comment that starts with WG_MARK: the compiler substitutes
 * the operands into it like into any inline asm, and src/program.c, finding the marker in
 * the PTX the driver returns, removes it, retargets the module to sm_90a and builds that
 * PTX again (verified on the H100 with NVIDIA's driver 580; docs/GPU.md). A device where
 * that fails never gets here: src/mma.c runs cl/wgmma_probe.cl first.
 *
 *   wg_mma_k / wg_mma_t  D += A B for the warpgroup's 64 rows: A is this warp's 16 rows,
 *                        held as the mma.m16n8k16 A fragment (a.x..a.w = a0..a3); B (16 x N,
 *                        N = WG_N_S or WG_N_V) is read from local memory by the tensor
 *                        cores; D is N/2 floats a lane, per 8 columns the mma C fragment.
 *   wg_fence             orders this lane's register writes before the next wgmma;
 *   wg_commit, wg_wait0  close the issued wgmma into a group, wait for all groups;
 *   wg_hold              after wg_wait0: the compiler may not read D before it;
 *   wg_proxy_fence       local-memory stores by ordinary instructions made visible to the
 *                        tensor cores' reads (each writer, before the barrier).
 *
 * Staged tiles (no swizzle): a core matrix is 8 rows of 16 bytes, 8 consecutive uint4.
 * Core matrix (o, kk), o the 8-column group of B's N and kk the 8-row group of its K
 * (the contraction), starts at uint4 t + o * sbo + kk * lbo (the descriptor's stride and
 * leading byte offsets divided by 16).
 *  - wg_mma_k (K-major B, S = Q K^T from a K tile): a core matrix row is one key (a
 *    column of B) holding 8 consecutive head dims (k values).
 *  - wg_mma_t (MN-major B, O = P V from a V tile): a core matrix row is one key (a k
 *    value) holding 8 consecutive head dims (columns of B); the instruction's transpose
 *    flag is set.
 * The probe confirmed that lbo steps along K and sbo along N in both cases.
 *
 * With -DWARP_EMULATE=1 (tests on CPUs: one warp per group, standing for its warpgroup)
 * each wgmma is N/8 emulated mma_16816 whose B fragments are read from the same tile
 * with the same strides, so the kernels' tile layouts are tested on any device; the
 * descriptor encoding itself is the probe's.
 */
#ifndef WG_N_S
#define WG_N_S 32 /* columns of a wg_mma_k: keys per step */
#endif
#ifndef WG_N_V
#define WG_N_V 64 /* columns of a wg_mma_t: head dims per instruction */
#endif

#if !WARP_EMULATE

#define WG_MARK "// @sm90a@ "

inline void wg_fence(void) {
  PTX_ASM volatile(WG_MARK "wgmma.fence.sync.aligned;" ::: "memory");
}
inline void wg_commit(void) {
  PTX_ASM volatile(WG_MARK "wgmma.commit_group.sync.aligned;" ::: "memory");
}
inline void wg_wait0(void) {
  PTX_ASM volatile(WG_MARK "wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
inline void wg_proxy_fence(void) {
  PTX_ASM volatile(WG_MARK "fence.proxy.async.shared::cta;" ::: "memory");
}
#define wg_hold(d, n)                                                  \
  do {                                                                 \
    _Pragma("unroll") for (int hold_i = 0; hold_i < (n); hold_i++)     \
        PTX_ASM volatile("" : "+f"((d)[hold_i])::"memory");            \
  } while (0)

/* Shared-memory matrix descriptor: start address, leading and stride byte offsets, each
 * in 16-byte units (14 bits), no swizzle. */
inline ulong wg_desc(__local const uint4 *t, int lbo, int sbo) {
  const uint a = (uint)(size_t)t;
  return (ulong)((a >> 4) & 0x3fffu) | (ulong)((uint)lbo & 0x3fffu) << 16 |
         (ulong)((uint)sbo & 0x3fffu) << 32;
}

#define WG_R8(b) "%" #b "0, %" #b "1, %" #b "2, %" #b "3, %" #b "4, %" #b "5, %" #b "6, %" #b "7"
#define WG_F8(d, b)                                                                       \
  "+f"((d)[b + 0]), "+f"((d)[b + 1]), "+f"((d)[b + 2]), "+f"((d)[b + 3]), "+f"((d)[b + 4]), \
      "+f"((d)[b + 5]), "+f"((d)[b + 6]), "+f"((d)[b + 7])

/* m64n32k16: D in %0-%15, A %16-%19, descriptor %20, scale-d %21 */
#define WG_ASM32(TNSP, d, a, desc)                                                            \
  PTX_ASM volatile(WG_MARK "{ .reg .pred p; setp.ne.b32 p, %21, 0; "                          \
                           "wgmma.mma_async.sync.aligned.m64n32k16.f32." MMA_PTX_TYPE           \
                           "." MMA_PTX_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "   \
                           "%11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, " TNSP \
                           "; }"                                                              \
                   : WG_F8(d, 0), WG_F8(d, 8)                                                 \
                   : "r"((a).x), "r"((a).y), "r"((a).z), "r"((a).w), "l"(desc), "r"(1)        \
                   : "memory")
/* m64n64k16: D in %0-%31, A %32-%35, descriptor %36, scale-d %37 */
#define WG_ASM64(TNSP, d, a, desc)                                                              \
  PTX_ASM volatile(WG_MARK "{ .reg .pred p; setp.ne.b32 p, %37, 0; "                            \
                           "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_PTX_TYPE             \
                           "." MMA_PTX_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "     \
                           "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "    \
                           "%24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, " \
                           "p, 1, 1, " TNSP "; }"                                               \
                   : WG_F8(d, 0), WG_F8(d, 8), WG_F8(d, 16), WG_F8(d, 24)                       \
                   : "r"((a).x), "r"((a).y), "r"((a).z), "r"((a).w), "l"(desc), "r"(1)          \
                   : "memory")
#define WG_ASM(N, TNSP, d, a, desc) CAT(WG_ASM, N)(TNSP, d, a, desc)

inline void wg_mma_k(float *d, uint4 a, __local const uint4 *t, int lbo, int sbo,
                     __local uint *x) {
  (void)x;
  const ulong desc = wg_desc(t, lbo, sbo);
  WG_ASM(WG_N_S, "0", d, a, desc);
}
inline void wg_mma_t(float *d, uint4 a, __local const uint4 *t, int lbo, int sbo,
                     __local uint *x) {
  (void)x;
  const ulong desc = wg_desc(t, lbo, sbo);
  WG_ASM(WG_N_V, "1", d, a, desc);
}

#else /* WARP_EMULATE: synchronous, one warp */

inline void wg_fence(void) {
}
inline void wg_commit(void) {
}
inline void wg_wait0(void) {
}
inline void wg_proxy_fence(void) {
}
#define wg_hold(d, n) ((void)0)

inline void wg_mma_k(float *d, uint4 a, __local const uint4 *t, int lbo, int sbo,
                     __local uint *x) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  for (int o = 0; o < WG_N_S / 8; o++) {
    const uint b0 = ((__local const uint *)(t + o * sbo + gid))[tig];
    const uint b1 = ((__local const uint *)(t + o * sbo + lbo + gid))[tig];
    mma_16816(d + 4 * o, a.x, a.y, a.z, a.w, b0, b1, x);
  }
}
inline void wg_mma_t(float *d, uint4 a, __local const uint4 *t, int lbo, int sbo,
                     __local uint *x) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  for (int o = 0; o < WG_N_V / 8; o++) {
    __local const ushort *lo = (__local const ushort *)(t + o * sbo);
    __local const ushort *hi = (__local const ushort *)(t + o * sbo + lbo);
    const uint b0 = (uint)lo[16 * tig + gid] | (uint)lo[16 * tig + 8 + gid] << 16;
    const uint b1 = (uint)hi[16 * tig + gid] | (uint)hi[16 * tig + 8 + gid] << 16;
    mma_16816(d + 4 * o, a.x, a.y, a.z, a.w, b0, b1, x);
  }
}

#endif /* WARP_EMULATE */
