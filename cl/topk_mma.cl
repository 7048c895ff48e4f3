/* Top-k block selection on the tensor cores (NVIDIA, cl/warp_ops.cl): the contract of
 * cl/topk.cl (semantics section 3) for G = 1, 2, 4, 8 or 16 query heads per kv head, q in
 * f16 or bf16, k_cmp in q's type or f32 (with bf16 q, split into two bf16 terms as in
 * cl/attend_mma.cl).
 *
 * A warp owns TPW consecutive query tokens of one sequence, TPW a power of two up to
 * 16 MT / G: its 16 MT rows (token u, head g at row u G + g) are MT mma tiles. The host lowers
 * TPW below 16 / G where local memory cannot hold NW x TPW x CAP importances (G = 1 at
 * T = 65536: 16 x 1024 floats are 64 KiB, NVIDIA gives 48); the rows from TPW G on are
 * then idle, treated like rows past the end of the sequence (zero q fragments, nothing
 * stored, no selection). The warp streams the candidate blocks in steps of KT:
 * S = Q K_cmp^T on the tensor cores (fragments loaded straight from global memory in
 * the permuted order cl/attend_mma.cl explains), p = exp2(s scale log2 e - lse log2 e)
 * for the blocks a row may pick (1 .. IC-2 of its token; IC, IC-1 and 0 are forced), and
 * the G rows of each token summed by butterfly shuffles over the lanes that hold them.
 * The importances land in local memory, one array of CAP slots per token.
 * Selection then runs per token, by the whole warp: the forced blocks first, then rounds
 * of a warp-wide argmax (importance descending, block index ascending on ties; NaN sorts
 * below every number, +inf is clamped as in cl/topk.cl), each winner marked taken. Lane l
 * owns the column of candidates 1 + l + 32 j and keeps its best in registers, found by one
 * scan per token; a round is a butterfly over the 32 column bests, then the winner's
 * column alone is rescanned by the whole warp (one local read a lane, a second
 * butterfly). Rescanning every candidate each round (up to 32 local reads a lane) cost
 * more where few warps fit an SM (G = 1, T = 65536; H100, 6.12 -> 5.44 ms, and 4-8 % less
 * at G = 4, 8). With two m-tiles (G = 16)
 * every round still rescans every candidate (COLSEL = 0): with the column scheme that
 * top-k went from 5.90 to 6.73 ms at T = 65536 (different H100s of one day; two dependent
 * butterflies a round cost more than 32 independent reads where more warps share an SM).
 * The n chosen blocks are written in ascending order, then -1 up to S.
 * With MT = 2 a warp holds two 16-row m-tiles (32 rows, up to 32 / G tokens) that share
 * every staged k_cmp fragment it reads: half the local-memory reads per mma, and twice the
 * tokens per staged tile (the host takes it for G = 16).
 * With LIST > 0 (the host's choice for G <= 4 where S - 3 <= 16) there are no importance
 * arrays: each lane keeps, per token it holds, the LIST best (topk_ahead) of the
 * candidates it owns in registers, sorted, and inserts a candidate that beats its worst
 * by one pass of compare-and-select over the list. After a token's G rows are summed,
 * the lanes holding the sum share its candidates (slot 2 nt + i of a step goes to the
 * lane whose gid % ND matches, ND = min(G, 8)), so every (token, candidate) has one
 * owner, and a lane meets its candidates in increasing index. Selection is then LIST
 * rounds of a butterfly argmax over the 4 ND lanes of a token, all of the warp's tokens
 * at once, each winner popped from its owner's list: the same set as the rounds over the
 * importances (the order is strict), in registers and in parallel, and with local memory
 * holding only the staged tile, every token of a warp fills its mma rows (TPW = 16 MT / G)
 * and more warps fit an SM. From G = 8 on a lane owns one slot a step: a whole insertion
 * for each, slower than the arrays there (src/topk.c has the numbers).
 * The NW warps of a group score consecutive tokens against the same candidates, so the
 * group stages each tile of k_cmp in local memory once (coalesced 16-byte loads; f32 split
 * into hi and lo there) and every warp reads its B fragments from it: without that every
 * warp fetched every tile (4x the L2 traffic). The selection is the warp's own
 * (warp_sync only).
 */
#ifndef NW
#define NW 4
#endif
#ifndef GQ
#define GQ 16 /* query heads per kv head: 1, 2, 4, 8 or 16 */
#endif
#ifndef MT
#define MT 1 /* 16-row m-tiles per warp: 2 halves the staged-tile reads per mma */
#endif
#define RH (2 * MT) /* rows per lane: gid + 8 x */
#ifndef TPW
#define TPW (16 * MT / GQ) /* query tokens per warp: a power of two, TPW GQ <= 16 MT */
#endif
#ifndef TOPK_BATCH /* 1: a staged tile's loads all issued before the barrier and the stores */
#define TOPK_BATCH 1
#endif
#ifndef KT
#define KT 32 /* candidates per step, a multiple of 16 */
#endif
#ifndef COLSEL /* selection rounds rescan only the winner's column (1) or every candidate */
#define COLSEL (MT == 1)
#endif
#ifndef LIST
#define LIST 0 /* > 0: lists of the LIST best candidates in registers (S - 3), no importances */
#endif
#ifndef CAP
#define CAP 1024 /* candidate slots per token: at least the longest sequence's block count */
#endif
#ifndef DK
#define DK 128
#endif
/* BS, the block size, comes with cl/attend_setup.cl (locate_seq), which precedes this. */
#ifndef Q_DT
#define Q_DT MMA_DT
#endif
#ifndef KC_DT
#define KC_DT MMA_DT
#endif
#define SMAX 128 /* CLNSA_MAX_BLOCK_COUNT */

#if GQ != 1 && GQ != 2 && GQ != 4 && GQ != 8 && GQ != 16
#error "topk_mma.cl: GQ must be 1, 2, 4, 8 or 16"
#endif
#if TPW < 1 || TPW * GQ > 16 * MT || (TPW & (TPW - 1)) || (MT != 1 && MT != 2)
#error "topk_mma.cl: MT is 1 or 2, TPW a power of two with TPW GQ <= 16 MT"
#endif
#if WG != 32 * NW || KT % 16 || DK % 32
#error "topk_mma.cl: WG = 32 NW, KT a multiple of 16, DK a multiple of 32"
#endif
#if KC_DT != MMA_DT && (KC_DT != 0 || MMA_DT != 2)
#error "topk_mma.cl: k_cmp is MMA_DT, or f32 with bf16 q"
#endif
#if LIST > 16
#error "topk_mma.cl: LIST lists live in registers: at most 16"
#endif
#if WARP_EMULATE && NW != 1
#error "topk_mma.cl: the warp emulation runs one warp per group"
#endif

#define KLD8 (DK / 8 + 4) /* staged row stride in 16-byte units: 64 bytes of bank padding */
#define DKC (DK / 32)
#define NT (KT / 8)
#define LD8(p, i) (*(__global const uint4 *)((p) + (i)))
#define KEY_TAKEN (-2.0f) /* below every importance and below NaN's -1 */
#define IMP_MAX 1.0e30f
#define KEY_NONE (-3.0f) /* an empty list slot: below KEY_TAKEN */
#define IDX_NONE 0x7fffffff
#if GQ == 16
#define ND 8      /* lanes (gids) holding each token's summed importances */
#define NL MT     /* lists a lane keeps: one per m-tile (its rows gid, gid + 8: one token) */
#else
#define ND GQ
#define NL (2 * MT) /* one per row of the lane: rows gid + 8 rh are distinct tokens */
#endif
#define LIST_RH(l) (GQ == 16 ? 2 * (l) : (l)) /* the lane's row (rh) of list l */

inline bool topk_ahead(float ka, int ia, float kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

/* Butterfly argmax over the warp's (key, index) pairs by topk_ahead: a strict order on
 * pairs (keys are never NaN here), so every lane ends with the same winner. */
inline void warp_best(float *key, int *idx, __local uint *wx) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float ok = shfl_xor(*key, off, wx);
    const int oi = as_int(shfl_xor(as_float(*idx), off, wx));
    if (topk_ahead(ok, oi, *key, *idx)) *key = ok, *idx = oi;
  }
}

/* The best (topk_ahead) of candidates c, c + step, ... below end of a token's importances;
 * the sentinel (below KEY_TAKEN and every importance) where there is none. */
inline void scan_best(__local const float *key, int c, int end, int step, float *bk, int *bc) {
  *bk = -3.0f;
  *bc = 0x7fffffff;
  for (; c < end; c += step) {
    const float kv = key[c];
    if (topk_ahead(kv, c, *bk, *bc)) *bk = kv, *bc = c;
  }
}

#if LIST
/* Inserts candidate (v, c) into a list sorted by topk_ahead (best first) if it beats the
 * last entry: entry j takes entry j - 1 where v is ahead of that, v where v lands there,
 * else stays; every index constant, so the list stays in registers. A lane inserts its
 * candidates in increasing c, so c is above every index in the list and topk_ahead
 * reduces to v > key (an equal key, with its lower index, stays ahead). */
inline void list_insert(float *lk, int *li, float v, int c) {
  if (!(v > lk[LIST - 1])) return;
  /* Selects as masks: a select between two list entries became a select of their
   * addresses (clang), which moved the whole list to the stack. */
  int at = -1; /* all ones where v is ahead of the entry now at j */
#pragma unroll
  for (int j = LIST - 1; j > 0; j--) {
    const int up = -(int)(v > lk[j - 1]);
    const int kj = (as_int(v) & at) | (as_int(lk[j]) & ~at), ij = (c & at) | (li[j] & ~at);
    lk[j] = as_float((as_int(lk[j - 1]) & up) | (kj & ~up));
    li[j] = (li[j - 1] & up) | (ij & ~up);
    at = up;
  }
  lk[0] = as_float((as_int(v) & at) | (as_int(lk[0]) & ~at));
  li[0] = (c & at) | (li[0] & ~at);
}

/* Drops a list's first entry (the round's winner). */
inline void list_pop(float *lk, int *li) {
#pragma unroll
  for (int j = 0; j < LIST - 1; j++) lk[j] = lk[j + 1], li[j] = li[j + 1];
  lk[LIST - 1] = KEY_NONE, li[LIST - 1] = IDX_NONE;
}
#endif

/* 8 k_cmp elements at element index i as bf16/f16 pairs; f32 keeps the rounding residue. */
typedef struct kpairs {
  uint4 hi;
#if KC_DT == 0
  uint4 lo;
#endif
} kpairs;

inline kpairs load_kc8(__global const STORAGE(KC_DT) *p, long i, bool ok) {
  kpairs r;
#if KC_DT == 0
  const float4 x0 = ok ? *(__global const float4 *)(p + i) : (float4)(0.0f);
  const float4 x1 = ok ? *(__global const float4 *)(p + i + 4) : (float4)(0.0f);
  const float x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  uint hi[4], lo[4];
#pragma unroll
  for (int j = 0; j < 4; j++) {
    hi[j] = pack2(x[2 * j], x[2 * j + 1]);
    lo[j] = pack2(x[2 * j] - as_float(hi[j] << 16), x[2 * j + 1] - as_float(hi[j] & 0xffff0000u));
  }
  r.hi = (uint4)(hi[0], hi[1], hi[2], hi[3]);
  r.lo = (uint4)(lo[0], lo[1], lo[2], lo[3]);
#else
  r.hi = ok ? LD8(p, i) : (uint4)(0u);
#endif
  return r;
}

/* Per-token facts every lane can compute: position, own block, how many to keep. */
typedef struct topk_token {
  bool valid;
  int row, ic, n, forced;
} topk_token;

/* live: the row holds one of the warp's tokens (false for the idle rows from TPW G on). */
inline topk_token token_facts(attend_seq sq, bool live, int t, int h, CITENSOR(bc), int has_counts,
                              int S) {
  topk_token k;
  k.valid = live && t < sq.tq;
  k.row = sq.q0 + min(t, max(sq.tq - 1, 0));
  const int p = t + sq.tk - sq.tq;
  k.ic = k.valid ? p / BS : 0;
  int count = S;
  if (k.valid && has_counts) count = clamp(bc[TIDX(bc, sq.b, k.row, h)], 0, S);
  k.n = min(count, k.ic + 1);
  k.forced = min(k.ic + 1, 3);
  return k;
}

/* Grid: (sequences * tiles * WG, H); tiles = ceil(tokens of the longest sequence / (NW TPW)). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void topk_mma_select(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(0, lse), CITENSOR(bc), ITENSOR(bi),
    int has_counts, int S, int block_size, int G, float scale, SEQ_ARGS, int tiles) {
#if LIST
  __local int chosen_l[NW * TPW * (LIST + 3)];
#else
  __local float imp_l[NW * TPW * CAP];
  __local int chosen_l[NW * SMAX];
#endif
  __local uint4 kst[KT * KLD8];
#if KC_DT == 0
  __local uint4 kst_lo[KT * KLD8];
#endif
  __local int chi_l[NW];
  WARP_SCRATCH(wx);
  (void)block_size, (void)G, (void)B, (void)NB, (void)HQ; /* BS and GQ are compiled in */
  const int lid = get_local_id(0), lane = lid & 31, warp = lid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int h = get_group_id(1), s = get_group_id(0) / tiles;
  const attend_seq sq = locate_seq(cu, nseq, TQ, TK, s);
  const int tok0 = ((get_group_id(0) - s * tiles) * NW + warp) * TPW;
#if LIST
  __local int *chosen = chosen_l + warp * TPW * (LIST + 3);
  float lk[NL][LIST];
  int li[NL][LIST];
#pragma unroll
  for (int l = 0; l < NL; l++) {
#pragma unroll
    for (int j = 0; j < LIST; j++) lk[l][j] = KEY_NONE, li[l][j] = IDX_NONE;
  }
#else
  __local float *imp = imp_l + warp * TPW * CAP;
  __local int *chosen = chosen_l + warp * SMAX;
#endif

  /* This lane's rows gid + 8 rh (m-tile rh / 2): their tokens, q fragments, lse in log2
   * units. Rows from TPW GQ on are idle (with TPW GQ <= 8, every row gid + 8). */
  topk_token tk[RH];
  float lse2[RH];
  uint4 qf[DKC][RH];
#pragma unroll
  for (int rh = 0; rh < RH; rh++) {
    const int r = gid + 8 * rh, g = r % GQ;
    const bool live = r < TPW * GQ;
    tk[rh] = token_facts(sq, live, tok0 + r / GQ, h, TPASS(bc), has_counts, S);
    const long qrow = TIDX(q, sq.b, tk[rh].row, h * GQ + g);
    lse2[rh] = tk[rh].valid ? lse[TIDX(lse, sq.b, tk[rh].row, h * GQ + g)] * M_LOG2E_F : 0.0f;
#pragma unroll
    for (int c = 0; c < DKC; c++)
      qf[c][rh] = tk[rh].valid ? LD8(q, qrow + 32 * c + 8 * tig) : (uint4)(0u);
  }
  /* Candidates the warp scores: 1 .. c_hi - 1, c_hi the largest IC - 1 of a token that
   * competes (forced < n < IC + 1). */
  int c_hi = 0;
  for (int u = 0; u < TPW; u++) {
    const topk_token k = token_facts(sq, true, tok0 + u, h, TPASS(bc), has_counts, S);
    if (k.valid && k.n > k.forced && k.n < k.ic + 1) c_hi = max(c_hi, k.ic - 1);
  }

  /* the group walks the largest of its warps' ranges */
  if (lane == 0) chi_l[warp] = c_hi;
  barrier(CLK_LOCAL_MEM_FENCE);
  int g_hi = 0;
  for (int w = 0; w < NW; w++) g_hi = max(g_hi, chi_l[w]);

  const float sl2 = scale * M_LOG2E_F;
  for (int c0 = 0; c0 < g_hi; c0 += KT) {
#if TOPK_BATCH
    /* the tile's loads all in flight before the barrier (candidates clamped into the
     * range, so each address is valid; those past it zeroed), then the stores */
    kpairs kw[(KT * (DK / 8) + WG - 1) / WG];
#pragma unroll
    for (int it = 0; it < (KT * (DK / 8) + WG - 1) / WG; it++) {
      const int i = min(lid + it * WG, KT * (DK / 8) - 1), j = i / (DK / 8), u = i - j * (DK / 8);
      kw[it] = load_kc8(kc, TIDX(kc, sq.b, sq.cstart + min(c0 + j, g_hi - 1), h) + 8 * u, true);
    }
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile's readers are done */
#pragma unroll
    for (int it = 0; it < (KT * (DK / 8) + WG - 1) / WG; it++) {
      const int i = lid + it * WG, j = i / (DK / 8), u = i - j * (DK / 8);
      const bool in = c0 + j < g_hi;
      if (i < KT * (DK / 8)) {
        kst[j * KLD8 + u] = in ? kw[it].hi : (uint4)(0u);
#if KC_DT == 0
        kst_lo[j * KLD8 + u] = in ? kw[it].lo : (uint4)(0u);
#endif
      }
    }
#else
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile's readers are done */
    for (int i = lid; i < KT * (DK / 8); i += WG) {
      const int j = i / (DK / 8), u = i - j * (DK / 8), c = c0 + j;
      const kpairs w = load_kc8(kc, TIDX(kc, sq.b, sq.cstart + min(c, g_hi - 1), h) + 8 * u,
                                c < g_hi);
      kst[j * KLD8 + u] = w.hi;
#if KC_DT == 0
      kst_lo[j * KLD8 + u] = w.lo;
#endif
    }
#endif /* TOPK_BATCH */
    barrier(CLK_LOCAL_MEM_FENCE);
    float sc[MT][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
        sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.0f;
#pragma unroll
      for (int cc = 0; cc < DKC; cc++) {
        kpairs w;
        w.hi = kst[(8 * nt + gid) * KLD8 + 4 * cc + tig];
#if KC_DT == 0
        w.lo = kst_lo[(8 * nt + gid) * KLD8 + 4 * cc + tig];
#endif
#pragma unroll
        for (int mt = 0; mt < MT; mt++) { /* each staged fragment serves the MT m-tiles */
          float *st = sc[mt][nt];
          const uint4 a = qf[cc][2 * mt], b = qf[cc][2 * mt + 1];
          mma_16816(st, a.x, b.x, a.y, b.y, w.hi.x, w.hi.y, wx);
          mma_16816(st, a.z, b.z, a.w, b.w, w.hi.z, w.hi.w, wx);
#if KC_DT == 0
          mma_16816(st, a.x, b.x, a.y, b.y, w.lo.x, w.lo.y, wx);
          mma_16816(st, a.z, b.z, a.w, b.w, w.lo.z, w.lo.w, wx);
#endif
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#if LIST
      float pv[NT][4]; /* the step's importances of the m-tile, after the sum over G rows */
#endif
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        float p[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int rh = 2 * mt + (i >> 1), c = c0 + 8 * nt + 2 * tig + (i & 1);
          const bool in = tk[rh].valid && c >= 1 && c < tk[rh].ic - 1;
          p[i] = in ? exp2(sc[mt][nt][i] * sl2 - lse2[rh]) : 0.0f;
        }
        /* sum over the G rows of each token: lanes whose gid differs in its low bits */
#if GQ == 16
        p[0] += p[2], p[1] += p[3];
#pragma unroll
        for (int m = 4; m <= 16; m <<= 1) {
          p[0] += shfl_xor(p[0], m, wx);
          p[1] += shfl_xor(p[1], m, wx);
        }
#else
#pragma unroll
        for (int m = 4; m < 4 * GQ; m <<= 1) {
#pragma unroll
          for (int i = 0; i < 4; i++) p[i] += shfl_xor(p[i], m, wx);
        }
#endif
#if LIST
#pragma unroll
        for (int i = 0; i < 4; i++) pv[nt][i] = p[i];
#else
        if (gid % GQ == 0) {
#pragma unroll
          for (int i = 0; i < (GQ == 16 ? 2 : 4); i++) {
            const int rh = 2 * mt + (i >> 1), c = c0 + 8 * nt + 2 * tig + (i & 1);
            if (c >= 1 && c < tk[rh].ic - 1 && tk[rh].valid)
              imp[((gid + 8 * rh) / GQ) * CAP + c] = isnan(p[i]) ? -1.0f : fmin(p[i], IMP_MAX);
          }
        }
#endif
      }
#if LIST
      /* Slot j = 2 nt + (i & 1) of a token (candidate c0 + 8 nt + 2 tig + (i & 1)) belongs
       * to the lane whose gid % ND is j % ND: each lane inserts only its own slots, one
       * insertion per slot it owns (2 NT / ND a row, or 1), in increasing candidate order. */
#pragma unroll
      for (int hf = 0; hf < (GQ == 16 ? 1 : 2); hf++) {
        const int rh = 2 * mt + hf, l = GQ == 16 ? mt : rh;
#pragma unroll
        for (int sl = 0; sl < (2 * NT + ND - 1) / ND; sl++) {
          const int j = sl * ND + gid % ND, c = c0 + 8 * (j >> 1) + 2 * tig + (j & 1);
          float v = 0.0f;
#pragma unroll
          for (int jj = 0; jj < 2 * NT; jj++)
            if (jj == j) v = pv[jj >> 1][2 * hf + (jj & 1)];
          if (j < 2 * NT && c >= 1 && c < tk[rh].ic - 1 && tk[rh].valid)
            list_insert(lk[l], li[l], isnan(v) ? -1.0f : fmin(v, IMP_MAX), c);
        }
      }
#endif
    }
  }
  warp_sync(wx);

#if LIST
  /* Selection: LIST rounds per list, every token of the warp at once. A round's winner is
   * the best head over the token's 4 ND lanes (masks below 4 ND keep to them); its owner
   * pops it. A token records the rounds it needs (n - forced) after its forced blocks. */
#pragma unroll
  for (int l = 0; l < NL; l++) {
    const topk_token k = tk[LIST_RH(l)];
    const int u = (gid + 8 * LIST_RH(l)) / GQ, m = min(k.n, k.forced);
    const bool leader = k.valid && tig == 0 && gid % ND == 0 && k.n < k.ic + 1;
    __local int *ch = chosen + u * (LIST + 3);
    if (leader)
      for (int f = 0; f < m; f++) ch[f] = f == 0 ? k.ic : f == 1 ? k.ic - 1 : 0;
    for (int round = 0; round < LIST; round++) {
      float wk = lk[l][0];
      int wc = li[l][0];
#pragma unroll
      for (int off = 1; off < 4 * ND; off <<= 1) {
        const float ok = shfl_xor(wk, off, wx);
        const int oi = as_int(shfl_xor(as_float(wc), off, wx));
        if (topk_ahead(ok, oi, wk, wc)) wk = ok, wc = oi;
      }
      if (li[l][0] == wc) list_pop(lk[l], li[l]);
      if (leader && m + round < k.n) ch[m + round] = wc;
    }
  }
  warp_sync(wx);
#endif

  /* Selection, one token at a time (uniform over the warp). */
  for (int u = 0; u < TPW; u++) {
    const topk_token k = token_facts(sq, true, tok0 + u, h, TPASS(bc), has_counts, S);
    if (!k.valid) continue;
    __global int *out = bi + TIDX(bi, sq.b, k.row, h);
    if (k.n == k.ic + 1) { /* every block is kept */
      for (int j = lane; j < S; j += 32) out[j] = j < k.n ? j : -1;
      continue;
    }
#if LIST
    __local const int *chosen_u = chosen + u * (LIST + 3);
#else
    __local int *chosen_u = chosen;
    const int m = min(k.n, k.forced);
    if (lane < m) chosen[lane] = lane == 0 ? k.ic : lane == 1 ? k.ic - 1 : 0;
    __local float *key = imp + u * CAP;
#if COLSEL
    /* Column l = lane holds candidates 1 + l + 32 j; (bk, bc_) is its best, the sentinel
     * (below KEY_TAKEN and every importance) where the column is empty. A round takes the
     * best of the 32 column bests, which is the best of all candidates; only the winner's
     * column changes, so only it is scanned again. Rounds never run out of untaken
     * candidates (k.n - forced < IC - 2), so a taken key never wins. */
    if (m < k.n) {
      float bk;
      int bc_;
      scan_best(key, 1 + lane, k.ic - 1, 32, &bk, &bc_);
      for (int round = m; round < k.n; round++) {
        float wk = bk;
        int wc = bc_;
        warp_best(&wk, &wc, wx);
        if (lane == 0) {
          chosen[round] = wc;
          key[wc] = KEY_TAKEN;
        }
        warp_sync(wx); /* the rescan below must read KEY_TAKEN at wc */
        /* Column col again, lane j reading its candidate 1 + col + 32 j (and every 32nd j
         * after, for CAP > 1024); its owner keeps the new best. */
        const int col = (wc - 1) & 31;
        float ck;
        int cc;
        scan_best(key, 1 + col + 32 * lane, k.ic - 1, 32 * 32, &ck, &cc);
        warp_best(&ck, &cc, wx);
        if (lane == col) bk = ck, bc_ = cc;
      }
    }
#else /* every round scans every candidate */
    for (int round = m; round < k.n; round++) {
      float bk;
      int bc_;
      scan_best(key, 1 + lane, k.ic - 1, 32, &bk, &bc_);
      warp_best(&bk, &bc_, wx);
      if (lane == 0) {
        chosen[round] = bc_;
        key[bc_] = KEY_TAKEN;
      }
      warp_sync(wx);
    }
#endif /* COLSEL */
    warp_sync(wx);
#endif /* LIST */
    for (int i = lane; i < k.n; i += 32) { /* ascending order */
      const int c = chosen_u[i];
      int pos = 0;
      for (int t = 0; t < k.n; t++) pos += chosen_u[t] < c;
      out[pos] = c;
    }
    for (int j = k.n + lane; j < S; j += 32) out[j] = -1;
    warp_sync(wx);
  }
}
