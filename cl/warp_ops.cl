/* Warp-level matrix primitives of the NVIDIA tensor-core kernels (cl/attend_mma.cl):
 *   mma_16816   D = A B + C, A 16x16 and B 16x8 in f16 or bf16 (MMA_DT), C and D f32;
 *   mma_1688_tf32  D = A B + C, A 16x8 and B 8x8 in tf32 (f32 words), C and D f32
 *               (cl/attend_tf32.cl);
 *   tf32_round  a float rounded to tf32 (10 mantissa bits; nearest, ties away from zero)
 *               as f32 bits, what mma_1688_tf32 takes;
 *   movmatrix_t transpose of an 8x8 matrix of 16-bit words held across the warp;
 *   ldmatrix_x4_t  four 8x8 matrices of 16-bit words from local memory, transposed:
 *               lane 8i + r gives the address of row r of matrix i (16 bytes, aligned),
 *               and r[i] of every lane is then its movmatrix_t layout of matrix i^T (so
 *               the B fragment words of a product contracting over the matrix rows);
 *   shfl_xor    butterfly exchange of a float between lanes;
 *   pack2       two floats rounded (nearest even) into a pair of MMA_DT words;
 *   warp_sync   the warp's lanes meet, and their local-memory writes become visible;
 *   cp_async16  16 bytes from global to local memory without passing through registers
 *               (cp.async.cg, Ampere and later): the copy is in flight until the work-item
 *               waits for it; cp_async_commit() closes the work-item's pending copies into
 *               a group, cp_async_wait(N) (N a literal) returns once at most N of its groups
 *               are still in flight. Other work-items see the data after their own wait
 *               and a barrier (or warp_sync within a warp). Both addresses 16-byte aligned.
 * On NVIDIA each is one PTX instruction through inline asm (verified under NVIDIA's OpenCL
 * driver, docs/GPU.md). With -DWARP_EMULATE=1 they go through local memory instead, so
 * that every fragment layout of the callers runs, and is tested, on any OpenCL device
 * (PoCL in CI). The emulation needs a work-group of exactly one warp (32 work-items) that
 * calls them with uniform control flow; it is slow and exists for tests.
 *
 * Fragments (PTX ISA, "matrix fragments for mma.m16n8k16"). Lane = 4 * gid + tig; a
 * 32-bit register holds two 16-bit elements, the lower index in the lower half.
 *   A 16x16, row-major:  a0 = A[gid][2tig..2tig+1]    a1 = A[gid+8][2tig..2tig+1]
 *                        a2 = A[gid][2tig+8..2tig+9]  a3 = A[gid+8][2tig+8..2tig+9]
 *   B 16x8, col-major:   b0 = B[2tig..2tig+1][gid]    b1 = B[2tig+8..2tig+9][gid]
 *   C 16x8, f32:         c0, c1 = C[gid][2tig, 2tig+1]   c2, c3 = C[gid+8][2tig, 2tig+1]
 *   8x8 (movmatrix):     r = M[gid][2tig..2tig+1]
 * and for mma.m16n8k8 with .tf32 operands (one element per 32-bit register; the same C):
 *   A 16x8, row-major:   a0 = A[gid][tig]  a1 = A[gid+8][tig]  a2 = A[gid][tig+4]
 *                        a3 = A[gid+8][tig+4]
 *   B 8x8, col-major:    b0 = B[tig][gid]  b1 = B[tig+4][gid]
 * The tensor cores read the upper 19 bits of a tf32 operand; tf32_round (cvt.rna) makes
 * that a deterministic round-to-nearest instead of a truncation.
 */
#ifndef MMA_DT
#define MMA_DT 2 /* 1 f16, 2 bf16 */
#endif
#ifndef WARP_EMULATE
#define WARP_EMULATE 0
#endif

#if MMA_DT == 1
#define MMA_PTX_TYPE "f16"
#elif MMA_DT == 2
#define MMA_PTX_TYPE "bf16"
#else
#error "warp_ops.cl: MMA_DT must be 1 (f16) or 2 (bf16)"
#endif

/* NVIDIA's OpenCL compiler takes GNU `asm` (its inline-PTX sample does); clang's OpenCL
 * mode, which tools/ptx_check.sh uses to read register counts, only `__asm__`. */
#ifndef PTX_ASM
#define PTX_ASM asm
#endif

#if !WARP_EMULATE

/* Scratch for the emulation; nothing on the hardware path. */
#define WARP_SCRATCH(name) __local uint *name = (__local uint *)0

inline void mma_16816(float *c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                      __local uint *x) {
  (void)x;
  PTX_ASM("mma.sync.aligned.m16n8k16.row.col.f32." MMA_PTX_TYPE "." MMA_PTX_TYPE ".f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

inline void mma_1688_tf32(float *c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                          __local uint *x) {
  (void)x;
  PTX_ASM("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

inline uint tf32_round(float v) {
  uint d;
  PTX_ASM("cvt.rna.tf32.f32 %0, %1;" : "=r"(d) : "f"(v));
  return d;
}

inline uint movmatrix_t(uint a, __local uint *x) {
  (void)x;
  uint d;
  PTX_ASM("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
  return d;
}

/* volatile, but no "memory" clobber: every caller orders its stores to the rows and
 * these reads by barriers or warp_sync (whose asm has one); the clobber made the
 * compiler reload values around each read (ptxas, compressed attention: more spills) */
inline uint4 ldmatrix_x4_t(__local const uint4 *row, __local uint *x) {
  (void)x;
  uint4 d;
  PTX_ASM volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(d.x), "=r"(d.y), "=r"(d.z), "=r"(d.w)
                   : "r"((uint)(size_t)row));
  return d;
}

inline float shfl_xor(float v, int mask, __local uint *x) {
  (void)x;
  uint d;
  PTX_ASM volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;"
               : "=r"(d)
               : "r"(as_uint(v)), "r"(mask));
  return as_float(d);
}

inline void warp_sync(__local uint *x) {
  (void)x;
  PTX_ASM volatile("bar.warp.sync 0xffffffff;" ::: "memory");
}

inline void cp_async16(__local void *d, __global const void *s) {
  PTX_ASM volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                   :
                   : "r"((uint)(size_t)d), "l"((ulong)(size_t)s)
                   : "memory");
}

inline void cp_async_commit(void) {
  PTX_ASM volatile("cp.async.commit_group;" ::: "memory");
}

#define cp_async_wait(n) PTX_ASM volatile("cp.async.wait_group " #n ";" ::: "memory")

/* lo into the lower half, hi into the upper (cvt puts its first source in the upper). */
inline uint pack2(float lo, float hi) {
  uint d;
  PTX_ASM("cvt.rn." MMA_PTX_TYPE "x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

#else /* WARP_EMULATE */

#define WARP_SCRATCH(name) __local uint name[32 * 6]

inline float mma_elem(uint w, int upper) {
  const uint h = upper ? w >> 16 : w & 0xffffu;
#if MMA_DT == 1
  return f16_bits(h);
#else
  return as_float(h << 16);
#endif
}

/* One emulated mma: every lane leaves its fragment words in x, then computes its four C
 * elements from everyone's. TF32 = 0: m16n8k16 with two 16-bit elements per word, column
 * or row k in lane tig = (k % 8) / 2, register k / 8; TF32 = 1: m16n8k8 with one element
 * per word (the hardware multiplies its upper 19 bits exactly), in lane tig = k % 4,
 * register k / 4. Products by fma, sums in f32. */
inline void mma_emulated(float *c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                         __local uint *x, const int tf32) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  __local uint *mine = x + 6 * lane;
  mine[0] = a0, mine[1] = a1, mine[2] = a2, mine[3] = a3, mine[4] = b0, mine[5] = b1;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int i = 0; i < 4; i++) {
    const int row = gid + 8 * (i >> 1), col = 2 * tig + (i & 1);
    float s = 0.0f;
    for (int k = 0; k < (tf32 ? 8 : 16); k++) {
      const int kl = tf32 ? k & 3 : (k & 7) >> 1, reg = tf32 ? k >> 2 : k >> 3;
      const uint aw = x[6 * ((row & 7) * 4 + kl) + (row >> 3) + 2 * reg];
      const uint bw = x[6 * (col * 4 + kl) + 4 + reg];
      s = tf32 ? fma(as_float(aw & 0xffffe000u), as_float(bw & 0xffffe000u), s)
               : fma(mma_elem(aw, k & 1), mma_elem(bw, k & 1), s);
    }
    c[i] += s;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
}

inline void mma_16816(float *c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                      __local uint *x) {
  mma_emulated(c, a0, a1, a2, a3, b0, b1, x, 0);
}

inline void mma_1688_tf32(float *c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
                          __local uint *x) {
  mma_emulated(c, a0, a1, a2, a3, b0, b1, x, 1);
}

/* cvt.rna.tf32.f32: add half a unit of the 13 dropped bits to the magnitude, truncate;
 * infinities and NaN pass unchanged. */
inline uint tf32_round(float v) {
  const uint u = as_uint(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

inline uint movmatrix_t(uint a, __local uint *x) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  x[lane] = a;
  barrier(CLK_LOCAL_MEM_FENCE);
  uint d = 0u;
  for (int e = 0; e < 2; e++) { /* element (gid, 2tig+e) of the transpose = M[2tig+e][gid] */
    const uint w = x[(2 * tig + e) * 4 + (gid >> 1)];
    d |= ((gid & 1) ? w >> 16 : w & 0xffffu) << (16 * e);
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return d;
}

/* Every lane leaves its row in x (4 words a lane: the scratch is 192), then builds its
 * words: element (gid, 2tig + e) of matrix i^T = element gid of row 2tig + e of matrix i,
 * that is of lane 8i + 2tig + e's row. */
inline uint4 ldmatrix_x4_t(__local const uint4 *row, __local uint *x) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  const uint4 mine = *row;
  x[4 * lane] = mine.x, x[4 * lane + 1] = mine.y;
  x[4 * lane + 2] = mine.z, x[4 * lane + 3] = mine.w;
  barrier(CLK_LOCAL_MEM_FENCE);
  uint d[4];
  for (int i = 0; i < 4; i++) {
    d[i] = 0u;
    for (int e = 0; e < 2; e++) {
      const uint w = x[4 * (8 * i + 2 * tig + e) + (gid >> 1)];
      d[i] |= ((gid & 1) ? w >> 16 : w & 0xffffu) << (16 * e);
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return (uint4)(d[0], d[1], d[2], d[3]);
}

inline float shfl_xor(float v, int mask, __local uint *x) {
  const int lane = get_local_id(0) & 31;
  x[lane] = as_uint(v);
  barrier(CLK_LOCAL_MEM_FENCE);
  const float r = as_float(x[lane ^ mask]);
  barrier(CLK_LOCAL_MEM_FENCE);
  return r;
}

inline void warp_sync(__local uint *x) {
  (void)x;
  barrier(CLK_LOCAL_MEM_FENCE);
}

/* The emulated copy is synchronous: commit and wait have nothing to do. */
inline void cp_async16(__local void *d, __global const void *s) {
  *(__local uint4 *)d = *(__global const uint4 *)s;
}

inline void cp_async_commit(void) {
}

#define cp_async_wait(n) ((void)0)

inline uint round16(float v) {
#if MMA_DT == 1
  ushort h;
  vstore_half_rte(v, 0, (__private half *)&h);
  return h;
#else
  uint u = as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#endif
}

inline uint pack2(float lo, float hi) {
  return round16(lo) | (round16(hi) << 16);
}

#endif /* WARP_EMULATE */
