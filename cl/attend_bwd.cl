/* Backward of the three attention branches (semantics section 7), flash-style: the
 * probabilities are recomputed from the forward's lse, never stored.
 *
 * For one branch with gate g (1 for an absent g_slc) and rows r = (token, query head):
 *   dO_r = g_r do_r,  delta_r = dO_r . o_r          (both from cl/grad_gates.cl)
 *   P_rj = exp(scale q_r.k_j - lse_r),  dS_rj = P_rj (dO_r.v_j - delta_r)
 *   dq_r += scale sum_j dS_rj k_j,  dk_j += scale sum_r dS_rj q_r,  dv_j += sum_r P_rj dO_r
 *
 * Two families of kernels walk tiles staged in local memory:
 *  - bwd_dq_*: a work-group owns QROWS rows of one kv head and walks their key set in
 *    tiles of QKEYS keys; each work-item owns fixed elements of dq (registers). The
 *    selected branch always runs and runs first: its kernel writes the dq accumulator,
 *    the other branches add to it.
 *  - bwd_dkdv_*: a work-group owns KKEYS keys of one kv head, keeps them in local memory,
 *    and walks rows that see them in increasing token order, KROWS rows at a time; each
 *    work-item owns fixed elements of dk and dv (registers). To keep work-groups many and
 *    even, the compressed kernel covers one chunk of the tokens (partial sums per chunk)
 *    and the selected kernel one chunk of the tokens that selected the block (partial
 *    sums per chunk slot, see cl/select_mask.cl); the window kernel covers all its rows.
 * Every sum runs in an order fixed by the indices alone, each output element has one
 * writer, and partial sums are added up later in a fixed order (cl/grad_finalize.cl):
 * results are bit-identical from run to run with no atomics.
 *
 * Rows of a tile are (token, g) pairs flattened as f = token * G + g (through a token list
 * in bwd_dkdv_selected), so tiles fill whatever G is. Row r accepts key positions in
 * [lo_r, hi_r]; key slot j has a position kpos_j (token position in its sequence, or block
 * number for compressed keys), INT_MAX for an empty slot:
 *   selected [0, p]   compressed [0, (p+1)/BS - 1]   window [p-W+1, p]
 * Backward exists only for TQ = TK, so a query's position p is its token index and q, k
 * share token rows.
 *
 * Scratch: one f32 cl_mem addressed by element offsets (layout in src/backward.c).
 */
#ifndef Q_DT
#define Q_DT 0
#endif
#ifndef K_DT
#define K_DT 0
#endif
#ifndef V_DT
#define V_DT 0
#endif
#ifndef DO_DT
#define DO_DT 0
#endif
#ifndef KC_DT /* the forward's k_cmp, v_cmp: f32, or k's and v's dtypes (CLNSA_FLAG_CMP_16BIT) */
#define KC_DT 0
#endif
#ifndef VC_DT
#define VC_DT 0
#endif
#ifndef DK
#define DK 64
#endif
#ifndef DV
#define DV 64
#endif
#ifndef THREADS
#define THREADS 128
#endif
#ifndef QROWS /* dq kernels: rows per work-group */
#define QROWS 16
#endif
#ifndef QKEYS /* dq kernels: keys per tile */
#define QKEYS 16
#endif
#ifndef DQ_TPG /* selected dq: tokens a work-group packs (G < QROWS); DQ_UCAP = DQ_TPG S */
#define DQ_TPG 1
#endif
#ifndef KROWS /* dk/dv kernels: rows per tile */
#define KROWS 16
#endif
#ifndef KKEYS /* dk/dv kernels: keys per work-group */
#define KKEYS 16
#endif
#ifndef MASK_WORDS /* bwd_dkdv_selected: selection-mask words expanded at once */
#define MASK_WORDS 16
#endif
#define MAX_S 128 /* CLNSA_MAX_BLOCK_COUNT */
#if THREADS < MASK_WORDS || THREADS % QKEYS != 0 || THREADS % KKEYS != 0
#error "THREADS must be at least MASK_WORDS and a multiple of QKEYS and KKEYS"
#endif

#define MODE_SLC 0
#define MODE_CMP 1
#define MODE_SWA 2

/* Odd row strides keep the column reads of neighbouring key slots in different banks. */
#define QST (DK + 1)
#define OST (DV + 1)
#define CEIL_DIV(a, b) (((a) + (b)-1) / (b))
#define DQ_PER CEIL_DIV(QROWS * DK, THREADS)
#define DK_PER CEIL_DIV(KKEYS * DK, THREADS)
#define DV_PER CEIL_DIV(KKEYS * DV, THREADS)
#define TILE_FLOATS(R, K) ((R) * (QST + OST) + (K) * (QST + OST) + 2 * (R) * ((K) + 1) + 3 * (R))
#define TILE_INTS(R, K) (5 * (R) + 2 * (K))
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2

/* dst[r * ST + d] = VALUE (an expression of r and d) for the n elements e = r * D + d of
 * a tile, neighbouring work-items on neighbouring d (coalesced). (Issuing several loads
 * per work-item before storing was measured slower on an H200.) */
#define TILE_COPY(n, D, ST, dst, VALUE)                                     \
  for (int e_ = get_local_id(0); e_ < (n); e_ += THREADS) {                 \
    const int r = e_ / (D), d = e_ - r * (D);                               \
    (dst)[r * (ST) + d] = (VALUE);                                          \
  }

/* One sequence of the batch: batch b, and its first token row and compressed row on the
 * token axis (0 unless packed). */
typedef struct seqspan {
  int b, t0, c0, len, nb;
} seqspan;

inline seqspan seq_span(__global const int *cu, int nseq, int TQ, int NB, int s) {
  seqspan q;
  if (nseq == 0) {
    q.b = s;
    q.t0 = q.c0 = 0;
    q.len = TQ;
    q.nb = NB;
  } else {
    __global const int *cuc = cu + 2 * (nseq + 1);
    q.b = 0;
    q.t0 = cu[s];
    q.c0 = cuc[s];
    q.len = cu[s + 1] - cu[s];
    q.nb = cuc[s + 1] - cuc[s];
  }
  return q;
}

/* The local tiles of one work-group: rows (q, gated dO, lse, delta, gate, mask range,
 * token row, query head, token offset ru in the group) and keys (k, v, position, and
 * kmsk: the tokens whose selection holds the key, bit ru; all ones but in the packed
 * selected dq), and the P and dS of rows x keys. */
typedef struct tile {
  __local float *q, *o, *k, *v, *p, *ds, *lse, *del, *g;
  __local int *rt, *rh, *lo, *hi, *ru, *kpos;
  __local uint *kmsk;
  int pst; /* row stride of p and ds: key capacity + 1 */
} tile;

inline tile tile_carve(__local float *f, __local int *i, int R, int K) {
  tile t;
  t.q = f;
  t.o = t.q + R * QST;
  t.k = t.o + R * OST;
  t.v = t.k + K * QST;
  t.p = t.v + K * OST;
  t.ds = t.p + R * (K + 1);
  t.lse = t.ds + R * (K + 1);
  t.del = t.lse + R;
  t.g = t.del + R;
  t.rt = i;
  t.rh = t.rt + R;
  t.lo = t.rh + R;
  t.hi = t.lo + R;
  t.ru = t.hi + R;
  t.kpos = t.ru + R;
  t.kmsk = (__local uint *)(t.kpos + K);
  t.pst = K + 1;
  return t;
}

/* Key positions row p of a branch may attend to (an empty range for p < 0). */
inline int2 row_range(int mode, int p, int W, int BS) {
  if (p < 0) return (int2)(1, 0);
  if (mode == MODE_CMP) return (int2)(0, (p + 1) / BS - 1);
  if (mode == MODE_SWA) return (int2)(p - W + 1, p);
  return (int2)(0, p);
}

/* Loads rows f0 .. f0+R-1 (those < fend) of kv head h: row f is token f / G (through
 * list[] when use_list) and query head h*G + f % G. Row facts first (one division per
 * row), then q and the gated dO, coalesced along d. gate and delta are the branch's f32
 * scratch rows [B*TQ*HQ]. Starts and ends with a barrier. */
inline void tile_load_rows(tile t, int R, long f0, long fend, int use_list,
                           __local const int *list, seqspan sp, int h, int G, int mode, int W,
                           int BS, int TQ, int HQ, CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout),
                           CTENSOR(0, lse), __global const float *gate,
                           __global const float *delta) {
  const int lid = get_local_id(0), b = sp.b;
  barrier(CLK_LOCAL_MEM_FENCE); /* the previous rows consumed */
  for (int r = lid; r < R; r += THREADS) {
    const long f = f0 + r;
    const int i = f < fend ? (use_list ? list[f / G] : (int)(f / G)) : -1;
    const int hq = h * G + (int)(f % G);
    const int2 range = row_range(mode, i, W, BS);
    const long rs = ((long)b * TQ + sp.t0 + i) * HQ + hq;
    t.rt[r] = i < 0 ? -1 : sp.t0 + i;
    t.rh[r] = hq;
    t.ru[r] = min((int)(f / G - f0 / G), 31);
    t.lo[r] = range.x;
    t.hi[r] = range.y;
    t.lse[r] = i < 0 ? 0.0f : lse[TIDX(lse, b, sp.t0 + i, hq)];
    t.del[r] = i < 0 ? 0.0f : delta[rs];
    t.g[r] = i < 0 ? 0.0f : gate[rs];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  TILE_COPY(R * DK, DK, QST, t.q,
            t.rt[r] < 0 ? 0.0f : LOAD(Q_DT, q, TIDX(q, b, t.rt[r], t.rh[r]) + d))
  TILE_COPY(R * DV, DV, OST, t.o,
            t.rt[r] < 0 ? 0.0f : t.g[r] * LOAD(DO_DT, dout, TIDX(dout, b, t.rt[r], t.rh[r]) + d))
  barrier(CLK_LOCAL_MEM_FENCE);
}

/* Position of key slot u of a key walk: u itself, or with use_list the tokens of the
 * listed blocks back to back. Positions past kmax are empty slots. use_list == 2: the
 * list is a union of several tokens' blocks, bmsk[] says whose (block_union). */
inline int key_pos(int u, int use_list, __local const int *blist, int BS, int kmax) {
  const int pos = use_list ? blist[u / BS] * BS + u % BS : u;
  return pos <= kmax ? pos : INT_MAX;
}

/* Loads key slots u0 .. u0+n-1 of kv head h (rows kbase + position of k and v). */
#define DEFINE_LOAD_KEYS(NAME, KDT, VDT)                                                      \
  inline void NAME(tile t, int u0, int n, int use_list, __local const int *blist,            \
                   __local const uint *bmsk, int BS, int kmax, int b, int kbase, int h,      \
                   CTENSOR(KDT, k), CTENSOR(VDT, v)) {                                        \
    for (int j = get_local_id(0); j < n; j += THREADS) {                                      \
      t.kpos[j] = key_pos(u0 + j, use_list, blist, BS, kmax);                                 \
      t.kmsk[j] = use_list == 2 ? bmsk[(u0 + j) / BS] : ~0u;                                  \
    }                                                                                         \
    barrier(CLK_LOCAL_MEM_FENCE);                                                             \
    TILE_COPY(n * DK, DK, QST, t.k,                                                           \
              t.kpos[r] == INT_MAX ? 0.0f : LOAD(KDT, k, TIDX(k, b, kbase + t.kpos[r], h) + d)) \
    TILE_COPY(n * DV, DV, OST, t.v,                                                           \
              t.kpos[r] == INT_MAX ? 0.0f : LOAD(VDT, v, TIDX(v, b, kbase + t.kpos[r], h) + d)) \
    barrier(CLK_LOCAL_MEM_FENCE);                                                             \
  }
DEFINE_LOAD_KEYS(tile_load_keys, K_DT, V_DT)
DEFINE_LOAD_KEYS(tile_load_keys_cmp, KC_DT, VC_DT)

/* Pairs (row, key) of a tile per work-item: work-item lid takes key lid % K and rows
 * lid / K + i * (THREADS / K), so each key element it reads serves all its rows. */
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
#define PAIRS_MAX CEIL_DIV(MAX2(QROWS * QKEYS, KROWS * KKEYS), THREADS)

/* P and dS of the tile's nr x nk (row, key) pairs (K: key capacity); masked pairs get 0. */
inline void tile_scores(tile t, int K, float scale, int nr, int nk) {
  const int lid = get_local_id(0), j = lid % K, r0 = lid / K, rstep = THREADS / K;
  if (j >= nk) return;
  float s[PAIRS_MAX], dp[PAIRS_MAX];
  for (int i = 0; i < PAIRS_MAX; i++) s[i] = dp[i] = 0.0f;
  for (int d = 0; d < DK; d++) {
    const float x = t.k[j * QST + d];
    for (int i = 0; i < PAIRS_MAX; i++)
      if (r0 + i * rstep < nr) s[i] += t.q[(r0 + i * rstep) * QST + d] * x;
  }
  for (int d = 0; d < DV; d++) {
    const float x = t.v[j * OST + d];
    for (int i = 0; i < PAIRS_MAX; i++)
      if (r0 + i * rstep < nr) dp[i] += t.o[(r0 + i * rstep) * OST + d] * x;
  }
  const int pos = t.kpos[j];
  for (int i = 0; i < PAIRS_MAX; i++) {
    const int r = r0 + i * rstep;
    if (r >= nr) break;
    float p = 0.0f, ds = 0.0f;
    if (pos >= t.lo[r] && pos <= t.hi[r] && ((t.kmsk[j] >> t.ru[r]) & 1u)) {
      p = exp(scale * s[i] - t.lse[r]);
      ds = p * (dp[i] - t.del[r]);
    }
    t.p[r * t.pst + j] = p;
    t.ds[r * t.pst + j] = ds;
  }
}

/* acc[i] (row, d) += dS * k over the tile's keys, in increasing slot order (rows < nr). */
inline void tile_dq(tile t, int nr, int nk, float *acc) {
  const int lid = get_local_id(0);
  for (int j = 0; j < nk; j++)
    for (int i = 0; i < DQ_PER; i++) {
      const int e = lid + i * THREADS, r = e / DK, d = e - r * DK;
      if (e < QROWS * DK && r < nr) acc[i] += t.ds[r * t.pst + j] * t.k[j * QST + d];
    }
}

/* ak[i] (key, d) += dS * q over the tile's nr rows; av likewise with P * dO. */
inline void tile_dkdv(tile t, int nr, float *ak, float *av) {
  const int lid = get_local_id(0);
  for (int r = 0; r < nr; r++) {
    for (int i = 0; i < DK_PER; i++) {
      const int e = lid + i * THREADS, j = e / DK, d = e - j * DK;
      if (e < KKEYS * DK) ak[i] += t.ds[r * t.pst + j] * t.q[r * QST + d];
    }
    for (int i = 0; i < DV_PER; i++) {
      const int e = lid + i * THREADS, j = e / DV, d = e - j * DV;
      if (e < KKEYS * DV) av[i] += t.p[r * t.pst + j] * t.o[r * OST + d];
    }
  }
}

/* ---------------------------------------------------------------- dq */

/* Writes (selected) or adds (other branches) scale * acc to the dq accumulator rows. */
inline void dq_store(tile t, int mode, int b, int TQ, int HQ, float scale,
                     __global float *dq, const float *acc) {
  for (int i = 0; i < DQ_PER; i++) {
    const int e = get_local_id(0) + i * THREADS, r = e / DK, d = e - r * DK;
    if (e < QROWS * DK && t.rt[r] >= 0) {
      const long at = (((long)b * TQ + t.rt[r]) * HQ + t.rh[r]) * DK + d;
      dq[at] = (mode == MODE_SLC ? 0.0f : dq[at]) + scale * acc[i];
    }
  }
}

/* The dq walk of one work-group: rows [f0, fend) are loaded, then key slots [0, nkeys)
 * stream through in tiles. Keys are compressed rows (MODE_CMP) or tokens. */
inline void dq_walk(tile t, int mode, long f0, long fend, seqspan sp, int h, int G,
                    int nkeys, int kfirst, int kmax, int use_list, __local const int *blist,
                    __local const uint *bmsk, float scale, int W, int BS, int TQ, int HQ,
                    CTENSOR(Q_DT, q),
                    CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc),
                    CTENSOR(DO_DT, dout), CTENSOR(0, lse), __global const float *gate,
                    __global const float *delta, __global float *dq) {
  const int nr = (int)min((long)QROWS, fend - f0);
  float acc[DQ_PER];
  for (int i = 0; i < DQ_PER; i++) acc[i] = 0.0f;
  tile_load_rows(t, QROWS, f0, fend, 0, blist, sp, h, G, mode, W, BS, TQ, HQ, TPASS(q),
                 TPASS(dout), TPASS(lse), gate, delta);
  for (int u0 = 0; u0 < nkeys; u0 += QKEYS) {
    const int nk = min(QKEYS, nkeys - u0);
    if (mode == MODE_CMP)
      tile_load_keys_cmp(t, kfirst + u0, nk, 0, blist, bmsk, BS, kmax, sp.b, sp.c0, h, TPASS(kc),
                         TPASS(vc));
    else
      tile_load_keys(t, kfirst + u0, nk, use_list, blist, bmsk, BS, kmax, sp.b, sp.t0, h, TPASS(k),
                     TPASS(v));
    tile_scores(t, QKEYS, scale, nr, nk);
    barrier(CLK_LOCAL_MEM_FENCE);
    tile_dq(t, nr, nk, acc);
    barrier(CLK_LOCAL_MEM_FENCE); /* the key tile consumed */
  }
  dq_store(t, mode, sp.b, TQ, HQ, scale, dq, acc);
}

/* Compressed and window branches: a work-group owns QROWS consecutive flattened rows of
 * one sequence and walks the union of their key ranges. */
inline void dq_contiguous(int mode, __local float *lf, __local int *li, float scale, int W,
                          int BS, CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v),
                          CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc), CTENSOR(DO_DT, dout),
                          CTENSOR(0, lse), __global const float *gate,
                          __global const float *delta, __global float *dq, SEQ_ARGS) {
  const seqspan sp = seq_span(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H;
  const long f0 = (long)get_group_id(0) * QROWS, fend = (long)sp.len * G;
  if (f0 >= fend) return;
  const int ilo = (int)(f0 / G), ihi = (int)((min(f0 + QROWS, fend) - 1) / G);
  int kfirst = 0, kmax = (ihi + 1) / BS - 1; /* compressed: blocks of the last row */
  if (mode == MODE_SWA) {
    kfirst = (int)max(0L, (long)ilo - W + 1);
    kmax = ihi;
  }
  const tile t = tile_carve(lf, li, QROWS, QKEYS);
  dq_walk(t, mode, f0, fend, sp, h, G, kmax - kfirst + 1, kfirst, kmax, 0, li,
          (__local const uint *)li, scale, W, BS, TQ, HQ, TPASS(q), TPASS(k), TPASS(v), TPASS(kc),
          TPASS(vc), TPASS(dout), TPASS(lse), gate, delta, dq);
}

__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dq_compressed(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dq_off, float scale, int BS,
    SEQ_ARGS) {
  __local float lf[TILE_FLOATS(QROWS, QKEYS)];
  __local int li[TILE_INTS(QROWS, QKEYS)];
  dq_contiguous(MODE_CMP, lf, li, scale, 0, BS, TPASS(q), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                TPASS(kc), TPASS(vc), TPASS(dout), TPASS(lse), ws + gate_off, ws + delta_off,
                ws + dq_off, SEQ_PASS);
}

__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dq_window(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), __global float *ws, long gate_off, long delta_off, long dq_off,
    float scale, int W, int BS, SEQ_ARGS) {
  __local float lf[TILE_FLOATS(QROWS, QKEYS)];
  __local int li[TILE_INTS(QROWS, QKEYS)];
  dq_contiguous(MODE_SWA, lf, li, scale, W, BS, TPASS(q), TPASS(k), TPASS(v), 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, TPASS(dout), TPASS(lse), ws + gate_off, ws + delta_off,
                ws + dq_off, SEQ_PASS);
}

/* Selected branch: a work-group owns QROWS of the G query heads of one token and walks the
 * tokens of the token's selected blocks; with DQ_TPG > 1 (G small: DQ_TPG G <= QROWS) it
 * owns all heads of DQ_TPG consecutive tokens and walks the union of their blocks
 * (cl/block_union.cl), each row masked to its own token's. */
__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dq_selected(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), CITENSOR(bi), __global float *ws, long gate_off, long delta_off,
    long dq_off, float scale, int S, int BS, SEQ_ARGS) {
  __local float lf[TILE_FLOATS(QROWS, QKEYS)];
  __local int li[TILE_INTS(QROWS, QKEYS)];
#if DQ_TPG > 1
  __local int ucand[DQ_UCAP], ulist[DQ_UCAP];
  __local uint utmp[DQ_UCAP], umsk[DQ_UCAP];
  const seqspan sp = seq_span(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, tok0 = get_group_id(0) * DQ_TPG;
  if (tok0 >= sp.len) return;
  const int ntok = min(DQ_TPG, sp.len - tok0);
  const int nblk = block_union(TPASS(bi), sp.b, sp.t0 + tok0, ntok, tok0, h, S, BS, THREADS,
                               ulist, umsk, ucand, utmp);
  const tile t = tile_carve(lf, li, QROWS, QKEYS);
  dq_walk(t, MODE_SLC, (long)tok0 * G, (long)(tok0 + ntok) * G, sp, h, G, nblk * BS, 0,
          tok0 + ntok - 1, 2, ulist, umsk, scale, 0, BS, TQ, HQ, TPASS(q), TPASS(k), TPASS(v),
          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TPASS(dout), TPASS(lse), ws + gate_off, ws + delta_off,
          ws + dq_off);
#else
  __local int sel[3 * MAX_S];
  const seqspan sp = seq_span(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, chunks = (G + QROWS - 1) / QROWS;
  const int i = get_group_id(0) / chunks, g0 = (get_group_id(0) % chunks) * QROWS;
  if (i >= sp.len) return;
  const int nblk = selection_rows(bi + TIDX(bi, sp.b, sp.t0 + i, h), S, i / BS, sel,
                                  sel + MAX_S, sel + 2 * MAX_S, THREADS);
  const tile t = tile_carve(lf, li, QROWS, QKEYS);
  dq_walk(t, MODE_SLC, (long)i * G + g0, (long)(i + 1) * G, sp, h, G, nblk * BS, 0, i, 1,
          sel + 2 * MAX_S, (__local const uint *)sel, scale, 0, BS, TQ, HQ, TPASS(q), TPASS(k),
          TPASS(v), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TPASS(dout), TPASS(lse), ws + gate_off,
          ws + delta_off, ws + dq_off);
#endif
}

/* ---------------------------------------------------------------- dk, dv */

/* Adds one tile of rows [f0, min(f0+KROWS, fend)) to the key accumulators. */
inline void dkdv_step(tile t, int mode, long f0, long fend, int use_list,
                      __local const int *list, seqspan sp, int h, int G, int nk, float scale,
                      int W, int BS, int TQ, int HQ, CTENSOR(Q_DT, q), CTENSOR(DO_DT, dout),
                      CTENSOR(0, lse), __global const float *gate, __global const float *delta,
                      float *ak, float *av) {
  tile_load_rows(t, KROWS, f0, fend, use_list, list, sp, h, G, mode, W, BS, TQ, HQ, TPASS(q),
                 TPASS(dout), TPASS(lse), gate, delta);
  const int nr = (int)min((long)KROWS, fend - f0);
  tile_scores(t, KKEYS, scale, nr, nk);
  barrier(CLK_LOCAL_MEM_FENCE);
  tile_dkdv(t, nr, ak, av);
}

/* Writes scale * ak and av to key slots 0 .. nk-1 at rows base + slot of [*, H, D] f32
 * arrays (accumulators or partial sums). */
inline void dkdv_store(int nk, long base, int h, int H, float scale, __global float *dk,
                       __global float *dv, const float *ak, const float *av) {
  const int lid = get_local_id(0);
  for (int i = 0; i < DK_PER; i++) {
    const int e = lid + i * THREADS, j = e / DK, d = e - j * DK;
    if (j < nk) dk[((base + j) * H + h) * DK + d] = scale * ak[i];
  }
  for (int i = 0; i < DV_PER; i++) {
    const int e = lid + i * THREADS, j = e / DV, d = e - j * DV;
    if (j < nk) dv[((base + j) * H + h) * DV + d] = av[i];
  }
}

/* Compressed and window branches: a work-group owns KKEYS consecutive keys (blocks or
 * tokens) of one sequence and walks the rows of the tokens that can see any of them,
 * restricted to tokens [chunk * ctok, (chunk + 1) * ctok). Returns the key count. */
inline int dkdv_contiguous(int mode, int u0, int chunk, int ctok, __local float *lf,
                           __local int *li, float scale, int W, int BS, CTENSOR(Q_DT, q),
                           CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc),
                           CTENSOR(DO_DT, dout), CTENSOR(0, lse), __global const float *gate,
                           __global const float *delta, seqspan sp, int h, int G, int TQ,
                           int HQ, float *ak, float *av) {
  const int nkeys = mode == MODE_CMP ? sp.nb : sp.len;
  if (u0 >= nkeys) return 0;
  const int nk = min(KKEYS, nkeys - u0);
  /* Tokens that see a key of the tile: window [u0, last + W - 1], compressed from the
   * end of the first block on. */
  long ifirst = u0, ilast = min((long)u0 + nk - 1 + W - 1, (long)sp.len - 1);
  if (mode == MODE_CMP) {
    ifirst = (long)(u0 + 1) * BS - 1;
    ilast = sp.len - 1;
  }
  ifirst = max(ifirst, (long)chunk * ctok);
  ilast = min(ilast, (long)(chunk + 1) * ctok - 1);
  const tile t = tile_carve(lf, li, KROWS, KKEYS);
  if (mode == MODE_CMP)
    tile_load_keys_cmp(t, u0, nk, 0, li, (__local const uint *)li, BS, nkeys - 1, sp.b, sp.c0, h,
                       TPASS(kc), TPASS(vc));
  else
    tile_load_keys(t, u0, nk, 0, li, (__local const uint *)li, BS, nkeys - 1, sp.b, sp.t0, h,
                   TPASS(k), TPASS(v));
  const long fend = (ilast + 1) * G;
  for (long f0 = ifirst * G; f0 < fend; f0 += KROWS)
    dkdv_step(t, mode, f0, fend, 0, li, sp, h, G, nk, scale, W, BS, TQ, HQ, TPASS(q),
              TPASS(dout), TPASS(lse), gate, delta, ak, av);
  return nk;
}

/* Partial sums over token chunk gid0 % chunks of KKEYS blocks: [chunks, B*NB, H, D]
 * (bwd_reduce_chunks adds the chunks up in order). */
__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dkdv_compressed(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(VC_DT, vc), CTENSOR(DO_DT, dout), CTENSOR(0, lse),
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int chunks, int ctok, int BS, SEQ_ARGS) {
  __local float lf[TILE_FLOATS(KROWS, KKEYS)];
  __local int li[TILE_INTS(KROWS, KKEYS)];
  const seqspan sp = seq_span(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, chunk = get_group_id(0) % chunks;
  const int u0 = (get_group_id(0) / chunks) * KKEYS;
  float ak[DK_PER], av[DV_PER];
  for (int i = 0; i < DK_PER; i++) ak[i] = 0.0f;
  for (int i = 0; i < DV_PER; i++) av[i] = 0.0f;
  const int nk = dkdv_contiguous(MODE_CMP, u0, chunk, ctok, lf, li, scale, 0, BS, TPASS(q),
                                 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TPASS(kc), TPASS(vc),
                                 TPASS(dout), TPASS(lse), ws + gate_off, ws + delta_off, sp, h,
                                 G, TQ, HQ, ak, av);
  const long base = (long)chunk * B * NB + (long)sp.b * NB + sp.c0 + u0;
  dkdv_store(nk, base, h, H, scale, ws + dk_off, ws + dv_off, ak, av);
}

__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dkdv_window(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), __global float *ws, long gate_off, long delta_off, long dk_off,
    long dv_off, float scale, int W, int BS, SEQ_ARGS) {
  __local float lf[TILE_FLOATS(KROWS, KKEYS)];
  __local int li[TILE_INTS(KROWS, KKEYS)];
  const seqspan sp = seq_span(cu, nseq, TQ, NB, get_group_id(1));
  const int h = get_group_id(2), G = HQ / H, u0 = get_group_id(0) * KKEYS;
  float ak[DK_PER], av[DV_PER];
  for (int i = 0; i < DK_PER; i++) ak[i] = 0.0f;
  for (int i = 0; i < DV_PER; i++) av[i] = 0.0f;
  const int nk = dkdv_contiguous(MODE_SWA, u0, 0, INT_MAX, lf, li, scale, W, BS, TPASS(q),
                                 TPASS(k), TPASS(v), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TPASS(dout),
                                 TPASS(lse), ws + gate_off, ws + delta_off, sp, h, G, TQ, HQ,
                                 ak, av);
  dkdv_store(nk, (long)sp.b * TQ + sp.t0 + u0, h, H, scale, ws + dk_off, ws + dv_off, ak, av);
}

/* Selected branch: a work-group owns KKEYS keys of the block of one chunk of a selection
 * row (cl/select_mask.cl: row = (kv head, block), chunk = a run of mask words holding
 * about SEL_CHUNK of the tokens that selected the block) and walks those tokens, all G
 * heads of each, in increasing order. It writes the chunk's partial sums: slot-major
 * [slots, BS, D] (bwd_finalize_kv adds a block's slots up in order). */
__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void bwd_dkdv_selected(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CTENSOR(DO_DT, dout),
    CTENSOR(0, lse), __global const uint *mask, long mask_off, int NCH,
    __global const int *sel, long offsets_off, long slot_row_off, long slot_word_off,
    __global float *ws, long gate_off, long delta_off, long dk_off, long dv_off, float scale,
    int BS, SEQ_ARGS) {
  __local float lf[TILE_FLOATS(KROWS, KKEYS)];
  __local int li[TILE_INTS(KROWS, KKEYS)];
  __local int list[MASK_WORDS * 32];
  __local uint words[MASK_WORDS];
  __global const int *offsets = sel + offsets_off;
  const int parts = (BS + KKEYS - 1) / KKEYS, slot = get_group_id(0) / parts;
  const int nrows = H * B * NB;
  if (slot >= offsets[nrows]) return;
  const int row = sel[slot_row_off + slot], h = row / (B * NB);
  const crow blk = locate_block(cu, nseq, NB, TK, row % (B * NB));
  const seqspan sp = {blk.b, blk.kstart, 0, blk.tk, 0};
  const int u0 = blk.c * BS + (get_group_id(0) % parts) * KKEYS;
  const int kend = min((blk.c + 1) * BS, blk.tk);
  if (u0 >= kend) return;
  const int nk = min(KKEYS, kend - u0), G = HQ / H;
  const tile t = tile_carve(lf, li, KROWS, KKEYS);
  tile_load_keys(t, u0, nk, 0, list, (__local const uint *)list, BS, kend - 1, sp.b, sp.t0, h,
                 TPASS(k), TPASS(v));
  float ak[DK_PER], av[DV_PER];
  for (int i = 0; i < DK_PER; i++) ak[i] = 0.0f;
  for (int i = 0; i < DV_PER; i++) av[i] = 0.0f;
  __global const uint *mrow = mask + mask_off + (long)row * NCH;
  const int wend = slot + 1 < offsets[row + 1] ? sel[slot_word_off + slot + 1]
                                               : (blk.tk + 31) / 32;
  for (int w0 = sel[slot_word_off + slot]; w0 < wend; w0 += MASK_WORDS) {
    const int n = mask_expand(mrow, w0, wend, words, list);
    for (long f0 = 0; f0 < (long)n * G; f0 += KROWS)
      dkdv_step(t, MODE_SLC, f0, (long)n * G, 1, list, sp, h, G, nk, scale, 0, BS, TQ, HQ,
                TPASS(q), TPASS(dout), TPASS(lse), ws + gate_off, ws + delta_off, ak, av);
  }
  /* slot-major partial rows: row (slot * BS + key in block), one "head" */
  dkdv_store(nk, (long)slot * BS + u0 - blk.c * BS, 0, 1, scale, ws + dk_off, ws + dv_off, ak,
             av);
}
