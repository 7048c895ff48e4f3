/* Tensor-core backward of the selected branch (NVIDIA mma.sync: cl/warp_ops.cl): the
 * kernels bwd_dq_selected and bwd_dkdv_selected of cl/attend_bwd.cl with the same
 * arguments, the same scratch regions and the same outputs, for q, k, v and do all f16 or
 * all bf16 (MMA_DT) with f32 accumulation. src/backward.c takes them where the context
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
 * 32c + 8tig + 2j + {0, 1} in its register 4c + j. Rows staged in local memory (the
 * dk/dv kernels' q and do) give those B fragments by ldmatrix.trans instead
 * (mma_rows_ldm), in natural dim order (accumulator n: dims 8n + 2tig + {0, 1}).
 *
 * bwd_dq_selected_mma: a group owns 16 query heads of one token (16 rows: one mma tile;
 * G < 16 leaves rows idle) and the token's selected key slots (deduplicated blocks back to
 * back, as in the portable kernel). Its DQ_NW warps split the key slots in tiles of KT:
 * warp w takes tiles w, w + DQ_NW, ... Per tile: S and dP (A = q and do rows, B = k and
 * v rows), P and dS in the C layout, which packs into the A fragment of dq += dS K (B =
 * the same k words through movmatrix, kept from S). The q and do A fragments wait in
 * local memory (DQ_QLOCAL, loaded once by the group's warps) rather than in 64 registers
 * a lane, and every k and v load of a tile is issued before its first mma (H100, G = 16,
 * T = 65536: 38.2 -> 36.3 ms). KT = 16: ptxas for sm_90 gives 224 registers and no
 * spills at DK = DV = 128 (tools/ptx_check.sh; 234 with the fragments in registers); KT
 * = 32 spills, the k words of a tile staying live. Each warp keeps 16 x DK f32 partial dq;
 * at the end warp 0 writes them to local memory and warps 1, 2, ... add theirs in that
 * order, so dq = scale ((w0 + w1) + w2) + ... whatever the scheduling.
 *
 * bwd_dkdv_selected_mma: a group owns 16 KV_NW keys of the block of one selection chunk
 * (cl/select_mask.cl; the same slots and partial-sum rows as the portable kernel) and
 * walks the chunk's tokens, all G heads each, in increasing order, 16 rows (f = token
 * index * G + g) per step. Warp w owns keys 16w .. 16w + 15 of the group: the key side is
 * the M dimension, S^T = K Q^T and dP^T = V do^T (A = k and v rows, B = q and do rows
 * directly), then dv += (g P)^T do and dk += dS^T Q (B = the staged do and q rows read
 * again, transposed by ldmatrix). Every key's dk and dv have one warp
 * as their only writer, accumulated in the fixed row order of the walk. The k and v A
 * fragments stay for the whole walk; they wait in local memory (each lane its own slots,
 * in mma register order, so no synchronisation) to leave the registers to the two
 * accumulators (DK/2 + DV/2 floats a lane). Each step's 16 rows (q and do, RLD8-padded)
 * wait there too, in two stages that the group's warps share: the next step's rows
 * arrive by cp.async (each warp copies its share of every row, stage_row_copy; warp 0
 * loads their lse, delta, gate and mask limit by plain loads kept in registers for a
 * step) while this step computes, as in bwd_dkdv_compressed_mma
 * (cl/attend_bwd_cmp_mma.cl), rather than each step waiting on its global loads. One
 * barrier a step: after it the step's rows are in and every warp is past the previous
 * step, whose stage the next copies then refill. Sharing the stage reads each row from
 * L2 once per group instead of once per warp (H100, G = 16, T = 65536: one warp a group
 * with its own stages 42.9 ms, two sharing 28.8). The mask is expanded MASK_WORDS words
 * at a time (barriers: every warp runs the same windows and steps), and each window
 * stages its first step before its step loop; rows past the window copy its last row
 * (lim = 0 masks them). At DK = DV = 128 a warp's fragments take 8 KiB and the group's
 * stages 18.5 KiB, so two warps a group (src/backward.c lowers KV_NW to fit 48 KiB and
 * divide the block); ptxas (tools/ptx_check.sh): 255 registers, 32 bytes of spill
 * (per-warp stages: 255 and 28; unstaged: 254 and 8; DK = 192: 28, unstaged 228).
 *
 * Masked pairs (key position after the row's token, key past the block or sequence, row
 * past the group's rows) get P = dS = 0; loads of keys or rows past the end read zeros
 * (dq; dk/dv: keys) or a clamped row (dk/dv: rows).
 * The selection list (selection_rows) comes from cl/bwd_mask.cl, the selection-mask
 * expansion (kvm_mask_fill: a list of up to 32 MASK_WORDS tokens at a time) and each
 * token's slot (kvm_block_slots) from cl/kvm_rows.cl; both precede this file.
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
#define KV_NW 1 /* bwd_dkdv_selected_mma: warps per group (16 keys each; host: up to 4) */
#endif
#ifndef KT
#define KT 16 /* bwd_dq_selected_mma: key slots per warp step, a multiple of 16 */
#endif
#ifndef DQ_QLOCAL /* bwd_dq_selected_mma: q and do A fragments read from local memory (1) */
#define DQ_QLOCAL 1
#endif
#ifndef MASK_WORDS
#define MASK_WORDS 16 /* bwd_dkdv_selected_mma: selection-mask words expanded at once */
#endif
#ifndef KV_LOCAL
#define KV_LOCAL 1 /* 1: dkdv keeps its k/v A fragments in local memory, 0: in registers */
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
#if DK % 32 || DV % 32 || KT % 16
#error "attend_bwd_mma.cl: DK and DV multiples of 32, KT a multiple of 16"
#endif
#if WARP_EMULATE && (DQ_NW != 1 || KV_NW != 1)
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

#define U4(v, j) ((j) == 0 ? (v).x : (j) == 1 ? (v).y : (j) == 2 ? (v).z : (v).w)
/* 8 elements (16 bytes) at element index i of a 16-bit tensor, or zeros where !ok. */
#define LD8(p, i, ok) ((ok) ? *(__global const uint4 *)((p) + (i)) : (uint4)(0u))

/* acc (16 x 8, f32) += A B over the 16 dims of chunk word pair s (0: x,y; 1: z,w):
 * A rows gid, gid+8 in alo, ahi; B column gid in b (all in the permuted dim order). */
inline void mma_dims(float *acc, uint4 alo, uint4 ahi, uint4 b, __local uint *wx) {
  mma_16816(acc, alo.x, ahi.x, alo.y, ahi.y, b.x, b.y, wx);
  mma_16816(acc, alo.z, ahi.z, alo.w, ahi.w, b.z, b.w, wx);
}

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

/* One sequence of the batch (as cl/attend_bwd.cl's seq_span). */
typedef struct bwd_seq {
  int b, t0, len;
} bwd_seq;

inline bwd_seq bwd_sequence(__global const int *cu, int nseq, int TQ, int s) {
  bwd_seq q = {s, 0, TQ};
  if (nseq > 0) q.b = 0, q.t0 = cu[s], q.len = cu[s + 1] - cu[s];
  return q;
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
#if DQ_QLOCAL
  /* the group's 16 rows of q and do as A fragment words: unit (c, rh) of lane l at
   * qdl[(c * 2 + rh) * 32 + l] (q chunks c < DKC, then do), each warp reading them back */
  __local uint4 qdl[(DKC + DVC) * 2 * 32] __attribute__((aligned(16)));
#endif
  WARP_SCRATCH(wx);
  const bwd_seq sp = bwd_sequence(cu, nseq, TQ, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, chunks = (G + 15) / 16;
  const int i = get_group_id(0) / chunks, g0 = (get_group_id(0) % chunks) * 16;
  if (i >= sp.len) return;
  (void)B, (void)TK, (void)NB;
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, tok = sp.t0 + i;
  __local const int *blist = sel + 2 * MAX_S;
  const int nkeys = BS * selection_rows(bi + TIDX(bi, sp.b, tok, h), S, i / BS, sel,
                                        sel + MAX_S, sel + 2 * MAX_S, 32 * DQ_NW);
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;

  /* This lane's rows gid and gid + 8: heads g0 + gid (+ 8) of the token. */
  float lse2[2], del[2], gt[2];
#if DQ_QLOCAL
  /* q and do wait in local memory rather than in 64 registers a lane: the registers go to
   * the tile's K and V loads, all issued before its mma (warp w loads chunks w, w + DQ_NW) */
#define QF(c, rh) qdl[((c) * 2 + (rh)) * 32 + lane]
#define DOF(c, rh) qdl[((DKC + (c)) * 2 + (rh)) * 32 + lane]
#else
  uint4 qf[DKC][2], dof[DVC][2];
#define QF(c, rh) qf[c][rh]
#define DOF(c, rh) dof[c][rh]
#endif
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const int g = g0 + gid + 8 * rh, hq = h * G + g;
    const bool ok = g < G;
    const long rs = ((long)sp.b * TQ + tok) * HQ + hq;
    lse2[rh] = ok ? lse[TIDX(lse, sp.b, tok, hq)] * M_LOG2E_F : 0.0f;
    del[rh] = ok ? delta[rs] : 0.0f;
    gt[rh] = ok ? gate[rs] : 0.0f;
#pragma unroll
    for (int c = 0; c < DKC; c++)
      if (!DQ_QLOCAL || c % DQ_NW == warp)
        QF(c, rh) = LD8(q, TIDX(q, sp.b, tok, hq) + 32 * c + 8 * tig, ok);
#pragma unroll
    for (int c = 0; c < DVC; c++)
      if (!DQ_QLOCAL || (DKC + c) % DQ_NW == warp)
        DOF(c, rh) = LD8(dout, TIDX(dout, sp.b, tok, hq) + 32 * c + 8 * tig, ok);
  }
#if DQ_QLOCAL
  barrier(CLK_LOCAL_MEM_FENCE);
#endif
  const float sl2 = scale * M_LOG2E_F;
  float acc[DK / 8][4];
#pragma unroll
  for (int n = 0; n < DK / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int k0 = warp * KT; k0 < nkeys; k0 += DQ_NW * KT) {
    /* S = Q K^T and dP = do V^T for key slots k0 .. k0 + KT - 1; the k rows stay for
     * dq (the B fragments of dS K are the same words through movmatrix) */
    float s[NT][4], dp[NT][4];
    uint4 kt[NT][DKC];
#if DQ_QLOCAL
    /* every K and V load of the tile in flight before the first mma */
    uint4 vt[NT][DVC];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const int u = k0 + 8 * nt + gid;
      const bool ok = slot_visible(u, nkeys, blist, BS, i); /* else maybe past the sequence */
      const long row = slot_row(u, nkeys, blist, BS, sp.t0);
      const long ka = TIDX(k, sp.b, row, h) + 8 * tig, va = TIDX(v, sp.b, row, h) + 8 * tig;
#pragma unroll
      for (int c = 0; c < DKC; c++) kt[nt][c] = LD8(k, ka + 32 * c, ok);
#pragma unroll
      for (int c = 0; c < DVC; c++) vt[nt][c] = LD8(v, va + 32 * c, ok);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
    }
    /* each A fragment read from local memory once for the NT tiles */
#pragma unroll
    for (int c = 0; c < DKC; c++) {
      const uint4 a0 = QF(c, 0), a1 = QF(c, 1);
#pragma unroll
      for (int nt = 0; nt < NT; nt++) mma_dims(s[nt], a0, a1, kt[nt][c], wx);
    }
#pragma unroll
    for (int c = 0; c < DVC; c++) {
      const uint4 a0 = DOF(c, 0), a1 = DOF(c, 1);
#pragma unroll
      for (int nt = 0; nt < NT; nt++) mma_dims(dp[nt], a0, a1, vt[nt][c], wx);
    }
#else
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
        mma_dims(s[nt], QF(c, 0), QF(c, 1), kt[nt][c], wx);
      }
#pragma unroll
      for (int c = 0; c < DVC; c++)
        mma_dims(dp[nt], DOF(c, 0), DOF(c, 1), LD8(v, va + 32 * c, ok), wx);
    }
#endif
    /* dS in place of S: element e is row gid + 8 (e >> 1), slot k0 + 8nt + 2tig + (e & 1) */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int rh = e >> 1, u = k0 + 8 * nt + 2 * tig + (e & 1);
        const float p =
            slot_visible(u, nkeys, blist, BS, i) ? exp2(s[nt][e] * sl2 - lse2[rh]) : 0.0f;
        s[nt][e] = p * (gt[rh] * dp[nt][e] - del[rh]);
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
#undef QF
#undef DOF

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

/* One row of a dk/dv step: token position (in its sequence), query head, valid. */
typedef struct step_row {
  int t, hq;
  bool ok;
} step_row;

inline step_row walk_row(int f, int nrows, __local const int *list, int h, int G) {
  step_row r;
  r.ok = f < nrows;
  f = min(f, nrows - 1);
  const int x = f / G;
  r.t = list[x];
  r.hq = h * G + f - x * G;
  return r;
}

/* The A fragment words of this lane's keys gid (lo) and gid + 8 (hi) over one chunk (16
 * bytes of each, as loaded for mma_dims) in mma_16816's register order: half w = 0 the
 * dims of word pair x, y, w = 1 those of z, w; one 16-byte read then feeds one mma. */
inline uint4 kv_afrag(uint4 lo, uint4 hi, int w) {
  return w ? (uint4)(lo.z, hi.z, lo.w, hi.w) : (uint4)(lo.x, hi.x, lo.y, hi.y);
}

/* mma_dims with the A words of kv_afrag (a0: half 0, a1: half 1). */
inline void mma_dims_kv(float *acc, uint4 a0, uint4 a1, uint4 b, __local uint *wx) {
  mma_16816(acc, a0.x, a0.y, a0.z, a0.w, b.x, b.y, wx);
  mma_16816(acc, a1.x, a1.y, a1.z, a1.w, b.z, b.w, wx);
}

/* The 16 rows of a dk/dv step (this file's selected kernel and cl/attend_bwd_cmp_mma.cl's
 * compressed one) wait in local memory (a stage; two per warp, the next
 * step's arriving by cp.async while this one computes): row r holds its q elements in
 * 16-byte units 0 .. DK/8 - 1 and its do elements from DK/8 on. The row stride RLD8 (in
 * units) is 4 mod 8, so that the 8 lanes of a 16-byte access phase (rows gid, gid + 1 at
 * units 4c + tig) hit distinct banks. Next to it, per row (lse, delta, gate as f32 bits,
 * lim): keys below lim see the row (lim = 0 past the walk). */
#define RLD8 (((DK + DV) / 8) | 4)
/* ... and swizzled for the tail's ldmatrix: unit u of row r sits at u ^ RSWZ(r) (an XOR
 * below 4 keeps a unit in its aligned four), so that an ldmatrix matrix (8 consecutive
 * rows at one unit) falls in 8 distinct bank groups as the 16-byte reads still do. */
#define RSWZ(r) (((r) >> 1) & 3)
/* This lane's element 0 of accumulator tile n of dk or dv: dim 8n + 2tig (the tail's
 * ldmatrix gives B fragments in natural dim order). */
#define ACC_DIM(n) (8 * (n) + 2 * (get_local_id(0) & 3))

/* acc[n] (natural dims 8n + 2tig) += A R for n < D / 8, R = 16 rows x D dims of local
 * memory: row r at rows + r * ld (RSWZ-swizzled), dims from unit u0 (a multiple of 4),
 * read transposed by ldmatrix (the B fragments of a product contracting over rows). Lane
 * 8i + r gives row 8 (i & 1) + r at dims 16p + 8 (i >> 1), so one instruction holds b0,
 * b1 of n-tiles 2p and 2p + 1; that logical unit sits at 4 (p >> 1) + ((2 (p & 1) + (i >>
 * 1)) ^ RSWZ(row)). */
inline __attribute__((always_inline)) void mma_rows_ldm(float (*acc)[4], afrag a,
                                                        __local const uint4 *rows, int ld,
                                                        int u0, const int D, __local uint *wx) {
  const int lane = get_local_id(0) & 31, lr = 8 * ((lane >> 3) & 1) + (lane & 7);
  __local const uint4 *row = rows + lr * ld + u0;
  const int ue = (lane >> 4) ^ RSWZ(lr), uo = (2 + (lane >> 4)) ^ RSWZ(lr);
#pragma unroll
  for (int p = 0; p < D / 16; p++) {
    const uint4 b = ldmatrix_x4_t(row + 4 * (p >> 1) + ((p & 1) ? uo : ue), wx);
    mma_16816(acc[2 * p], a.a0, a.a1, a.a2, a.a3, b.x, b.y, wx);
    mma_16816(acc[2 * p + 1], a.a0, a.a1, a.a2, a.a3, b.z, b.w, wx);
  }
}

/* The end of a dk/dv step of either dk/dv kernel: st = S^T and dpt = dP^T of this warp's
 * keys key0 + gid (+ 8) against the step's rows 8nt + 2tig + x become g P and dS, from
 * the rows' staged scalars rs[8nt + x] (lse, delta, gate bits, lim: keys below lim see
 * the row); then dv += (g P)^T do and dk += dS^T Q with B = the staged rows again, read
 * transposed by ldmatrix (stage: the step's first row), one instruction for two n-tiles,
 * where 16-byte reads and movmatrix took one movmatrix per mma. */
inline __attribute__((always_inline)) void dkdv_tail(float (*ak)[4], float (*av)[4],
                                                     float (*st)[4], float (*dpt)[4],
                                                     __local const uint4 *stage,
                                                     __local const uint4 *rs, int key0,
                                                     float sl2, __local uint *wx) {
  const int gid = (get_local_id(0) & 31) >> 2;
  /* element e of tile nt: key key0 + gid + 8 (e >> 1), row 8nt + 2tig + (e & 1) */
#pragma unroll
  for (int nt = 0; nt < 2; nt++) {
#pragma unroll
    for (int x = 0; x < 2; x++) {
      const uint4 r = rs[8 * nt + x];
      const int lim = (int)r.w;
      const bool ok = lim > 0;
      const float l2 = ok ? as_float(r.x) * M_LOG2E_F : 0.0f;
      const float dl = ok ? as_float(r.y) : 0.0f, g = ok ? as_float(r.z) : 0.0f;
#pragma unroll
      for (int kh = 0; kh < 2; kh++) {
        const int e = 2 * kh + x;
        const float p = key0 + gid + 8 * kh < lim ? exp2(st[nt][e] * sl2 - l2) : 0.0f;
        st[nt][e] = g * p;
        dpt[nt][e] = p * (g * dpt[nt][e] - dl);
      }
    }
  }
  const afrag apg = pack_a(st[0], st[1]), ads = pack_a(dpt[0], dpt[1]);
  mma_rows_ldm(av, apg, stage, RLD8, DK / 8, DV, wx);
  mma_rows_ldm(ak, ads, stage, RLD8, 0, DK, wx);
}

#ifndef TPASS
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2 /* a CTENSOR passed on */
#endif

/* This lane's cp.async copies of one staged row (q units 4c + tig from qr, do units from
 * orow, into d = the row at unit tig) where the group's nw warps share the stage: warp w
 * takes the 32-element chunks j = w, w + nw, ... of the row's DK / 32 + DV / 32, so that
 * the rows of a step are read from L2 once for the whole group. */
inline __attribute__((always_inline)) void stage_row_copy(__local uint4 *d,
                                                          __global const STORAGE(Q_DT) *qr,
                                                          __global const STORAGE(DO_DT) *orow,
                                                          int warp, int nw) {
#pragma unroll
  for (int j = 0; j < DKC + DVC; j++) {
    if (j % nw != warp) continue;
    if (j < DKC)
      cp_async16(d + 4 * j, qr + 32 * j);
    else
      cp_async16(d + DK / 8 + 4 * (j - DKC), orow + 32 * (j - DKC));
  }
}

/* Stages rows f0 .. f0 + 15 of the walk (list, nrows) into the group's stage rows: this
 * lane's share (stage_row_copy, warp of KV_NW) of rows f0 + gid and f0 + gid + 8, only
 * where copy (group-uniform); rows past the walk copy its last row (walk_row clamps).
 * Warp 0 returns the scalars of row f0 + gid + 8 (tig & 1) for it to store one step
 * later, once its loads have had a step's time to arrive (other warps: zeros, unread).
 * Scalars are only read for rows in the walk, so an empty walk (nrows = 0) reads no
 * tensor. */
inline __attribute__((always_inline)) uint4
sel_stage(__local uint4 *rows, bool copy, int f0, int nrows, __local const int *list, crow blk,
          int h, int G, int kend, CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
          __global const float *gate, __global const float *delta, int TQ, int HQ) {
  const int lane = get_local_id(0) & 31, gid = lane >> 2, tig = lane & 3;
  const int warp = get_local_id(0) >> 5;
  step_row r[2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    r[rh] = walk_row(f0 + gid + 8 * rh, nrows, list, h, G);
    if (copy) {
      const long tok = blk.kstart + r[rh].t;
      stage_row_copy(rows + (gid + 8 * rh) * RLD8 + (tig ^ RSWZ(gid)),
                     q + TIDX(q, blk.b, tok, r[rh].hq) + 8 * tig,
                     dout + TIDX(dout, blk.b, tok, r[rh].hq) + 8 * tig, warp, KV_NW);
    }
  }
  const step_row e = (tig & 1) ? r[1] : r[0];
  const bool ok = e.ok && warp == 0;
  const long tok = blk.kstart + e.t, rs = ((long)blk.b * TQ + tok) * HQ + e.hq;
  return (uint4)(ok ? as_uint(lse[TIDX(lse, blk.b, tok, e.hq)]) : 0u, ok ? as_uint(delta[rs]) : 0u,
                 ok ? as_uint(gate[rs]) : 0u, ok ? (uint)min(kend, e.t + 1) : 0u);
}

#if KV_LOCAL
#define KFRAG(c, w) kvl[(2 * (c) + (w)) * 32 * KV_NW + lid]
#define VFRAG(c, w) kvl[(2 * DKC + 2 * (c) + (w)) * 32 * KV_NW + lid]
#else
#define KFRAG(c, w) kf[c][w]
#define VFRAG(c, w) vf[c][w]
#endif

__kernel __attribute__((reqd_work_group_size(32 * KV_NW, 1, 1))) void bwd_dkdv_selected_mma(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), __global const uint *mask, long mask_off, int NCH,
    __global const int *sel, long offsets_off, long slot_row_off, long slot_word_off,
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int BS, SEQ_ARGS) {
  __local int list[32 * MASK_WORDS];
  __local uint words[32 * KV_NW];
#if KV_LOCAL
  __local uint4 kvl[2 * (DKC + DVC) * 32 * KV_NW] __attribute__((aligned(16)));
#endif
  __local uint4 rbuf[2 * 16 * RLD8] __attribute__((aligned(16))); /* the group's 2 stages */
  __local uint4 sbuf[2 * 16] __attribute__((aligned(16)));         /* their scalars */
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

  /* A fragments of this warp's keys kw + gid (lo) and kw + gid + 8 (hi), kv_afrag order */
#if !KV_LOCAL
  uint4 kf[DKC][2], vf[DVC][2];
#endif
  {
    long kr[2];
    bool kok[2];
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      const int key = kw + gid + 8 * rh;
      kok[rh] = key < kend;
      kr[rh] = blk.kstart + min(key, kend - 1);
    }
#pragma unroll
    for (int c = 0; c < DKC; c++) {
      const uint4 lo = LD8(k, TIDX(k, blk.b, kr[0], h) + 32 * c + 8 * tig, kok[0]);
      const uint4 hi = LD8(k, TIDX(k, blk.b, kr[1], h) + 32 * c + 8 * tig, kok[1]);
      KFRAG(c, 0) = kv_afrag(lo, hi, 0);
      KFRAG(c, 1) = kv_afrag(lo, hi, 1);
    }
#pragma unroll
    for (int c = 0; c < DVC; c++) {
      const uint4 lo = LD8(v, TIDX(v, blk.b, kr[0], h) + 32 * c + 8 * tig, kok[0]);
      const uint4 hi = LD8(v, TIDX(v, blk.b, kr[1], h) + 32 * c + 8 * tig, kok[1]);
      VFRAG(c, 0) = kv_afrag(lo, hi, 0);
      VFRAG(c, 1) = kv_afrag(lo, hi, 1);
    }
  }
  const float sl2 = scale * M_LOG2E_F;
  float ak[DK / 8][4], av[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DK / 8; n++) ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = 0.0f;
#pragma unroll
  for (int n = 0; n < DV / 8; n++) av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.0f;

  __global const uint *mrow = mask + mask_off + (long)srow * NCH;
  const int wend = slot + 1 < offsets[srow + 1] ? sel[slot_word_off + slot + 1]
                                                : (blk.tk + 31) / 32;
  __local uint4 *rows = rbuf, *rsc = sbuf;
  /* the group's walk, as many tokens at a time as the list holds (the same trip counts
   * and barriers for every warp: nrows is the group's); each list stages its first step
   * before its step loop (kvm_mask_fill's first barrier: every warp is past the previous
   * list's steps), every step the next one */
  for (int w = sel[slot_word_off + slot]; w < wend;) {
    int ntok = 0;
    w = kvm_mask_fill(mrow, w, wend, 0, INT_MAX, 32 * MASK_WORDS, 32 * KV_NW, words, list, &ntok);
    const int nrows = ntok * G, nsteps = (nrows + 15) / 16;
    uint4 sc = sel_stage(rows, nsteps > 0, 0, nrows, list, blk, h, G, kend, TPASS(q),
                         TPASS(dout), TPASS(lse), gate, delta, TQ, HQ);
    cp_async_commit();
    for (int s = 0; s < nsteps; s++) {
      const int cur = s & 1;
      /* scalars cur were last read by step s - 2 (every warp is past step s - 1's barrier) */
      if (warp == 0 && tig < 2) rsc[16 * cur + gid + 8 * tig] = sc;
      cp_async_wait(0);              /* this lane's copies of step s have landed */
      barrier(CLK_LOCAL_MEM_FENCE); /* and every warp's, with the scalars; every warp is
                                      * past step s - 1, so stage cur ^ 1 is free */
      sc = sel_stage(rows + 16 * RLD8 * (cur ^ 1), s + 1 < nsteps, 16 * (s + 1), nrows, list,
                     blk, h, G, kend, TPASS(q), TPASS(dout), TPASS(lse), gate, delta, TQ, HQ);
      cp_async_commit();
      /* rw: the stage's row gid at unit tig (row 8nt + gid, a B column, at rw[8nt RLD8];
       * RSWZ(gid + 8) = RSWZ(gid)); rsc0: the scalars of row 2tig (row 8nt + 2tig + x, a C
       * column, at rsc0[8nt + x]) */
      __local const uint4 *stage = rows + 16 * RLD8 * cur;
      __local const uint4 *rw = stage + gid * RLD8 + (tig ^ RSWZ(gid));
      __local const uint4 *rsc0 = rsc + 16 * cur + 2 * tig;
      /* S^T = K Q^T and dP^T = V do^T over the step's rows: n-tile nt is rows 8nt .. 8nt
       * + 7; each A fragment read once for both tiles (each tile's sums keep their order) */
      float st[2][4], dpt[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; nt++) {
        st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
        dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
      }
#pragma unroll
      for (int c = 0; c < DKC; c++) {
        const uint4 a0 = KFRAG(c, 0), a1 = KFRAG(c, 1);
#pragma unroll
        for (int nt = 0; nt < 2; nt++) mma_dims_kv(st[nt], a0, a1, rw[8 * nt * RLD8 + 4 * c], wx);
      }
      /* no hazard here, but ptxas moves no local read across a warp_sync: without these
       * two it hoists fragment reads over the mma (ptx_check, DK = DV = 128: 64 bytes of
       * spill without them, 28 with; DK = 192: 424 and 28) */
      warp_sync(wx);
#pragma unroll
      for (int c = 0; c < DVC; c++) {
        const uint4 a0 = VFRAG(c, 0), a1 = VFRAG(c, 1);
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
          mma_dims_kv(dpt[nt], a0, a1, rw[8 * nt * RLD8 + DK / 8 + 4 * c], wx);
      }
      warp_sync(wx);
      dkdv_tail(ak, av, st, dpt, stage, rsc0, kw, sl2, wx);
    }
  }
  cp_async_wait(0);

  /* slot-major partial rows (slot * BS + key in block), as bwd_dkdv_selected; the slot
   * and block read again: they need not stay in registers through the walk */
  __global float *dk = ws + dk_off, *dv = ws + dv_off;
  const int slot2 = get_group_id(0) / parts;
  const crow blk2 = locate_block(cu, nseq, NB, TK, sel[slot_row_off + slot2] % (B * NB));
  const long base = (long)slot2 * BS + kw - blk2.c * BS;
#pragma unroll
  for (int kh = 0; kh < 2; kh++) {
    const int key = gid + 8 * kh;
    if (kw + key >= kend) continue;
    __global float *rk = dk + (base + key) * DK, *rv = dv + (base + key) * DV;
#pragma unroll
    for (int n = 0; n < DK / 8; n++) {
      rk[ACC_DIM(n)] = scale * ak[n][2 * kh];
      rk[ACC_DIM(n) + 1] = scale * ak[n][2 * kh + 1];
    }
#pragma unroll
    for (int n = 0; n < DV / 8; n++) {
      rv[ACC_DIM(n)] = av[n][2 * kh];
      rv[ACC_DIM(n) + 1] = av[n][2 * kh + 1];
    }
  }
}

/* ---------------------------------------------------------------- dq, kv-block-major */
#ifdef KVQ_BS /* the block size: the host defines it where it takes this kernel */
#ifndef KVQ_NW
#define KVQ_NW 2 /* warps per group, each 16 rows a step (the host's default) */
#endif
#if WARP_EMULATE && KVQ_NW != 1
#error "attend_bwd_mma.cl: the warp emulation runs one warp per group"
#endif
#define KVQ_LD8(ld, j, u) ((j) * (ld) + ((ld) % 8 == 0 ? (u) ^ (((j) & 1) << 2) : (u)))
#define KVQ_KEYS ((KVQ_BS + 15) / 16 * 16) /* staged rows: whole 16-key steps */
#define KVQ_LIST 512 /* tokens a group lists at once (cl/kvm_rows.cl) */
/* staged k rows: (DK / 8) | 4 units (4 mod 8), RSWZ-swizzled as the dk/dv stages, for
 * the transposed reads of dq += dS K (mma_rows_ldm) */
#define KVQ_KLD ((DK / 8) | 4)

/* bwd_dq_selected_kvm_mma: the selected branch's dq turned around, for small G (where a
 * query-major group of 16 rows packs 16/G tokens whose block lists barely overlap, so
 * each token reads its blocks' K/V alone and most mma rows are masked). A group takes one
 * selection chunk (the dk/dv kernel's: a block of one kv head, the tokens that chose it),
 * stages the block's K and V in local memory once (rows swizzled as in cl/attend_mma.cl),
 * and walks the chunk's rows (token x, head g at x G + g) in steps of 16, step s on warp
 * s % KVQ_NW: S = Q K^T and dP = do V^T over the block's keys (A = the rows' q and do
 * from global memory, B = the staged rows), dS as in bwd_dq_selected_mma, and dq over
 * this block alone = scale dS K (B = the staged K rows read transposed by ldmatrix), written
 * to the row's partial slot: the first slot of its token's block_indices row naming the
 * block. bwd_dq_merge (cl/selected_merge.cl) then sums a row's valid slots in slot order,
 * as the query-major kernel's warps are summed in warp order. A launch is one pass over
 * the tokens b TQ + t in [r0, r1) (src/backward.c bounds the partials' bytes by passes):
 * a chunk walks only its mask words that hold them, token (b TQ + t) writes partial row
 * (b TQ + t - r0) HQ + hq, and a chunk with none of them exits before staging its block. */
__kernel __attribute__((reqd_work_group_size(32 * KVQ_NW, 1, 1))) void bwd_dq_selected_kvm_mma(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), CITENSOR(bi), __global const uint *mask, long mask_off, int NCH,
    __global const int *sel, long offsets_off, long slot_row_off, long slot_word_off,
    __global float *ws, long gate_off, long delta_off, long part_off, long r0, long r1,
    float scale, int S, SEQ_ARGS) {
  __local uint4 kst[KVQ_KEYS * KVQ_KLD] __attribute__((aligned(16)));
  __local uint4 vst[KVQ_KEYS * (DV / 8)] __attribute__((aligned(16)));
  __local int list[KVQ_LIST], tslot[KVQ_LIST];
  __local uint words[32 * KVQ_NW];
  WARP_SCRATCH(wx);
  __global const int *offsets = sel + offsets_off;
  const int slot = get_group_id(0), nsel = H * B * NB;
  if (slot >= offsets[nsel]) return; /* past the last chunk: the whole group */
  const int srow = sel[slot_row_off + slot], h = srow / (B * NB);
  const crow blk = locate_block(cu, nseq, NB, TK, srow % (B * NB));
  const int c0 = blk.c * KVQ_BS, nkeys = min(KVQ_BS, blk.tk - c0);
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3, G = HQ / H;
  __global const float *gate = ws + gate_off, *delta = ws + delta_off;
  /* this pass's tokens of the chunk's sequence, [tlo, thi), and their mask words */
  const long sb = (long)blk.b * TQ + blk.kstart;
  const int tlo = (int)clamp(r0 - sb, 0L, (long)blk.tk);
  const int thi = (int)clamp(r1 - sb, 0L, (long)blk.tk);
  const int wnext = slot + 1 < offsets[srow + 1] ? sel[slot_word_off + slot + 1]
                                                 : (blk.tk + 31) / 32;
  const int wfirst = max(sel[slot_word_off + slot], tlo / 32), wend = min(wnext, (thi + 31) / 32);
  if (wfirst >= wend) return; /* none of the pass's tokens: the whole group */

  /* the block's K and V rows, zeros past its keys (P is 0 there; no NaN enters); rows
   * clamped into the block, so that every load is valid and four are in flight at once */
#pragma unroll 4
  for (int i = lid; i < KVQ_KEYS * (DK / 8); i += 32 * KVQ_NW) {
    const int j = i / (DK / 8), u = i - j * (DK / 8);
    const uint4 w = LD8(k, TIDX(k, blk.b, blk.kstart + c0 + min(j, nkeys - 1), h) + 8 * u, true);
    kst[j * KVQ_KLD + (u ^ RSWZ(j))] = j < nkeys ? w : (uint4)(0u);
  }
#pragma unroll 4
  for (int i = lid; i < KVQ_KEYS * (DV / 8); i += 32 * KVQ_NW) {
    const int j = i / (DV / 8), u = i - j * (DV / 8);
    const uint4 w = LD8(v, TIDX(v, blk.b, blk.kstart + c0 + min(j, nkeys - 1), h) + 8 * u, true);
    vst[KVQ_LD8(DV / 8, j, u)] = j < nkeys ? w : (uint4)(0u);
  }
  const float sl2 = scale * M_LOG2E_F;
  __global const uint *mrow = mask + mask_off + (long)srow * NCH;
  for (int w = wfirst; w < wend;) {
    /* as many of the pass's tokens as the list holds, and each one's slot naming the block */
    int ntok = 0;
    w = kvm_mask_fill(mrow, w, wend, tlo, thi, KVQ_LIST, 32 * KVQ_NW, words, list, &ntok);
    kvm_block_slots(TPASS(bi), blk.b, blk.kstart, h, blk.c, S, list, ntok, 32 * KVQ_NW,
                    tslot);
    const int nrows = ntok * G;
    for (int f0 = 16 * warp; f0 < nrows; f0 += 16 * KVQ_NW) {
      /* this lane's rows f0 + gid (+ 8): token list[x], head g */
      float lse2[2], del[2], gt[2];
      int tpos[2];
      long rrow[2];
      uint4 qf[DKC][2], dof[DVC][2];
#pragma unroll
      for (int rh = 0; rh < 2; rh++) {
        const int f = f0 + gid + 8 * rh, x = min(f, nrows - 1) / G;
        const bool ok = f < nrows;
        const int hq = h * G + min(f, nrows - 1) - x * G;
        const long tok = blk.kstart + list[x], rs = ((long)blk.b * TQ + tok) * HQ + hq;
        tpos[rh] = ok ? list[x] : -1;
        rrow[rh] = (rs - r0 * HQ) * S + tslot[x];
        lse2[rh] = ok ? lse[TIDX(lse, blk.b, tok, hq)] * M_LOG2E_F : 0.0f;
        del[rh] = ok ? delta[rs] : 0.0f;
        gt[rh] = ok ? gate[rs] : 0.0f;
#pragma unroll
        for (int c = 0; c < DKC; c++) qf[c][rh] = LD8(q, TIDX(q, blk.b, tok, hq) + 32 * c + 8 * tig, ok);
#pragma unroll
        for (int c = 0; c < DVC; c++)
          dof[c][rh] = LD8(dout, TIDX(dout, blk.b, tok, hq) + 32 * c + 8 * tig, ok);
      }
      float acc[DK / 8][4];
#pragma unroll
      for (int n = 0; n < DK / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
      for (int k0 = 0; k0 < nkeys; k0 += 16) {
        float s[2][4], dp[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
          const int key = k0 + 8 * nt + gid; /* RSWZ(key) = RSWZ(gid) */
          s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
          dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
          for (int c = 0; c < DKC; c++)
            mma_dims(s[nt], qf[c][0], qf[c][1],
                     kst[key * KVQ_KLD + ((4 * c + tig) ^ RSWZ(gid))], wx);
#pragma unroll
          for (int c = 0; c < DVC; c++)
            mma_dims(dp[nt], dof[c][0], dof[c][1], vst[KVQ_LD8(DV / 8, key, 4 * c + tig)], wx);
        }
        /* dS in place of S: element e is row gid + 8 (e >> 1), key k0 + 8nt + 2tig + (e & 1) */
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int rh = e >> 1, u = k0 + 8 * nt + 2 * tig + (e & 1);
            const float p =
                u < nkeys && c0 + u <= tpos[rh] ? exp2(s[nt][e] * sl2 - lse2[rh]) : 0.0f;
            s[nt][e] = p * (gt[rh] * dp[nt][e] - del[rh]);
          }
        }
        mma_rows_ldm(acc, pack_a(s[0], s[1]), kst + k0 * KVQ_KLD, KVQ_KLD, 0, DK, wx);
      }
      /* acc[n][e]: row gid + 8 (e >> 1), dim ACC_DIM(n) + (e & 1) */
      __global float *part = ws + part_off;
#pragma unroll
      for (int rh = 0; rh < 2; rh++) {
        if (tpos[rh] < 0) continue;
        __global float *pr = part + rrow[rh] * DK;
#pragma unroll
        for (int n = 0; n < DK / 8; n++) {
          pr[ACC_DIM(n)] = scale * acc[n][2 * rh];
          pr[ACC_DIM(n) + 1] = scale * acc[n][2 * rh + 1];
        }
      }
    }
  }
}
#endif
