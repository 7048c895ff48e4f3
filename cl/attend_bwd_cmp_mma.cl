/* Tensor-core backward of the compressed branch (NVIDIA mma.sync: cl/warp_ops.cl): the
 * kernels bwd_dq_compressed and bwd_dkdv_compressed of cl/attend_bwd.cl with the same
 * arguments, scratch regions, partial-sum layout and outputs. Built after
 * cl/attend_bwd_mma.cl (same program: its fragment helpers mma_dims, pack_a, mma_rows,
 * LD8 and its header's notation). src/backward.c takes these where the selected pair runs
 * on tensor cores, the k_cmp/v_cmp rows are aligned and either q is bf16 with the
 * forward's f32 k_cmp/v_cmp (KC_DT = VC_DT = 0), or the forward kept k_cmp/v_cmp in q's
 * 16-bit dtype (CLNSA_FLAG_CMP_16BIT: KC_DT = VC_DT = MMA_DT, f16 or bf16). In the 16-bit
 * case (CK_SPLIT = 0) every k_cmp and v_cmp word enters the tensor cores as it is, and the
 * lo terms below (their staged words, A slots and mma) do not exist.
 *
 * The keys are the forward's f32 k_cmp, v_cmp rows (one per block); each k_cmp value x
 * enters as bf16 hi = bf16(x) and lo = bf16(x - hi), both through the tensor cores (as
 * cl/attend_mma.cl's forward does for K), so q.k_cmp, hence P, keeps near-f32 accuracy.
 * v_cmp enters as its bf16 term alone (CV_SPLIT=1 adds the lo term): dP = do.v_cmp then
 * carries bf16 rounding, the size of the rounding of P and dS to bf16 as A operands, for
 * a quarter fewer local-memory fragment reads and mma in dk/dv (the dk/dv kernel is
 * bound by those reads: every step re-reads its blocks' fragments from local memory). An f16 split
 * would lose the lo terms of small values to f16's range, and mma takes one type for A and
 * B, so f16 q runs the portable kernels.
 *  - bwd_dq_compressed_mma: a group owns 16 CQ_NW consecutive flattened rows (token * G +
 *    g) of a sequence, warp w rows 16w .. 16w + 15; the group walks the blocks its last
 *    row sees in tiles of CKT, each staged once in local memory (hi and lo, 64-byte padded
 *    rows as in attend_mma.cl's STAGE, k rows RSWZ-swizzled) and read by every warp. S
 *    and dP take q and do rows as A (registers), the tile as B; dq += dS (Kc hi + Kc lo)
 *    with B read transposed by ldmatrix (mma_rows_ldm). Every dq row has one warp as its
 *    writer, adding scale * acc to the accumulator once, with the tiles in block order:
 *    deterministic.
 *    ptxas (tools/ptx_check.sh): 254 registers, no spills at DK = DV = 128.
 *  - bwd_dkdv_compressed_mma: a group owns 16 CKV_NW blocks and one token chunk (the
 *    partial-sum layout of bwd_dkdv_compressed); warp w owns 16 blocks as the M side and
 *    walks the chunk's rows from its first block's last token on, 16 per step, in
 *    increasing order: S^T = Kc Q^T and dP^T = Vc do^T, then dv += (g P)^T do and dk +=
 *    dS^T Q (dkdv_step). The blocks' hi and lo A fragments wait in local memory (each lane
 *    its own KV_ALL slots, in mma register order, no synchronisation). Each step's 16 rows
 *    (q and do, RLD8-padded) wait there too, in two stages the group's warps share: the
 *    next step's rows arrive by cp.async (each warp its share of every row; warp 0 loads
 *    their lse, delta and gate by plain loads kept in registers for a step) while this
 *    step computes, since a step fed straight from global memory waited on L2 latency with
 *    nothing to hide it (2 warps per scheduler; H100, T = 65536: 54.6 -> 25.7 ms). The
 *    group walks from its first block's last token on, so a warp's rows before its own
 *    blocks are masked (lim); sharing the rows between two warps: 25.3 -> 21.5 ms. One
 *    barrier a step, as in bwd_dkdv_selected_mma; rows past the walk copy its last row
 *    (lim = 0 masks them). One writer per block row, fixed order: deterministic. At DK =
 *    DV = 128: 12 KiB of fragments a warp and 18.5 KiB of stages a group, so CKV_NW = 2
 *    (NVIDIA's 48 KiB a group); ptxas (tools/ptx_check.sh) takes 255 registers but needs
 *    about 190 (-maxrregcount 192: same result), one word spilled outside the walk.
 * Masked pairs (block not yet complete at the row's token, row past the walk) get P = dS
 * = 0; loads past the end read zeros (dq) or a clamped row (dk/dv).
 *
 * Why not one dk/dv step shared with bwd_dkdv_selected_mma: a version of the selected
 * kernel rewritten onto dkdv_step passed the emulation but hung on an H100 (f16, DK = 64,
 * DV = 32, G = 3; commit a666f3d), cause not found; the selected pair stays in the form
 * verified on hardware.
 */
#ifndef KC_DT /* k_cmp, v_cmp: f32 (0), or MMA_DT with CLNSA_FLAG_CMP_16BIT */
#define KC_DT 0
#endif
#ifndef VC_DT
#define VC_DT 0
#endif
#if (MMA_DT == 2 && KC_DT == 0 && VC_DT == 0) || (KC_DT == MMA_DT && VC_DT == MMA_DT)
#define CK_SPLIT (KC_DT == 0) /* f32 k_cmp enters as bf16 hi + lo; 16-bit as itself */
#define KC_TERMS (1 + CK_SPLIT)
#ifndef CQ_NW
#define CQ_NW 4 /* bwd_dq_compressed_mma: warps per group, 16 rows each */
#endif
#ifndef CQ_BATCH /* bwd_dq_compressed_mma: 1 issues a staged tile's loads all at once */
#define CQ_BATCH 1
#endif
#define CQ_KIT ((CKT * (DK / 8) + 32 * CQ_NW - 1) / (32 * CQ_NW)) /* loads a work-item */
#define CQ_VIT ((CKT * (DV / 8) + 32 * CQ_NW - 1) / (32 * CQ_NW))
/* The 8 elements of a 16-byte unit of a staged tile as loaded: two float4 (f32 k_cmp,
 * v_cmp) or one uint4 (16-bit) */
#if CK_SPLIT
#define CQ_RAW float4
#define CQ_RAWN 2
#else
#define CQ_RAW uint4
#define CQ_RAWN 1
#endif
/* r[it] = unit lid + it 32 CQ_NW of the tile's blocks k0 .. k0 + CKT - 1 of tensor t (ld
 * units a row; blocks past kend read the last one), all loads issued before any is used
 * (CQ_BATCH) */
#define CQ_LOADS(r, t, ld)                                                                \
  _Pragma("unroll") for (int it = 0; it < (CKT * (ld) + 32 * CQ_NW - 1) / (32 * CQ_NW); it++) { \
    const int x = min(lid + it * 32 * CQ_NW, CKT * (ld) - 1), j = x / (ld);              \
    __global const CQ_RAW *p = (__global const CQ_RAW *)(t + TIDX(t, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * (x - j * (ld))); \
    _Pragma("unroll") for (int w = 0; w < CQ_RAWN; w++) r[it][w] = p[w];                 \
  }
/* The units CQ_LOADS brought into r, split (cq_terms) and stored in the staged tile st
 * (LDS units a row, RSWZ-swizzled where swz, a constant): the hi words, and where lo_too
 * (a constant) the lo words CKT rows on */
#define CQ_STORES(r, st, ld, LDS, lo_too, swz)                                            \
  _Pragma("unroll") for (int it = 0; it < (CKT * (ld) + 32 * CQ_NW - 1) / (32 * CQ_NW); it++) { \
    const int x = lid + it * 32 * CQ_NW, j = x / (ld), u = (x - j * (ld)) ^ ((swz) ? RSWZ(j) : 0); \
    uint4 hi, lo;                                                                        \
    cq_terms(r[it], k0 + j < kend, &hi, &lo);                                            \
    if (x < CKT * (ld)) {                                                                \
      st[j * (LDS) + u] = hi;                                                            \
      if (lo_too) st[(CKT + j) * (LDS) + u] = lo;                                        \
    }                                                                                    \
  }
#ifndef CKT
#define CKT 16 /* bwd_dq_compressed_mma: blocks per staged tile, a multiple of 16 */
#endif
#ifndef CKV_NW
#define CKV_NW 1 /* bwd_dkdv_compressed_mma: warps per group, 16 blocks each (host: 2) */
#endif
#ifndef CV_SPLIT /* 1: f32 v_cmp enters as bf16 hi + lo like k_cmp; 0: as its bf16 term only */
#define CV_SPLIT 0
#endif
#define VC_TERMS (1 + (CK_SPLIT && CV_SPLIT))
#if !CQ_BATCH && !CK_SPLIT
#error "attend_bwd_cmp_mma.cl: 16-bit k_cmp stages its tiles with CQ_BATCH"
#endif
#if CKT % 16
#error "attend_bwd_cmp_mma.cl: CKT a multiple of 16"
#endif
#if WARP_EMULATE && (CQ_NW != 1 || CKV_NW != 1)
#error "attend_bwd_cmp_mma.cl: the warp emulation runs one warp per group"
#endif

#ifndef TPASS
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2
#endif

/* n accumulator tiles (16 x 8 f32 each) set to zero; a macro, so that n is a constant
 * where the loop is unrolled (the arrays must stay in registers). */
#define zero_tiles(a, n)                                                                   \
  _Pragma("unroll") for (int i_ = 0; i_ < (n); i_++)(a)[i_][0] = (a)[i_][1] = (a)[i_][2] = \
      (a)[i_][3] = 0.0f

/* One sequence of the batch with its compressed rows: first token row t0, first
 * compressed row c0, nb blocks (as cl/attend_bwd.cl's seq_span). */
typedef struct cmp_seq {
  int b, t0, len, c0, nb;
} cmp_seq;

inline cmp_seq cmp_sequence(__global const int *cu, int nseq, int TQ, int NB, int s) {
  cmp_seq q = {s, 0, TQ, 0, NB};
  if (nseq > 0) {
    __global const int *cuc = cu + 2 * (nseq + 1);
    q.b = 0, q.t0 = cu[s], q.len = cu[s + 1] - cu[s];
    q.c0 = cuc[s], q.nb = cuc[s + 1] - cuc[s];
  }
  return q;
}

/* ---------------------------------------------------------------- dq */

/* This lane's query row rh (0: gid, 1: gid + 8) of a dq tile, at token row tok, head hq
 * (zeros where !ok): lse in log2 units, delta, gate, and the A fragments of q and do. */
inline __attribute__((always_inline)) void dq_row(int rh, bool ok, int b, long tok, int hq,
                                                  CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout),
                                                  CTENSOR(0, lse), __global const float *gate,
                                                  __global const float *delta, int TQ, int HQ,
                                                  float *l2, float *del, float *gt, uint4 (*qf)[2],
                                                  uint4 (*dof)[2]) {
  const int tig = get_local_id(0) & 3;
  const long rs = ((long)b * TQ + tok) * HQ + hq;
  l2[rh] = ok ? lse[TIDX(lse, b, tok, hq)] * M_LOG2E_F : 0.0f;
  del[rh] = ok ? delta[rs] : 0.0f;
  gt[rh] = ok ? gate[rs] : 0.0f;
#pragma unroll
  for (int c = 0; c < DKC; c++) qf[c][rh] = LD8(q, TIDX(q, b, tok, hq) + 32 * c + 8 * tig, ok);
#pragma unroll
  for (int c = 0; c < DVC; c++)
    dof[c][rh] = LD8(dout, TIDX(dout, b, tok, hq) + 32 * c + 8 * tig, ok);
}

/* dS of one (row, key) pair from its score s = q.k and dp = do.v: P (g dp - delta). */
inline float dscore(bool visible, float s, float dp, float sl2, float l2, float g, float dl) {
  return visible ? exp2(s * sl2 - l2) * (g * dp - dl) : 0.0f;
}

/* The A fragments of a dk/dv warp's 16 keys wait in local memory, each lane its own slots
 * (no synchronisation): slot x of this lane is frag[x * stride], four words in the
 * register order of mma_16816's A, so that one 16-byte read feeds one mma. Slots 2c and
 * 2c + 1 hold the hi words of k chunk c (its dims in word pairs x, y, then z, w: see
 * kv_afrag), then 2 DKC + 2c, + 1 those of v; the lo words follow in the same order
 * from KV_SLOTS on (v's only with CV_SPLIT). */
#define KV_SLOTS (2 * (DKC + DVC))
#define KV_ALL (KV_SLOTS + (KC_TERMS - 1) * 2 * DKC + (VC_TERMS - 1) * 2 * DVC) /* a lane's slots */

/* dk (ak) and dv (av) of this warp's keys key0 + gid (+ 8) += the 16 rows of one step,
 * staged (stage: its first row; rw = its row gid at unit tig, row 8nt + gid, a B column,
 * at rw[8nt RLD8]), rs = the stage's scalars of row 2tig (row 8nt + 2tig + x, a C column,
 * at rs[8nt + x]). S^T = K Q^T and dP^T = V do^T (A = the keys, B = q and do rows), then
 * dv += (g P)^T do and dk += dS^T Q (B = the staged do and q rows again, by ldmatrix:
 * dkdv_tail).
 * The stage's layout (RLD8) and that tail are cl/attend_bwd_mma.cl's, shared with the
 * selected dk/dv kernel. Rows past the walk hold a copy of its last row; lim = 0 gives
 * them P = dS = 0, as for every masked pair. */
/* always_inline: clang (PoCL, tools/ptx_check.sh) otherwise calls it, its array arguments
 * then going through the stack */
inline __attribute__((always_inline)) void dkdv_step(float (*ak)[4], float (*av)[4],
                                                     __local const uint4 *frag, int stride,
                                                     int key0, __local const uint4 *stage,
                                                     __local const uint4 *rs, float sl2,
                                                     __local uint *wx) {
  const int gid = (get_local_id(0) & 31) >> 2, tig = get_local_id(0) & 3;
  __local const uint4 *rw = stage + gid * RLD8 + (tig ^ RSWZ(gid));
  float st[2][4], dpt[2][4];
  zero_tiles(st, 2);
  zero_tiles(dpt, 2);
  /* each A fragment read once for both row tiles (each tile's sums keep their order:
   * k hi over the chunks, then k lo; v) */
#pragma unroll
  for (int x = 0; x < KC_TERMS; x++) { /* hi, then lo */
    __local const uint4 *f = frag + x * KV_SLOTS * stride;
#pragma unroll
    for (int c = 0; c < DKC; c++) {
      const uint4 a0 = f[2 * c * stride], a1 = f[(2 * c + 1) * stride];
#pragma unroll
      for (int nt = 0; nt < 2; nt++) mma_dims_kv(st[nt], a0, a1, rw[8 * nt * RLD8 + 4 * c], wx);
    }
    /* no hazard here, but ptxas moves no local read across a warp_sync: without these
     * three it hoists the next pass's fragment reads over this pass's mma (at most 192
     * registers: 520 bytes of spill without them, 8 with) */
    warp_sync(wx);
  }
#pragma unroll
  for (int x = 0; x < VC_TERMS; x++) {
    __local const uint4 *f = frag + (x * KV_SLOTS + 2 * DKC) * stride;
#pragma unroll
    for (int c = 0; c < DVC; c++) {
      const uint4 a0 = f[2 * c * stride], a1 = f[(2 * c + 1) * stride];
#pragma unroll
      for (int nt = 0; nt < 2; nt++)
        mma_dims_kv(dpt[nt], a0, a1, rw[8 * nt * RLD8 + DK / 8 + 4 * c], wx);
    }
  }
  warp_sync(wx);
  dkdv_tail(ak, av, st, dpt, stage, rs, key0, sl2, wx);
}

/* Writes this warp's keys key0 + gid (+ 8), those below kend, as rows at + key - key0 of
 * [*, D] f32 partials (row stride rstride rows): dk = scale ak, dv = av. */
inline __attribute__((always_inline)) void dkdv_write(__global float *dk, __global float *dv,
                                                      long at, long rstride, int key0, int kend,
                                                      float scale, float (*ak)[4], float (*av)[4]) {
  const int gid = (get_local_id(0) & 31) >> 2;
#pragma unroll
  for (int kh = 0; kh < 2; kh++) {
    const int key = gid + 8 * kh;
    if (key0 + key >= kend) continue;
    __global float *rk = dk + (at + key * rstride) * DK;
    __global float *rv = dv + (at + key * rstride) * DV;
#pragma unroll
    for (int n = 0; n < DK / 8; n++)
      *(__global float2 *)(rk + ACC_DIM(n)) =
          (float2)(scale * ak[n][2 * kh], scale * ak[n][2 * kh + 1]);
#pragma unroll
    for (int n = 0; n < DV / 8; n++)
      *(__global float2 *)(rv + ACC_DIM(n)) = (float2)(av[n][2 * kh], av[n][2 * kh + 1]);
  }
}

/* ---------------------------------------------------------------- dk, dv */

#define KLD8 (DK / 8 + 4) /* row strides of the staged tiles in 16-byte units (64-byte pad) */
#define VLD8 (DV / 8 + 4)
#define CNT (CKT / 8)

inline float bf16_half(uint w, int upper) {
  return as_float(upper ? w & 0xffff0000u : w << 16);
}

/* Elements i .. i + 7 of an f32 tensor (i a multiple of 4; zeros where !ok) as bf16
 * pairs: *hi = bf16(x), *lo = bf16(x - hi), so that hi + lo keeps 16 bits of x. */
inline __attribute__((always_inline)) void split8_regs(float4 a, float4 b, uint4 *hi, uint4 *lo) {
  const uint4 r = (uint4)(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
  *hi = r;
  *lo = (uint4)(pack2(a.x - bf16_half(r.x, 0), a.y - bf16_half(r.x, 1)),
                pack2(a.z - bf16_half(r.y, 0), a.w - bf16_half(r.y, 1)),
                pack2(b.x - bf16_half(r.z, 0), b.y - bf16_half(r.z, 1)),
                pack2(b.z - bf16_half(r.w, 0), b.w - bf16_half(r.w, 1)));
}

inline __attribute__((always_inline)) void split8_words(__global const float *p, long i, bool ok,
                                                        uint4 *hi, uint4 *lo) {
  const float4 a = ok ? *(__global const float4 *)(p + i) : (float4)(0.0f);
  const float4 b = ok ? *(__global const float4 *)(p + i + 4) : (float4)(0.0f);
  split8_regs(a, b, hi, lo);
}

/* The hi (and with CK_SPLIT lo) terms of a unit loaded by CQ_LOADS, zeros where !ok. */
inline __attribute__((always_inline)) void cq_terms(const CQ_RAW *r, bool ok, uint4 *hi, uint4 *lo) {
#if CK_SPLIT
  split8_regs(ok ? r[0] : (float4)(0.0f), ok ? r[1] : (float4)(0.0f), hi, lo);
#else
  *hi = ok ? r[0] : (uint4)(0u);
  *lo = (uint4)(0u); /* no lo term */
#endif
}

/* The same, stored in local memory. */
inline __attribute__((always_inline)) void split8(__global const float *p, long i, bool ok,
                                                  __local uint4 *hi, __local uint4 *lo) {
  uint4 h, l;
  split8_words(p, i, ok, &h, &l);
  *hi = h;
  *lo = l;
}

/* The same elements as their hi terms only. */
inline __attribute__((always_inline)) void round8(__global const float *p, long i, bool ok,
                                                  __local uint4 *hi) {
  const float4 a = ok ? *(__global const float4 *)(p + i) : (float4)(0.0f);
  const float4 b = ok ? *(__global const float4 *)(p + i + 4) : (float4)(0.0f);
  *hi = (uint4)(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
}

/* Flattened row f = (token f / G, head f % G) of a sequence: blocks c < (t + 1) / BS. */
inline int cmp_blocks(long f, long fend, int G, int BS) {
  return f < fend ? (int)(f / G + 1) / BS : 0;
}

__kernel __attribute__((reqd_work_group_size(32 * CQ_NW, 1, 1))) void bwd_dq_compressed_mma(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dq_off, float scale, int BS, SEQ_ARGS) {
  /* the staged tile: hi words of its CKT blocks, then their lo words (f32 k_cmp); k rows
   * RSWZ-swizzled for the transposed reads of dq += dS Kc (mma_rows_ldm) */
  __local uint4 kst[KC_TERMS * CKT * KLD8] __attribute__((aligned(16)));
  __local uint4 vst[VC_TERMS * CKT * VLD8] __attribute__((aligned(16)));
  WARP_SCRATCH(wx);
  const cmp_seq sp = cmp_sequence(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, lid = get_local_id(0);
  const int lane = lid & 31, warp = lid >> 5, gid = lane >> 2, tig = lane & 3;
  const long fend = (long)sp.len * G, f0 = (long)get_group_id(0) * 16 * CQ_NW;
  if (f0 >= fend) return;
  (void)B, (void)TK;
  const long fw = f0 + 16 * warp; /* this warp's rows fw .. fw + 15 */
  const int kend = cmp_blocks(min(f0 + 16 * CQ_NW, fend) - 1, fend, G, BS);
  const int wend = fw < fend ? cmp_blocks(min(fw + 15, fend - 1), fend, G, BS) : 0;
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

  int lim[2];
  long tok[2];
  float lse2[2], del[2], gt[2];
  uint4 qf[DKC][2], dof[DVC][2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const long f = fw + gid + 8 * rh, fc = min(f, fend - 1);
    tok[rh] = sp.t0 + fc / G;
    lim[rh] = cmp_blocks(f, fend, G, BS);
    dq_row(rh, f < fend, sp.b, tok[rh], h * G + (int)(fc % G), TPASS(q), TPASS(dout), TPASS(lse),
           gate, delta, TQ, HQ, lse2, del, gt, qf, dof);
  }
  const float sl2 = scale * M_LOG2E_F;
  float acc[DK / 8][4];
  zero_tiles(acc, DK / 8);

  for (int k0 = 0; k0 < kend; k0 += CKT) {
#if CQ_BATCH
    /* the tile's loads all in flight before the barrier (rows clamped into the tile, so
     * each address is valid; blocks past it zeroed), then split and stored */
    CQ_RAW kr8[CQ_KIT][CQ_RAWN], vr8[CQ_VIT][CQ_RAWN];
    CQ_LOADS(kr8, kc, DK / 8);
    CQ_LOADS(vr8, vc, DV / 8);
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile consumed */
    CQ_STORES(kr8, kst, DK / 8, KLD8, CK_SPLIT, 1);
    CQ_STORES(vr8, vst, DV / 8, VLD8, VC_TERMS == 2, 0);
#else
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile consumed */
    for (int x = lid; x < CKT * (DK / 8); x += 32 * CQ_NW) {
      const int j = x / (DK / 8), u = x - j * (DK / 8), us = u ^ RSWZ(j);
      split8(kc, TIDX(kc, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * u, k0 + j < kend,
             kst + j * KLD8 + us, kst + (CKT + j) * KLD8 + us);
    }
    for (int x = lid; x < CKT * (DV / 8); x += 32 * CQ_NW) {
      const int j = x / (DV / 8), u = x - j * (DV / 8);
#if CV_SPLIT
      split8(vc, TIDX(vc, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * u, k0 + j < kend,
             vst + j * VLD8 + u, vst + (CKT + j) * VLD8 + u);
#else
      round8(vc, TIDX(vc, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * u, k0 + j < kend,
             vst + j * VLD8 + u);
#endif
    }
#endif /* CQ_BATCH */
    barrier(CLK_LOCAL_MEM_FENCE);
    if (k0 >= wend) continue; /* warp-uniform: none of this warp's rows sees the tile */

    /* S = Q Kc^T over Kc's hi and lo terms, dP = do Vc^T over Vc's hi term (and lo with
     * CV_SPLIT); A = q and do rows */
    float s[CNT][4], dp[CNT][4];
#pragma unroll
    for (int nt = 0; nt < CNT; nt++) {
      __local const uint4 *kr = kst + (8 * nt + gid) * KLD8 + (tig ^ RSWZ(gid));
      __local const uint4 *vr = vst + (8 * nt + gid) * VLD8 + tig;
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < DKC; c++) {
        mma_dims(s[nt], qf[c][0], qf[c][1], kr[4 * c], wx);
#if CK_SPLIT
        mma_dims(s[nt], qf[c][0], qf[c][1], kr[CKT * KLD8 + 4 * c], wx);
#endif
      }
#pragma unroll
      for (int c = 0; c < DVC; c++) {
        mma_dims(dp[nt], dof[c][0], dof[c][1], vr[4 * c], wx);
#if VC_TERMS == 2
        mma_dims(dp[nt], dof[c][0], dof[c][1], vr[CKT * VLD8 + 4 * c], wx);
#endif
      }
    }
    /* dS in place of S: element e is row gid + 8 (e >> 1), block k0 + 8nt + 2tig + (e & 1) */
#pragma unroll
    for (int nt = 0; nt < CNT; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rh = e >> 1;
        s[nt][e] = dscore(k0 + 8 * nt + 2 * tig + (e & 1) < lim[rh], s[nt][e], dp[nt][e], sl2,
                          lse2[rh], gt[rh], del[rh]);
      }
    }
    /* dq += dS (Kc hi + Kc lo), 16 blocks per step */
#pragma unroll
    for (int ks = 0; ks < CKT / 16; ks++) {
      const afrag a = pack_a(s[2 * ks], s[2 * ks + 1]);
#pragma unroll
      for (int x = 0; x < KC_TERMS; x++)
        mma_rows_ldm(acc, a, kst + (x * CKT + 16 * ks) * KLD8, KLD8, 0, DK, wx);
    }
  }

  /* dq += scale * acc: each row has this warp as its only writer */
  __global float *dq = ws + dq_off;
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    if (lim[rh] == 0) continue; /* past the rows, or sees no block: adds 0 */
    const int hq = h * G + (int)((fw + gid + 8 * rh) % G);
    __global float *row = dq + (((long)sp.b * TQ + tok[rh]) * HQ + hq) * DK;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      __global float2 *at = (__global float2 *)(row + ACC_DIM(n));
      const float2 was = *at;
      *at = (float2)(was.x + scale * acc[n][2 * rh], was.y + scale * acc[n][2 * rh + 1]);
    }
  }
}

/* Token index *t and head *g of row r of a dk/dv step whose first row is (ts, gs) (the
 * flattened row ts G + gs of the sequence); past the walk's last token tlast, its last row
 * (tlast, G - 1) instead. Returns whether the row lies in the walk. 32-bit: gs < G. */
inline bool cmp_step_row(int ts, int gs, int r, int G, int tlast, int *t, int *g) {
  const int x = gs + r, dt = (int)((uint)x / (uint)G);
  const bool in = ts + dt <= tlast;
  *t = in ? ts + dt : tlast;
  *g = in ? x - dt * G : G - 1;
  return in;
}

/* Stages the step whose first row is (ts, gs) into the group's stage rows: this lane's
 * share (stage_row_copy, warp of CKV_NW) of rows gid and gid + 8, only where copy
 * (group-uniform); warp 0 returns the scalars of row gid + 8 (tig & 1) (lse, delta, gate
 * bits, lim) for it to store one step later, once its loads have had a step's time to
 * arrive (other warps: zeros, unread). */
inline __attribute__((always_inline)) uint4 kv_stage(__local uint4 *rows, bool copy, int ts, int gs,
                                                     int tlast, cmp_seq sp, int h, int G, int BS,
                                                     CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout),
                                                     CTENSOR(0, lse), __global const float *gate,
                                                     __global const float *delta, int TQ, int HQ) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  const int warp = get_local_id(0) >> 5;
  int t[2], g[2];
  bool in[2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    in[rh] = cmp_step_row(ts, gs, gid + 8 * rh, G, tlast, &t[rh], &g[rh]);
    if (copy) {
      const int tok = sp.t0 + t[rh], hq = h * G + g[rh];
      stage_row_copy(rows + (gid + 8 * rh) * RLD8 + (tig ^ RSWZ(gid)),
                     q + TIDX(q, sp.b, tok, hq) + 8 * tig,
                     dout + TIDX(dout, sp.b, tok, hq) + 8 * tig, warp, CKV_NW);
    }
  }
  if (warp != 0) return (uint4)(0u);
  const int x = tig & 1, ti = x ? t[1] : t[0], tok = sp.t0 + ti, hq = h * G + (x ? g[1] : g[0]);
  const long rs = ((long)sp.b * TQ + tok) * HQ + hq;
  const int lim = (x ? in[1] : in[0]) ? min(sp.nb, (ti + 1) / BS) : 0;
  return (uint4)(as_uint(lse[TIDX(lse, sp.b, tok, hq)]), as_uint(delta[rs]), as_uint(gate[rs]),
                 (uint)lim);
}

/* Partial sums over token chunk (group % chunks) of 16 CKV_NW blocks: [chunks, B*NB, H, D]
 * as bwd_dkdv_compressed. Warp w owns blocks 16w .. 16w + 15 of the group (the M side of
 * every product, their f32 rows split into hi and lo A fragments that wait in local
 * memory); the group walks the chunk's rows that see its first block, 16 per step
 * (dkdv_step; rows before a warp's blocks see none of them: lim masks them), each step's
 * rows staged once for the group by cp.async one step ahead (two stages the warps share). */
__kernel __attribute__((reqd_work_group_size(32 * CKV_NW, 1, 1))) void bwd_dkdv_compressed_mma(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int chunks, int ctok, int BS, SEQ_ARGS) {
  __local uint4 kvl[KV_ALL * 32 * CKV_NW] __attribute__((aligned(16)));
  __local uint4 rbuf[2 * 16 * RLD8] __attribute__((aligned(16))); /* the group's 2 stages */
  __local uint4 sbuf[2 * 16] __attribute__((aligned(16)));         /* their scalars */
  WARP_SCRATCH(wx);
  const cmp_seq sp = cmp_sequence(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, grp = get_group_id(0), chunk = grp % chunks;
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, S = 32 * CKV_NW;
  const int kw0 = (grp / chunks) * 16 * CKV_NW, kw = kw0 + 16 * warp;
  if (kw0 >= sp.nb) return; /* the whole group: warps past nb walk with zero fragments */
  (void)TK;
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

  /* this lane's A fragment words of keys kw + gid and kw + gid + 8 (kv_afrag) */
  long kr[2];
  bool kok[2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int c = kw + gid + 8 * rh;
    kok[rh] = c < sp.nb;
    kr[rh] = sp.c0 + min(c, sp.nb - 1);
  }
#pragma unroll
  for (int x = 0; x < DKC; x++) {
    uint4 hi[2], lo[2];
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
#if CK_SPLIT
      split8_words(kc, TIDX(kc, sp.b, kr[rh], h) + 32 * x + 8 * tig, kok[rh], &hi[rh], &lo[rh]);
#else
      hi[rh] = LD8(kc, TIDX(kc, sp.b, kr[rh], h) + 32 * x + 8 * tig, kok[rh]);
#endif
    }
#pragma unroll
    for (int w = 0; w < 2; w++) {
      kvl[(2 * x + w) * S + lid] = kv_afrag(hi[0], hi[1], w);
#if CK_SPLIT
      kvl[(KV_SLOTS + 2 * x + w) * S + lid] = kv_afrag(lo[0], lo[1], w);
#endif
    }
  }
#pragma unroll
  for (int x = 0; x < DVC; x++) {
    uint4 hi[2], lo[2]; /* lo only with VC_TERMS == 2 */
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
#if CK_SPLIT
      split8_words(vc, TIDX(vc, sp.b, kr[rh], h) + 32 * x + 8 * tig, kok[rh], &hi[rh], &lo[rh]);
#else
      hi[rh] = LD8(vc, TIDX(vc, sp.b, kr[rh], h) + 32 * x + 8 * tig, kok[rh]);
#endif
    }
#pragma unroll
    for (int w = 0; w < 2; w++) {
      kvl[(2 * DKC + 2 * x + w) * S + lid] = kv_afrag(hi[0], hi[1], w);
#if VC_TERMS == 2
      kvl[(KV_SLOTS + 2 * DKC + 2 * x + w) * S + lid] = kv_afrag(lo[0], lo[1], w);
#endif
    }
  }
  const float sl2 = scale * M_LOG2E_F;
  float ak[DK / 8][4], av[DV / 8][4];
  zero_tiles(ak, DK / 8);
  zero_tiles(av, DV / 8);

  /* tokens of the chunk from the end of the group's first block on, 16 flattened rows
   * (token * G + g) per step */
  const int tfirst = (int)max((long)(kw0 + 1) * BS - 1, (long)chunk * ctok);
  const int tlast = (int)min((long)sp.len - 1, (long)(chunk + 1) * ctok - 1);
  const int nsteps = tlast < tfirst ? 0 : (int)(((long)(tlast - tfirst + 1) * G + 15) / 16);
  __local uint4 *rows = rbuf, *rsc = sbuf;
  int ts = tfirst, gs = 0; /* first row of the step staged last */
  uint4 sc = kv_stage(rows, nsteps > 0, ts, gs, tlast, sp, h, G, BS, TPASS(q), TPASS(dout),
                      TPASS(lse), gate, delta, TQ, HQ);
  cp_async_commit();
  for (int s = 0; s < nsteps; s++) {
    const int cur = s & 1;
    /* scalars cur were last read by step s - 2 (every warp is past step s - 1's barrier) */
    if (warp == 0 && tig < 2) rsc[16 * cur + gid + 8 * tig] = sc;
    cp_async_wait(0);              /* this lane's copies of step s have landed */
    barrier(CLK_LOCAL_MEM_FENCE); /* and every warp's, with the scalars; every warp is past
                                    * step s - 1, so stage cur ^ 1 is free */
    gs += 16;
    ts += (int)((uint)gs / (uint)G);
    gs = (int)((uint)gs % (uint)G);
    sc = kv_stage(rows + 16 * RLD8 * (cur ^ 1), s + 1 < nsteps, ts, gs, tlast, sp, h, G, BS,
                  TPASS(q), TPASS(dout), TPASS(lse), gate, delta, TQ, HQ);
    cp_async_commit();
    dkdv_step(ak, av, kvl + lid, S, kw, rows + 16 * RLD8 * cur, rsc + 16 * cur + 2 * tig, sl2,
              wx);
  }
  cp_async_wait(0);
  /* the sequence read again: its c0 need not stay in a register through the walk */
  const cmp_seq se = cmp_sequence(cu, nseq, TQ, NB, get_group_id(1));
  const long base = (long)chunk * B * NB + (long)se.b * NB + se.c0 + kw;
  dkdv_write(ws + dk_off, ws + dv_off, base * H + h, H, kw, se.nb, scale, ak, av);
}
#endif /* bf16 with f32 k_cmp, or k_cmp in MMA_DT */
