/* Tensor-core backward of the selected and compressed branches (NVIDIA mma.sync:
 * cl/warp_ops.cl): the kernels bwd_dq_selected, bwd_dkdv_selected, bwd_dq_compressed and
 * bwd_dkdv_compressed of cl/attend_bwd.cl with the same arguments, the same scratch regions
 * and the same outputs, for q, k, v and do all f16 or all bf16 (MMA_DT) with f32
 * accumulation (the compressed pair: bf16 only, see below). src/backward.c takes them where the context
 * has a tensor-core path and the tensors qualify; otherwise the portable kernels run.
 *
 * The math (cl/attend_bwd.cl's header), per row r = (token, query head), gate g_r:
 *   P = exp2(S scale log2e - lse log2e) with S = Q K^T,  dP = g (do V^T),
 *   dS = P (dP - delta),  dq = scale dS K,  dk = scale dS^T Q,  dv = (g P)^T do.
 * The gate enters as an f32 factor of a row (dP = g do.v, and g P as the weights of dv)
 * rather than through a rounded g do: do itself is already exact in MMA_DT, so the only
 * roundings to MMA_DT are P g and dS as A operands (as in FlashAttention-2's backward).
 *
 * Fragments are loaded straight from global memory in 16-byte loads, as in
 * cl/attend_mma.cl (read its header first): lane (gid, tig) loads elements 32c + 8tig ..
 * 32c + 8tig + 7 of a row; words 2s, 2s+1 of chunk c are then either the B fragment of
 * k-step s of a product that contracts over the head dim (in a permuted dim order, the
 * same for both operands), or, through movmatrix_t, the B fragment of a product that
 * contracts over rows (keys or queries), whose accumulator then holds the natural dims
 * 32c + 8tig + 2j + {0, 1} in its register 4c + j.
 *
 * bwd_dq_selected_mma: a group owns 16 query heads of one token (16 rows: one mma tile;
 * G < 16 leaves rows idle) and the token's selected key slots (deduplicated blocks back to
 * back, as in the portable kernel). Its DQ_NW warps split the key slots in tiles of KT:
 * warp w takes tiles w, w + DQ_NW, ... Per tile: S and dP (A = q and do rows held in
 * registers for the whole walk, B = k and v rows), P and dS in the C layout, which packs
 * into the A fragment of dq += dS K (B = the same k words through movmatrix, kept from
 * S). KT = 16: ptxas for sm_90 gives 234 registers and no spills at DK = DV = 128
 * (tools/ptx_check.sh); KT = 32 spills, the k words of a tile staying live. Each warp keeps 16 x DK f32 partial dq;
 * at the end warp 0 writes them to local memory and warps 1, 2, ... add theirs in that
 * order, so dq = scale ((w0 + w1) + w2) + ... whatever the scheduling.
 *
 * bwd_dkdv_selected_mma: a group owns 16 KV_NW keys of the block of one selection chunk
 * (cl/select_mask.cl; the same slots and partial-sum rows as the portable kernel) and
 * walks the chunk's tokens, all G heads each, in increasing order, 16 rows (f = token
 * index * G + g) per step. Warp w owns keys 16w .. 16w + 15 of the group: the key side is
 * the M dimension, S^T = K Q^T and dP^T = V do^T (A = k and v rows, B = q and do rows
 * directly), then dv += (g P)^T do and dk += dS^T Q (B = the do words kept from dP^T,
 * and the q rows loaded again, through movmatrix). Every key's dk and dv have one warp
 * as their only writer, accumulated in the fixed row order of the walk. The k and v A
 * fragments stay for the whole walk; they wait in local memory (each lane its own slots,
 * so no synchronisation) to leave the registers to the two accumulators (DK/2 + DV/2
 * floats a lane); reloading q rather than keeping its words too brings ptxas down to
 * 255 registers and 4 bytes of spill at DK = DV = 128 (from 255 and 96 with both in
 * registers). The 16-row step is dkdv_step, shared with the compressed kernel.
 *
 * Compressed branch: the keys are the forward's f32 k_cmp, v_cmp rows (one per block);
 * each value x enters as bf16 hi = bf16(x) and lo = bf16(x - hi), both through the tensor
 * cores (as cl/attend_mma.cl's forward), so q.k_cmp keeps near-f32 accuracy. q and do
 * must then be bf16: an f16 split would lose the lo terms of small values to f16's range,
 * and mma takes one type for A and B, so f16 runs the portable kernels (src/backward.c).
 *  - bwd_dq_compressed_mma: a group owns 16 CQ_NW consecutive flattened rows (token * G +
 *    g) of a sequence, warp w rows 16w .. 16w + 15; the group walks the blocks its last
 *    row sees in tiles of CKT, each staged once in local memory (hi and lo, 64-byte padded
 *    rows as in attend_mma.cl's STAGE) and read by every warp. S and dP take q and do
 *    rows as A (registers), the tile as B; dq += dS (Kc hi + Kc lo) with B through
 *    movmatrix. Every dq row has one warp as its writer, adding scale * acc to the
 *    accumulator once, with the tiles in block order: deterministic.
 *    ptxas: 254 registers, no spills at DK = DV = 128.
 *  - bwd_dkdv_compressed_mma: a group owns 16 CKV_NW blocks and one token chunk (the
 *    partial-sum layout of bwd_dkdv_compressed); warp w owns 16 blocks as the M side and
 *    walks the chunk's rows from its first block's last token on, 16 per step, in
 *    increasing order (dkdv_step with the hi and lo A fragments in local memory: 2 (DK +
 *    DV) / 32 x 2 slots a lane). One writer per block row, fixed order: deterministic.
 *    ptxas: 255 registers, 108 bytes of spill at DK = DV = 128 (CKV_NW = 2, 32 KiB).
 *
 * Masked pairs (key position after the row's token, key past the block or sequence, row
 * past the group's rows) get P = dS = 0; loads of keys or rows past the end read zeros.
 * The selection-list helper is repeated here (selection_rows) so that this program does
 * not carry the portable kernels' local tiles; the mask expansion (mask_expand) comes
 * from cl/bwd_mask.cl, which precedes both files.
 */
#ifndef DK
#define DK 128
#endif
#ifndef DV
#define DV 128
#endif
#ifndef DQ_NW
#define DQ_NW 4 /* bwd_dq_selected_mma: warps per group */
#endif
#ifndef KV_NW
#define KV_NW 4 /* bwd_dkdv_selected_mma: warps per group (16 keys each) */
#endif
#ifndef KT
#define KT 16 /* bwd_dq_selected_mma: key slots per warp step, a multiple of 16 */
#endif
#ifndef MASK_WORDS
#define MASK_WORDS 16 /* bwd_dkdv_selected_mma: selection-mask words expanded at once */
#endif
#ifndef CQ_NW
#define CQ_NW 4 /* bwd_dq_compressed_mma: warps per group, 16 rows each */
#endif
#ifndef CKT
#define CKT 16 /* bwd_dq_compressed_mma: blocks per staged tile, a multiple of 16 */
#endif
#ifndef CKV_NW
#define CKV_NW 2 /* bwd_dkdv_compressed_mma: warps per group, 16 blocks each */
#endif
#ifndef Q_DT
#define Q_DT MMA_DT
#endif
#ifndef K_DT
#define K_DT MMA_DT
#endif
#ifndef V_DT
#define V_DT MMA_DT
#endif
#ifndef DO_DT
#define DO_DT MMA_DT
#endif

#if Q_DT != MMA_DT || K_DT != MMA_DT || V_DT != MMA_DT || DO_DT != MMA_DT
#error "attend_bwd_mma.cl: q, k, v and do are all MMA_DT"
#endif
#if DK % 32 || DV % 32 || KT % 16 || CKT % 16
#error "attend_bwd_mma.cl: DK and DV multiples of 32, KT a multiple of 16"
#endif
#if WARP_EMULATE && (DQ_NW != 1 || KV_NW != 1 || CQ_NW != 1 || CKV_NW != 1)
#error "attend_bwd_mma.cl: the warp emulation runs one warp per group"
#endif
#if MASK_WORDS > 32 * KV_NW
#error "attend_bwd_mma.cl: MASK_WORDS at most the work-group size"
#endif

#define MAX_S 128 /* CLNSA_MAX_BLOCK_COUNT */
#define DKC (DK / 32)
#define DVC (DV / 32)
#define NT (KT / 8)
#define KSTEPS (KT / 16)
#define DQ_ST (DK + 4) /* row stride of the dq merge buffer */

#ifndef TPASS
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2
#endif
#define U4(v, j) ((j) == 0 ? (v).x : (j) == 1 ? (v).y : (j) == 2 ? (v).z : (v).w)
/* 8 elements (16 bytes) at element index i of a 16-bit tensor, or zeros where !ok. */
#define LD8(p, i, ok) ((ok) ? *(__global const uint4 *)((p) + (i)) : (uint4)(0u))

/* acc (16 x 8, f32) += A B over the 16 dims of chunk word pair s (0: x,y; 1: z,w):
 * A rows gid, gid+8 in alo, ahi; B column gid in b (all in the permuted dim order). */
inline void mma_dims(float *acc, uint4 alo, uint4 ahi, uint4 b, __local uint *wx) {
  mma_16816(acc, alo.x, ahi.x, alo.y, ahi.y, b.x, b.y, wx);
  mma_16816(acc, alo.z, ahi.z, alo.w, ahi.w, b.z, b.w, wx);
}

/* n accumulator tiles (16 x 8 f32 each) set to zero; a macro, so that n is a constant
 * where the loop is unrolled (the arrays must stay in registers). */
#define zero_tiles(a, n)                                                  \
  _Pragma("unroll") for (int i_ = 0; i_ < (n); i_++)                      \
    (a)[i_][0] = (a)[i_][1] = (a)[i_][2] = (a)[i_][3] = 0.0f

/* The A fragment of a 16 x 16 block from two C tiles (columns 0-7 in lo, 8-15 in hi). */
typedef struct afrag {
  uint a0, a1, a2, a3;
} afrag;

inline afrag pack_a(const float *lo, const float *hi) {
  afrag f = {pack2(lo[0], lo[1]), pack2(lo[2], lo[3]), pack2(hi[0], hi[1]), pack2(hi[2], hi[3])};
  return f;
}

/* acc[4c + j] (16 x 8 each, natural dims 32c + 8tig + 2j + {0, 1}) += A R over a chunk c of
 * 16 rows R, whose lanes loaded rows gid (lo) and gid + 8 (hi) at 32c + 8tig. */
inline void mma_rows(float (*acc)[4], afrag a, uint4 lo, uint4 hi, __local uint *wx) {
#pragma unroll
  for (int j = 0; j < 4; j++)
    mma_16816(acc[j], a.a0, a.a1, a.a2, a.a3, movmatrix_t(U4(lo, j), wx),
              movmatrix_t(U4(hi, j), wx), wx);
}

/* ---------------------------------------------------------------- dq */

/* This lane's query row rh (0: gid, 1: gid + 8) of a dq tile, at token row tok, head hq
 * (zeros where !ok): lse in log2 units, delta, gate, and the A fragments of q and do. */
inline __attribute__((always_inline)) void dq_row(int rh, bool ok, int b, long tok, int hq, CTENSOR(Q_DT, q),
                   CTENSOR(DO_DT, dout), CTENSOR(0, lse), __global const float *gate,
                   __global const float *delta, int TQ, int HQ, float *l2, float *del,
                   float *gt, uint4 (*qf)[2], uint4 (*dof)[2]) {
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

/* One sequence of the batch (as cl/attend_bwd.cl's seq_span). */
typedef struct bwd_seq {
  int b, t0, len, c0, nb; /* c0, nb: its first compressed row and its block count */
} bwd_seq;

inline bwd_seq bwd_sequence(__global const int *cu, int nseq, int TQ, int NB, int s) {
  bwd_seq q = {s, 0, TQ, 0, NB};
  if (nseq > 0) {
    __global const int *cuc = cu + 2 * (nseq + 1);
    q.b = 0, q.t0 = cu[s], q.len = cu[s + 1] - cu[s];
    q.c0 = cuc[s], q.nb = cuc[s + 1] - cuc[s];
  }
  return q;
}

/* The valid blocks of one (token, kv head) selection row, deduplicated, in first
 * occurrence order, into blist[]; returns their number (cl/attend_bwd.cl's
 * selection_list). raw and keep hold MAX_S ints each. Ends with a barrier. */
inline int selection_rows(__global const int *row, int S, int ic, __local int *raw,
                          __local int *keep, __local int *blist, int wg) {
  const int lid = get_local_id(0);
  for (int s = lid; s < S; s += wg) raw[s] = row[s];
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = lid; s < S; s += wg) {
    const int c = raw[s];
    int k = c >= 0 && c <= ic;
    for (int x = 0; x < s && k; x++) k = raw[x] != c;
    keep[s] = k;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  int n = 0;
  for (int s = 0; s < S; s++) {
    if (keep[s] && (s % wg) == lid) blist[n] = raw[s];
    n += keep[s];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return n;
}

/* Does key slot u (of nkeys) of the selection list lie at or before position i? */
inline bool slot_visible(int u, int nkeys, __local const int *blist, int BS, int i) {
  return u < nkeys && blist[u / BS] * BS + u % BS <= i;
}

/* Row of k/v of key slot u (clamped into the list: callers mask what is past it). */
inline long slot_row(int u, int nkeys, __local const int *blist, int BS, int t0) {
  u = min(u, nkeys - 1);
  return t0 + blist[u / BS] * BS + u % BS;
}

__kernel __attribute__((reqd_work_group_size(32 * DQ_NW, 1, 1))) void bwd_dq_selected_mma(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), CITENSOR(bi), __global float *ws, long gate_off, long delta_off,
    long dq_off, float scale, int S, int BS, SEQ_ARGS) {
  __local int sel[3 * MAX_S];
  __local float part[16 * DQ_ST];
  WARP_SCRATCH(wx);
  const bwd_seq sp = bwd_sequence(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, chunks = (G + 15) / 16;
  const int i = get_group_id(0) / chunks, g0 = (get_group_id(0) % chunks) * 16;
  if (i >= sp.len) return;
  (void)B, (void)TK;
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, tok = sp.t0 + i;
  __local const int *blist = sel + 2 * MAX_S;
  const int nkeys = BS * selection_rows(bi + TIDX(bi, sp.b, tok, h), S, i / BS, sel,
                                        sel + MAX_S, sel + 2 * MAX_S, 32 * DQ_NW);
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

  /* This lane's rows gid and gid + 8: heads g0 + gid (+ 8) of the token. */
  float lse2[2], del[2], gt[2];
  uint4 qf[DKC][2], dof[DVC][2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++)
    dq_row(rh, g0 + gid + 8 * rh < G, sp.b, tok, h * G + g0 + gid + 8 * rh, TPASS(q),
           TPASS(dout), TPASS(lse), gate, delta, TQ, HQ, lse2, del, gt, qf, dof);
  const float sl2 = scale * M_LOG2E_F;
  float acc[DK / 8][4];
  zero_tiles(acc, DK / 8);

  for (int k0 = warp * KT; k0 < nkeys; k0 += DQ_NW * KT) {
    /* S = Q K^T and dP = do V^T for key slots k0 .. k0 + KT - 1; the k rows stay for
     * dq (the B fragments of dS K are the same words through movmatrix) */
    float s[NT][4], dp[NT][4];
    uint4 kt[NT][DKC];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const int u = k0 + 8 * nt + gid;
      const bool ok = slot_visible(u, nkeys, blist, BS, i); /* else maybe past the sequence */
      const long row = slot_row(u, nkeys, blist, BS, sp.t0);
      const long ka = TIDX(k, sp.b, row, h) + 8 * tig, va = TIDX(v, sp.b, row, h) + 8 * tig;
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < DKC; c++) {
        kt[nt][c] = LD8(k, ka + 32 * c, ok);
        mma_dims(s[nt], qf[c][0], qf[c][1], kt[nt][c], wx);
      }
#pragma unroll
      for (int c = 0; c < DVC; c++)
        mma_dims(dp[nt], dof[c][0], dof[c][1], LD8(v, va + 32 * c, ok), wx);
    }
    /* dS in place of S: element e is row gid + 8 (e >> 1), slot k0 + 8nt + 2tig + (e & 1) */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rh = e >> 1, u = k0 + 8 * nt + 2 * tig + (e & 1);
        s[nt][e] = dscore(slot_visible(u, nkeys, blist, BS, i), s[nt][e], dp[nt][e], sl2,
                          lse2[rh], gt[rh], del[rh]);
      }
    }
    /* dq += dS K, 16 slots per step */
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
      const afrag a = pack_a(s[2 * ks], s[2 * ks + 1]);
#pragma unroll
      for (int c = 0; c < DKC; c++) mma_rows(acc + 4 * c, a, kt[2 * ks][c], kt[2 * ks + 1][c], wx);
    }
  }

  /* Sum the warps' partials in warp order, then write scale * dq (coalesced). */
  for (int w = 0; w < DQ_NW; w++) {
    if (warp == w) {
#pragma unroll
      for (int n = 0; n < DK / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int at =
              (gid + 8 * (e >> 1)) * DQ_ST + 8 * (n & ~3) + 8 * tig + 2 * (n & 3) + (e & 1);
          part[at] = (w == 0 ? 0.0f : part[at]) + acc[n][e];
        }
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  __global float *dq = ws + dq_off;
  for (int e = lid; e < 16 * DK; e += 32 * DQ_NW) {
    const int r = e / DK, d = e - r * DK;
    if (g0 + r < G)
      dq[(((long)sp.b * TQ + tok) * HQ + h * G + g0 + r) * DK + d] = scale * part[r * DQ_ST + d];
  }
}

/* ---------------------------------------------------------------- dk, dv */

/* One row of a dk/dv step: element offsets of its q and do fragment words (lane's 8tig
 * included) and of its lse, its row in the gate/delta scratch, and the keys it sees: key
 * indices below lim (0 for a row past the walk). */
typedef struct kv_row {
  long qa, oa, la, rs;
  int lim;
} kv_row;

/* The A fragments of a dk/dv warp's 16 keys wait in local memory, each lane its own slots
 * (no synchronisation): slot x of this lane is frag[x * stride]. Slots 2c + rh hold k
 * chunk c of key gid + 8 rh, then 2 DKC + 2c + rh v; with split (f32 keys as bf16 hi +
 * lo) the lo words follow in the same order from 2 (DKC + DVC) on. */
#define KV_SLOTS (2 * (DKC + DVC))

/* dk (ak) and dv (av) of this warp's keys key0 + gid (+ 8) += the 16 rows of one step:
 * rb[nt] is row 8nt + gid (a B column), re[nt][x] row 8nt + 2tig + x (a C column). S^T =
 * K Q^T and dP^T = V do^T (A = the keys, B = q and do rows), then dv += (g P)^T do (B =
 * the do words kept from dP^T) and dk += dS^T Q (q rows loaded again, through movmatrix:
 * keeping them too costs registers). Masked pairs get P = dS = 0. */
/* always_inline: clang (PoCL, tools/ptx_check.sh) otherwise calls it, its array arguments
 * then going through the stack */
inline __attribute__((always_inline)) void dkdv_step(float (*ak)[4], float (*av)[4], __local const uint4 *frag, int stride,
                      int split, int key0, const kv_row *rb, const kv_row (*re)[2],
                      __global const STORAGE(Q_DT) *q, __global const STORAGE(DO_DT) *dout,
                      __global const float *lse, __global const float *gate,
                      __global const float *delta, float sl2, __local uint *wx) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2;
  float st[2][4], dpt[2][4];
  uint4 ob[DVC][2];
#pragma unroll
  for (int nt = 0; nt < 2; nt++) {
    const bool ok = rb[nt].lim > 0;
    st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
    dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
    for (int x = 0; x <= split; x++) { /* hi, then lo */
      __local const uint4 *f = frag + x * KV_SLOTS * stride;
#pragma unroll
      for (int c = 0; c < DKC; c++)
        mma_dims(st[nt], f[2 * c * stride], f[(2 * c + 1) * stride],
                 LD8(q, rb[nt].qa + 32 * c, ok), wx);
    }
#pragma unroll
    for (int c = 0; c < DVC; c++) ob[c][nt] = LD8(dout, rb[nt].oa + 32 * c, ok);
    for (int x = 0; x <= split; x++) {
      __local const uint4 *f = frag + (x * KV_SLOTS + 2 * DKC) * stride;
#pragma unroll
      for (int c = 0; c < DVC; c++)
        mma_dims(dpt[nt], f[2 * c * stride], f[(2 * c + 1) * stride], ob[c][nt], wx);
    }
  }
  /* element e of tile nt: key key0 + gid + 8 (e >> 1), row 8nt + 2tig + (e & 1); st
   * becomes g P (the weights of dv), dpt becomes dS */
#pragma unroll
  for (int nt = 0; nt < 2; nt++) {
#pragma unroll
    for (int x = 0; x < 2; x++) {
      const kv_row r = re[nt][x];
      const bool ok = r.lim > 0;
      const float l2 = ok ? lse[r.la] * M_LOG2E_F : 0.0f;
      const float dl = ok ? delta[r.rs] : 0.0f, g = ok ? gate[r.rs] : 0.0f;
#pragma unroll
      for (int kh = 0; kh < 2; kh++) {
        const int e = 2 * kh + x;
        const float p = key0 + gid + 8 * kh < r.lim ? exp2(st[nt][e] * sl2 - l2) : 0.0f;
        st[nt][e] = g * p;
        dpt[nt][e] = p * (g * dpt[nt][e] - dl);
      }
    }
  }
  const afrag apg = pack_a(st[0], st[1]), ads = pack_a(dpt[0], dpt[1]);
#pragma unroll
  for (int c = 0; c < DVC; c++) mma_rows(av + 4 * c, apg, ob[c][0], ob[c][1], wx);
#pragma unroll
  for (int c = 0; c < DKC; c++)
    mma_rows(ak + 4 * c, ads, LD8(q, rb[0].qa + 32 * c, rb[0].lim > 0),
             LD8(q, rb[1].qa + 32 * c, rb[1].lim > 0), wx);
}

/* Writes this warp's keys key0 + gid (+ 8), those below kend, as rows at + key - key0 of
 * [*, D] f32 partials (row stride rstride rows): dk = scale ak, dv = av. */
inline __attribute__((always_inline)) void dkdv_write(__global float *dk, __global float *dv, long at, long rstride,
                       int key0, int kend, float scale, float (*ak)[4], float (*av)[4]) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int kh = 0; kh < 2; kh++) {
    const int key = gid + 8 * kh;
    if (key0 + key >= kend) continue;
    __global float *rk = dk + (at + key * rstride) * DK + 8 * tig;
    __global float *rv = dv + (at + key * rstride) * DV + 8 * tig;
#pragma unroll
    for (int n = 0; n < DK / 8; n++)
      *(__global float2 *)(rk + 8 * (n & ~3) + 2 * (n & 3)) =
          (float2)(scale * ak[n][2 * kh], scale * ak[n][2 * kh + 1]);
#pragma unroll
    for (int n = 0; n < DV / 8; n++)
      *(__global float2 *)(rv + 8 * (n & ~3) + 2 * (n & 3)) =
          (float2)(av[n][2 * kh], av[n][2 * kh + 1]);
  }
}

/* Row f of a selected dk/dv walk: token list[f / G] of the block's sequence, head f % G. */
inline __attribute__((always_inline)) kv_row selected_row(int f, int nrows, __local const int *list, crow blk, int h, int G,
                           int kend, CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
                           int TQ, int HQ) {
  const int tig = get_local_id(0) & 3, fc = min(f, nrows - 1), x = fc / G;
  const int t = list[x], hq = h * G + fc - x * G;
  const long tok = blk.kstart + t;
  const kv_row r = {TIDX(q, blk.b, tok, hq) + 8 * tig, TIDX(dout, blk.b, tok, hq) + 8 * tig,
                    TIDX(lse, blk.b, tok, hq), ((long)blk.b * TQ + tok) * HQ + hq,
                    f < nrows ? min(kend, t + 1) : 0};
  return r;
}

__kernel __attribute__((reqd_work_group_size(32 * KV_NW, 1, 1))) void bwd_dkdv_selected_mma(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), __global const uint *mask, long mask_off, int NCH,
    __global const int *sel, long offsets_off, long slot_row_off, long slot_word_off,
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int BS, SEQ_ARGS) {
  __local int list[MASK_WORDS * 32];
  __local uint words[MASK_WORDS];
  __local uint4 kvl[KV_SLOTS * 32 * KV_NW];
  WARP_SCRATCH(wx);
  __global const int *offsets = sel + offsets_off;
  const int keys_per_group = 16 * KV_NW, parts = (BS + keys_per_group - 1) / keys_per_group;
  const int slot = get_group_id(0) / parts, nsel = H * B * NB;
  if (slot >= offsets[nsel]) return;
  const int srow = sel[slot_row_off + slot], h = srow / (B * NB);
  const crow blk = locate_block(cu, nseq, NB, TK, srow % (B * NB));
  const int u0 = blk.c * BS + (get_group_id(0) % parts) * keys_per_group;
  const int kend = min((blk.c + 1) * BS, blk.tk);
  if (u0 >= kend) return;
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, G = HQ / H, kw = u0 + 16 * warp;
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

  /* A fragments of this warp's keys kw + gid (lo) and kw + gid + 8 (hi) */
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int key = kw + gid + 8 * rh;
    const long kr = blk.kstart + min(key, kend - 1);
#pragma unroll
    for (int c = 0; c < DKC; c++)
      kvl[(2 * c + rh) * 32 * KV_NW + lid] =
          LD8(k, TIDX(k, blk.b, kr, h) + 32 * c + 8 * tig, key < kend);
#pragma unroll
    for (int c = 0; c < DVC; c++)
      kvl[(2 * DKC + 2 * c + rh) * 32 * KV_NW + lid] =
          LD8(v, TIDX(v, blk.b, kr, h) + 32 * c + 8 * tig, key < kend);
  }
  const float sl2 = scale * M_LOG2E_F;
  float ak[DK / 8][4], av[DV / 8][4];
  zero_tiles(ak, DK / 8);
  zero_tiles(av, DV / 8);

  __global const uint *mrow = mask + mask_off + (long)srow * NCH;
  const int wend = slot + 1 < offsets[srow + 1] ? sel[slot_word_off + slot + 1]
                                                : (blk.tk + 31) / 32;
  for (int w0 = sel[slot_word_off + slot]; w0 < wend; w0 += MASK_WORDS) {
    const int nrows = mask_expand(mrow, w0, wend, words, list) * G;
    for (int f0 = 0; f0 < nrows; f0 += 16) {
      kv_row rb[2], re[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        rb[nt] = selected_row(f0 + 8 * nt + gid, nrows, list, blk, h, G, kend, TPASS(q),
                              TPASS(dout), TPASS(lse), TQ, HQ);
#pragma unroll
        for (int x = 0; x < 2; x++)
          re[nt][x] = selected_row(f0 + 8 * nt + 2 * tig + x, nrows, list, blk, h, G, kend,
                                   TPASS(q), TPASS(dout), TPASS(lse), TQ, HQ);
      }
      dkdv_step(ak, av, kvl + lid, 32 * KV_NW, 0, kw, rb, re, q, dout, lse, gate, delta, sl2,
                wx);
    }
  }
  /* slot-major partial rows (slot * BS + key in block), as bwd_dkdv_selected */
  dkdv_write(ws + dk_off, ws + dv_off, (long)slot * BS + kw - blk.c * BS, 1, kw, kend, scale,
             ak, av);
}

/* ---------------------------------------------------------------- compressed branch */
#if MMA_DT == 2 /* f32 k_cmp, v_cmp split into bf16 hi + lo: bf16 q and do only */

#define KLD8 (DK / 8 + 4) /* row strides of the staged tiles in 16-byte units (64-byte pad) */
#define VLD8 (DV / 8 + 4)
#define CNT (CKT / 8)

inline float bf16_half(uint w, int upper) { return as_float(upper ? w & 0xffff0000u : w << 16); }

/* Elements i .. i + 7 of an f32 tensor (i a multiple of 4; zeros where !ok) as bf16
 * pairs: *hi = bf16(x), *lo = bf16(x - hi), so that hi + lo keeps 16 bits of x. */
inline __attribute__((always_inline)) void split8(__global const float *p, long i, bool ok, __local uint4 *hi,
                   __local uint4 *lo) {
  const float4 a = ok ? *(__global const float4 *)(p + i) : (float4)(0.0f);
  const float4 b = ok ? *(__global const float4 *)(p + i + 4) : (float4)(0.0f);
  const uint4 r = (uint4)(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
  *hi = r;
  *lo = (uint4)(pack2(a.x - bf16_half(r.x, 0), a.y - bf16_half(r.x, 1)),
                pack2(a.z - bf16_half(r.y, 0), a.w - bf16_half(r.y, 1)),
                pack2(b.x - bf16_half(r.z, 0), b.y - bf16_half(r.z, 1)),
                pack2(b.z - bf16_half(r.w, 0), b.w - bf16_half(r.w, 1)));
}

/* Flattened row f = (token f / G, head f % G) of a sequence: blocks c < (t + 1) / BS. */
inline int cmp_blocks(long f, long fend, int G, int BS) {
  return f < fend ? (int)(f / G + 1) / BS : 0;
}

__kernel __attribute__((reqd_work_group_size(32 * CQ_NW, 1, 1))) void bwd_dq_compressed_mma(
    CTENSOR(Q_DT, q), CTENSOR(0, kc), CTENSOR(0, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dq_off, float scale, int BS,
    SEQ_ARGS) {
  /* the staged tile: hi words of its CKT blocks, then their lo words */
  __local uint4 kst[2 * CKT * KLD8], vst[2 * CKT * VLD8];
  WARP_SCRATCH(wx);
  const bwd_seq sp = bwd_sequence(cu, nseq, TQ, NB, get_group_id(1));
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
    dq_row(rh, f < fend, sp.b, tok[rh], h * G + (int)(fc % G), TPASS(q), TPASS(dout),
           TPASS(lse), gate, delta, TQ, HQ, lse2, del, gt, qf, dof);
  }
  const float sl2 = scale * M_LOG2E_F;
  float acc[DK / 8][4];
  zero_tiles(acc, DK / 8);

  for (int k0 = 0; k0 < kend; k0 += CKT) {
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile consumed */
    for (int x = lid; x < CKT * (DK / 8); x += 32 * CQ_NW) {
      const int j = x / (DK / 8), u = x - j * (DK / 8);
      split8(kc, TIDX(kc, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * u, k0 + j < kend,
             kst + j * KLD8 + u, kst + (CKT + j) * KLD8 + u);
    }
    for (int x = lid; x < CKT * (DV / 8); x += 32 * CQ_NW) {
      const int j = x / (DV / 8), u = x - j * (DV / 8);
      split8(vc, TIDX(vc, sp.b, sp.c0 + min(k0 + j, kend - 1), h) + 8 * u, k0 + j < kend,
             vst + j * VLD8 + u, vst + (CKT + j) * VLD8 + u);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (k0 >= wend) continue; /* warp-uniform: none of this warp's rows sees the tile */

    /* S = Q Kc^T and dP = do Vc^T, both operands' hi and lo terms (A = q and do rows) */
    float s[CNT][4], dp[CNT][4];
#pragma unroll
    for (int nt = 0; nt < CNT; nt++) {
      __local const uint4 *kr = kst + (8 * nt + gid) * KLD8 + tig;
      __local const uint4 *vr = vst + (8 * nt + gid) * VLD8 + tig;
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < DKC; c++) {
        mma_dims(s[nt], qf[c][0], qf[c][1], kr[4 * c], wx);
        mma_dims(s[nt], qf[c][0], qf[c][1], kr[CKT * KLD8 + 4 * c], wx);
      }
#pragma unroll
      for (int c = 0; c < DVC; c++) {
        mma_dims(dp[nt], dof[c][0], dof[c][1], vr[4 * c], wx);
        mma_dims(dp[nt], dof[c][0], dof[c][1], vr[CKT * VLD8 + 4 * c], wx);
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
      for (int x = 0; x < 2; x++) {
        __local const uint4 *kr = kst + (x * CKT + 16 * ks + gid) * KLD8 + tig;
#pragma unroll
        for (int c = 0; c < DKC; c++) mma_rows(acc + 4 * c, a, kr[4 * c], kr[8 * KLD8 + 4 * c], wx);
      }
    }
  }

  /* dq += scale * acc: each row has this warp as its only writer */
  __global float *dq = ws + dq_off;
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    if (lim[rh] == 0) continue; /* past the rows, or sees no block: adds 0 */
    const int hq = h * G + (int)((fw + gid + 8 * rh) % G);
    __global float *row = dq + (((long)sp.b * TQ + tok[rh]) * HQ + hq) * DK + 8 * tig;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      __global float2 *at = (__global float2 *)(row + 8 * (n & ~3) + 2 * (n & 3));
      const float2 was = *at;
      *at = (float2)(was.x + scale * acc[n][2 * rh], was.y + scale * acc[n][2 * rh + 1]);
    }
  }
}

/* Row f of a compressed dk/dv walk (flattened over the sequence, as above). */
inline __attribute__((always_inline)) kv_row compressed_row(long f, long fend, bwd_seq sp, int h, int G, int BS,
                             CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout), CTENSOR(0, lse), int TQ,
                             int HQ) {
  const int tig = get_local_id(0) & 3;
  const long fc = min(f, fend - 1), tok = sp.t0 + fc / G;
  const int hq = h * G + (int)(fc % G);
  const kv_row r = {TIDX(q, sp.b, tok, hq) + 8 * tig, TIDX(dout, sp.b, tok, hq) + 8 * tig,
                    TIDX(lse, sp.b, tok, hq), ((long)sp.b * TQ + tok) * HQ + hq,
                    min(sp.nb, cmp_blocks(f, fend, G, BS))};
  return r;
}

/* Partial sums over token chunk (group % chunks) of 16 CKV_NW blocks: [chunks, B*NB, H, D]
 * as bwd_dkdv_compressed. Warp w owns blocks 16w .. 16w + 15 of the group (the M side of
 * every product, their f32 rows split into hi and lo A fragments that wait in local
 * memory) and walks the chunk's rows that see its first block, 16 per step (dkdv_step). */
__kernel __attribute__((reqd_work_group_size(32 * CKV_NW, 1, 1))) void bwd_dkdv_compressed_mma(
    CTENSOR(Q_DT, q), CTENSOR(0, kc), CTENSOR(0, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int chunks, int ctok, int BS, SEQ_ARGS) {
  __local uint4 kvl[2 * KV_SLOTS * 32 * CKV_NW];
  WARP_SCRATCH(wx);
  const bwd_seq sp = bwd_sequence(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, chunk = get_group_id(0) % chunks;
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, S = 32 * CKV_NW;
  const int kw = (get_group_id(0) / chunks) * 16 * CKV_NW + 16 * warp;
  if (kw >= sp.nb) return; /* no barrier below: warps may leave on their own */
  (void)TK;
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int c = kw + gid + 8 * rh;
    const long kr = sp.c0 + min(c, sp.nb - 1);
#pragma unroll
    for (int x = 0; x < DKC; x++)
      split8(kc, TIDX(kc, sp.b, kr, h) + 32 * x + 8 * tig, c < sp.nb,
             kvl + (2 * x + rh) * S + lid, kvl + (KV_SLOTS + 2 * x + rh) * S + lid);
#pragma unroll
    for (int x = 0; x < DVC; x++)
      split8(vc, TIDX(vc, sp.b, kr, h) + 32 * x + 8 * tig, c < sp.nb,
             kvl + (2 * DKC + 2 * x + rh) * S + lid,
             kvl + (KV_SLOTS + 2 * DKC + 2 * x + rh) * S + lid);
  }
  const float sl2 = scale * M_LOG2E_F;
  float ak[DK / 8][4], av[DV / 8][4];
  zero_tiles(ak, DK / 8);
  zero_tiles(av, DV / 8);

  /* tokens of the chunk from the end of the warp's first block on */
  const long ifirst = max((long)(kw + 1) * BS - 1, (long)chunk * ctok);
  const long ilast = min((long)sp.len - 1, (long)(chunk + 1) * ctok - 1);
  const long fend = (ilast + 1) * G;
  for (long f0 = ifirst * G; f0 < fend; f0 += 16) {
    kv_row rb[2], re[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
      rb[nt] = compressed_row(f0 + 8 * nt + gid, fend, sp, h, G, BS, TPASS(q), TPASS(dout),
                              TPASS(lse), TQ, HQ);
#pragma unroll
      for (int x = 0; x < 2; x++)
        re[nt][x] = compressed_row(f0 + 8 * nt + 2 * tig + x, fend, sp, h, G, BS, TPASS(q),
                                   TPASS(dout), TPASS(lse), TQ, HQ);
    }
    dkdv_step(ak, av, kvl + lid, S, 1, kw, rb, re, q, dout, lse, gate, delta, sl2, wx);
  }
  const long base = (long)chunk * B * NB + (long)sp.b * NB + sp.c0 + kw;
  dkdv_write(ws + dk_off, ws + dv_off, base * H + h, H, kw, sp.nb, scale, ak, av);
}
#endif /* MMA_DT == 2 */
