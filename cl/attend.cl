/* Flash attention with a key set per query row: the compressed, selected and sliding-
 * window branches of NSA (docs/SEMANTICS.md sections 2, 4, 5) as one kernel,
 * attend_fwd, compiled once per MODE: 0 compressed, 1 window, 2 selected.
 *
 * Rows. A work-group owns ROWS query rows that share the kv head h = get_group_id(1).
 * A row is a (query token, g) pair, hq = h*G + g, numbered token*G + g, so the G heads
 * of a token sit side by side and each K/V tile is loaded once for all of them.
 *  - MODE 0/1: ROWS consecutive rows of one sequence (a batch element or a packed
 *    sequence). The group walks the union of its rows' key ranges; each row is masked
 *    to its own range.
 *  - MODE 2, TPG == 1: the G heads of one token (in chunks of ROWS when G > ROWS). Its
 *    valid listed blocks are deduplicated and sorted in local memory, and their tokens
 *    are numbered 0, 1, ... (BS per block; the own block, always last, is cut at p).
 *  - MODE 2, TPG > 1 (host: G <= ROWS/4): TPG consecutive tokens of one sequence, rows token*G + g.
 *    The group walks the sorted union of the tokens' valid blocks (at most UCAP = TPG*S);
 *    msk[slot] has bit u set when block list[slot] is in token u's list, and row r sees
 *    key index kidx when its token's bit is set and the key's position is <= its p.
 * Key index: the compressed block c (MODE 0), the token j (MODE 1), or that running
 * number (MODE 2). Row r sees the key indices [rlo[r], rhi[r]).
 *
 * Per tile of KT keys:  load K into local memory | barrier | S = Q K^T, masked, with
 * partial row maxima | barrier | online softmax (P = exp2(S - m), rescale factor) while V
 * is loaded over K | barrier | O += P V in registers, row sums | barrier.
 * Scores are in log2 units: q is multiplied by scale*log2(e) when it is staged. K and V
 * rows move in 16-byte units where the host found them aligned (VEC_K, VEC_V).
 *
 * Thread layouts (all sizes powers of two, chosen in src/attend.c):
 *  scores:  KW work-items along keys x WG/KW along rows; each owns RA rows x KA keys.
 *  softmax: WG/ROWS work-items per row.
 *  P V:     DW work-items along d x WG/DW along rows; each owns RB rows x DB columns.
 */
/* MODE, BS, ROWS, WG, TPG, UCAP: see cl/attend_setup.cl, which precedes this file. */
#ifndef DK
#define DK 64
#endif
#ifndef DV
#define DV 64
#endif
#ifndef KT
#define KT 32
#endif
#ifndef KW
#define KW 16
#endif
#ifndef DW
#define DW 32
#endif
#ifndef HAS_LSE
#define HAS_LSE 1
#endif
#ifndef PREFETCH
#define PREFETCH 0 /* 1: fetch tiles into registers one phase early (see src/attend.c) */
#endif
#ifndef VEC_K
#define VEC_K 0 /* 1: k rows are read 16 bytes at a time (host checked the alignment) */
#endif
#ifndef VEC_V
#define VEC_V 0
#endif
#ifndef Q_DT
#define Q_DT 0
#endif
#ifndef K_DT
#define K_DT 0
#endif
#ifndef V_DT
#define V_DT 0
#endif
#ifndef O_DT
#define O_DT 0
#endif

#if ROWS > WG || KW > KT || KW > WG || DW > WG || WG % ROWS || WG % KW || KT % KW || WG % DW
#error "attend.cl: ROWS, KT, WG, KW, DW must be powers of two with ROWS, KW, DW <= WG, KW <= KT"
#endif

#define QLD (DK + 1) /* row stride of the q and k tiles: +1 avoids bank conflicts */
#define PLD (KT + 1) /* row stride of the score tile */
#define KVLD ((DK + 1) > DV ? (DK + 1) : DV)
#define TPR (WG / ROWS)             /* softmax: work-items per row */
#define RW (WG / KW)                /* scores: row groups */
#define RA ((ROWS + RW - 1) / RW)   /* scores: rows per work-item */
#define KA (KT / KW)                /* scores: keys per work-item */
#define RW2 (WG / DW)               /* P V: row groups */
#define RB ((ROWS + RW2 - 1) / RW2) /* P V: rows per work-item */
#define DB ((DV + DW - 1) / DW)     /* P V: columns per work-item */

/* Tile loads move units of 16 bytes (VEC_*) or of one element. With PREFETCH a work-item
 * holds its PER_* units of a tile in registers from the fetch until the store into local
 * memory, so that the loads overlap the arithmetic of the phase before. */
#define ESIZE(DT) ((DT) == 0 ? 4 : 2)
#define ELEMS_K (VEC_K ? 16 / ESIZE(K_DT) : 1)
#define ELEMS_V (VEC_V ? 16 / ESIZE(V_DT) : 1)
#define PER_K ((KT * DK / ELEMS_K + WG - 1) / WG)
#define PER_V ((KT * DV / ELEMS_V + WG - 1) / WG)
#if (VEC_K && DK % (16 / ESIZE(K_DT))) || (VEC_V && DV % (16 / ESIZE(V_DT)))
#error "attend.cl: VEC_K/VEC_V need head dims that are whole 16-byte units"
#endif
#if VEC_K
#define KRAW uint4
#else
#define KRAW float
#endif
#if VEC_V
#define VRAW uint4
#else
#define VRAW float
#endif

inline void load_q(CTENSOR(Q_DT, q), int b, float qscale, attend_rows rows, __local float *qs) {
  for (int i = get_local_id(0); i < ROWS * DK; i += WG) {
    const int r = i / DK, d = i - r * DK, t = rows.tok[r];
    qs[r * QLD + d] = t >= 0 ? qscale * LOAD(Q_DT, q, TIDX(q, b, t, rows.hq[r]) + d) : 0.0f;
  }
}

/* ---- 16-byte units: raw words until they are stored (little-endian devices) ---- */
#define LD16(DT, p, i) (((__global const uint4 *)(p))[(i) / (16 / ESIZE(DT))])

inline void unpack16_0(uint4 r, float *x) {
  x[0] = as_float(r.x), x[1] = as_float(r.y), x[2] = as_float(r.z), x[3] = as_float(r.w);
}
inline void unpack16_1(uint4 r, float *x) {
  const uint w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; i++)
    x[2 * i] = f16_bits(w[i] & 0xffffu), x[2 * i + 1] = f16_bits(w[i] >> 16);
}
inline void unpack16_2(uint4 r, float *x) {
  const uint w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; i++)
    x[2 * i] = as_float(w[i] << 16), x[2 * i + 1] = as_float(w[i] & 0xffff0000u);
}
#define UNPACK16(DT, r, x) CAT(unpack16_, DT)(r, x)

/* Unit `unit` (of KT * DK / ELEMS_K) of the keys k0 .. k0+KT-1. Keys at or past grp.hi
 * read as 0, so that masked keys add exactly 0 (their V rows too). */
inline KRAW fetch_k_unit(CTENSOR(K_DT, k), attend_group grp, int h, int k0, __local const int *list,
                         int unit) {
  const int per_row = DK / ELEMS_K, j = unit / per_row, kidx = k0 + j;
  const long at = TIDX(k, grp.b, key_row(min(kidx, grp.hi - 1), grp.krow0, list), h) +
                  (unit - j * per_row) * ELEMS_K;
  const bool ok = unit < KT * per_row && kidx < grp.hi;
#if VEC_K
  return ok ? LD16(K_DT, k, at) : (uint4)(0u);
#else
  return ok ? LOAD(K_DT, k, at) : 0.0f;
#endif
}

inline VRAW fetch_v_unit(CTENSOR(V_DT, v), attend_group grp, int h, int k0, __local const int *list,
                         int unit) {
  const int per_row = DV / ELEMS_V, j = unit / per_row, kidx = k0 + j;
  const long at = TIDX(v, grp.b, key_row(min(kidx, grp.hi - 1), grp.krow0, list), h) +
                  (unit - j * per_row) * ELEMS_V;
  const bool ok = unit < KT * per_row && kidx < grp.hi;
#if VEC_V
  return ok ? LD16(V_DT, v, at) : (uint4)(0u);
#else
  return ok ? LOAD(V_DT, v, at) : 0.0f;
#endif
}

/* A fetched key unit into kv[KT][QLD]. */
inline void store_k_unit(KRAW r, int unit, __local float *kv) {
  const int per_row = DK / ELEMS_K, j = unit / per_row;
  if (unit >= KT * per_row) return;
  __local float *dst = kv + j * QLD + (unit - j * per_row) * ELEMS_K;
#if VEC_K
  float x[ELEMS_K];
  UNPACK16(K_DT, r, x);
#pragma unroll
  for (int e = 0; e < ELEMS_K; e++) dst[e] = x[e];
#else
  dst[0] = r;
#endif
}

/* A fetched value unit into kv[KT][DV]. */
inline void store_v_unit(VRAW r, int unit, __local float *kv) {
  const int per_row = DV / ELEMS_V, j = unit / per_row;
  if (unit >= KT * per_row) return;
  __local float *dst = kv + j * DV + (unit - j * per_row) * ELEMS_V;
#if VEC_V
  float x[ELEMS_V];
  UNPACK16(V_DT, r, x);
#pragma unroll
  for (int e = 0; e < ELEMS_V; e++) dst[e] = x[e];
#else
  dst[0] = r;
#endif
}

/* PREFETCH: a whole tile's units into registers now, into local memory later. */
inline void fetch_k(CTENSOR(K_DT, k), attend_group grp, int h, int k0, __local const int *list,
                    KRAW *r) {
#pragma unroll
  for (int u = 0; u < PER_K; u++)
    r[u] = fetch_k_unit(TPASS(k), grp, h, k0, list, get_local_id(0) + WG * u);
}
inline void fetch_v(CTENSOR(V_DT, v), attend_group grp, int h, int k0, __local const int *list,
                    VRAW *r) {
#pragma unroll
  for (int u = 0; u < PER_V; u++)
    r[u] = fetch_v_unit(TPASS(v), grp, h, k0, list, get_local_id(0) + WG * u);
}
inline void store_k(const KRAW *r, __local float *kv) {
#pragma unroll
  for (int u = 0; u < PER_K; u++) store_k_unit(r[u], get_local_id(0) + WG * u, kv);
}
inline void store_v(const VRAW *r, __local float *kv) {
#pragma unroll
  for (int u = 0; u < PER_V; u++) store_v_unit(r[u], get_local_id(0) + WG * u, kv);
}

/* Without PREFETCH: straight from global into local memory. */
inline void load_k(CTENSOR(K_DT, k), attend_group grp, int h, int k0, __local const int *list,
                   __local float *kv) {
  for (int unit = get_local_id(0); unit < KT * (DK / ELEMS_K); unit += WG)
    store_k_unit(fetch_k_unit(TPASS(k), grp, h, k0, list, unit), unit, kv);
}
inline void load_v(CTENSOR(V_DT, v), attend_group grp, int h, int k0, __local const int *list,
                   __local float *kv) {
  for (int unit = get_local_id(0); unit < KT * (DV / ELEMS_V); unit += WG)
    store_v_unit(fetch_v_unit(TPASS(v), grp, h, k0, list, unit), unit, kv);
}

/* ps[r][j] = q_r . k_j, or -inf outside row r's range; red[r][kg] = max over the item's
 * keys of row r. */
inline void tile_scores(__local const float *qs, __local const float *ks, int k0, attend_rows rows,
                        __local const int *list, __local const uint *msk, int ghi,
                        __local float *ps, __local float *red) {
#if !(MODE == 2 && TPG > 1)
  (void)list, (void)msk, (void)ghi;
#endif
  const int lid = get_local_id(0), kg = lid % KW, rg = lid / KW;
  float s[RA][KA];
  int qb[RA];
#pragma unroll
  for (int m = 0; m < RA; m++) {
    qb[m] = min(rg + RW * m, ROWS - 1) * QLD;
#pragma unroll
    for (int a = 0; a < KA; a++) s[m][a] = 0.0f;
  }
  for (int d = 0; d < DK; d++) {
    float kx[KA];
#pragma unroll
    for (int a = 0; a < KA; a++) kx[a] = ks[(kg + KW * a) * QLD + d];
#pragma unroll
    for (int m = 0; m < RA; m++) {
      const float qx = qs[qb[m] + d];
#pragma unroll
      for (int a = 0; a < KA; a++) s[m][a] += qx * kx[a];
    }
  }
#pragma unroll
  for (int m = 0; m < RA; m++) {
    const int r = rg + RW * m;
    if (r >= ROWS) break;
    const int lo = rows.lo[r], hi = rows.hi[r];
    float mx = -INFINITY;
#pragma unroll
    for (int a = 0; a < KA; a++) {
      const int j = kg + KW * a, kidx = k0 + j;
#if MODE == 2 && TPG > 1
      /* lo: the row's token in the group; hi: its position + 1 */
      const int slot = min(kidx, ghi - 1) / BS;
      const bool in = kidx < ghi && ((msk[slot] >> lo) & 1u) != 0u &&
                      list[slot] * BS + (kidx - slot * BS) < hi;
      const float x = in ? s[m][a] : -INFINITY;
#else
      const float x = kidx >= lo && kidx < hi ? s[m][a] : -INFINITY;
#endif
      ps[r * PLD + j] = x;
      mx = fmax(mx, x);
    }
    red[r * KW + kg] = mx;
  }
}

/* Online softmax step: new row max mn, ps := exp2(ps - mn), alpha = exp2(m - mn). */
inline void tile_softmax(__local float *ps, __local const float *red, __local const float *rm,
                         __local float *rmn, __local float *ralpha) {
  const int lid = get_local_id(0), r = lid / TPR, lane = lid - r * TPR;
  float mt = -INFINITY;
  for (int k = 0; k < KW; k++) mt = fmax(mt, red[r * KW + k]);
  const float mo = rm[r], mn = fmax(mo, mt);
  for (int j = lane; j < KT; j += TPR)
    ps[r * PLD + j] = mn == -INFINITY ? 0.0f : exp2(ps[r * PLD + j] - mn);
  if (lane == 0) {
    rmn[r] = mn;
    ralpha[r] = mn == -INFINITY ? 1.0f : exp2(mo - mn);
  }
}

/* acc = acc * alpha + P V for the item's RB rows x DB columns. */
inline void tile_pv(__local const float *ps, __local const float *vs, __local const float *ralpha,
                    float acc[RB][DB]) {
  const int lid = get_local_id(0), dg = lid % DW, rg = lid / DW;
  int pb[RB], vb[DB];
#pragma unroll
  for (int n = 0; n < DB; n++) vb[n] = min(dg + DW * n, DV - 1);
#pragma unroll
  for (int m = 0; m < RB; m++) {
    const int r = min(rg + RW2 * m, ROWS - 1);
    const float alpha = ralpha[r];
    pb[m] = r * PLD;
#pragma unroll
    for (int n = 0; n < DB; n++) acc[m][n] *= alpha;
  }
  for (int j = 0; j < KT; j++) {
    float vx[DB];
#pragma unroll
    for (int n = 0; n < DB; n++) vx[n] = vs[j * DV + vb[n]];
#pragma unroll
    for (int m = 0; m < RB; m++) {
      const float p = ps[pb[m] + j];
#pragma unroll
      for (int n = 0; n < DB; n++) acc[m][n] += p * vx[n];
    }
  }
}

/* Row sums and maxima after the tile (items r < ROWS, concurrently with tile_pv). */
inline void tile_row_stats(__local const float *ps, __local const float *rmn,
                           __local const float *ralpha, __local float *rm, __local float *rl) {
  for (int r = get_local_id(0); r < ROWS; r += WG) {
    float sum = 0.0f;
    for (int j = 0; j < KT; j++) sum += ps[r * PLD + j];
    rl[r] = rl[r] * ralpha[r] + sum;
    rm[r] = rmn[r];
  }
}

/* o = acc / l (0 for an empty key set); lse = ln(2) * (m + log2 l) or -inf. */
inline void write_out(TENSOR(O_DT, o), TENSOR(0, lse), int b, attend_rows rows,
                      __local const float *rm, __local const float *rl, float acc[RB][DB]) {
  const int lid = get_local_id(0), dg = lid % DW, rg = lid / DW;
#pragma unroll
  for (int m = 0; m < RB; m++) {
    const int r = rg + RW2 * m;
    if (r >= ROWS) break;
    const int t = rows.tok[r];
    if (t < 0) continue;
    const float l = rl[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
    const long base = TIDX(o, b, t, rows.hq[r]);
#pragma unroll
    for (int n = 0; n < DB; n++) {
      const int d = dg + DW * n;
      if (d < DV) STORE(O_DT, o, base + d, acc[m][n] * inv);
    }
  }
#if HAS_LSE
  for (int r = lid; r < ROWS; r += WG) {
    const int t = rows.tok[r];
    if (t < 0) continue;
    const float l = rl[r];
    lse[TIDX(lse, b, t, rows.hq[r])] = l > 0.0f ? (rm[r] + log2(l)) * M_LN2_F : -INFINITY;
  }
#else
  (void)lse, (void)lse_off, (void)lse_s0, (void)lse_s1, (void)lse_s2;
#endif
}

/* ------------------------------------------------------------------ kernel */

/* Grid: (groups * WG, H). MODE 0/1: groups = sequences * tiles, tiles = row tiles of the
 * longest sequence. MODE 2, TPG == 1: groups = B*TQ * tiles, tiles = ceil(G / ROWS);
 * TPG > 1: groups = sequences * tiles, tiles = ceil(tokens of the longest sequence / TPG).
 * bi is read in MODE 2 only; lse is written when HAS_LSE. scale is the softmax scale,
 * W the window (MODE 1), S the width of bi (MODE 2). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void attend_fwd(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CITENSOR(bi), TENSOR(O_DT, o),
    TENSOR(0, lse), SEQ_ARGS, float scale, int W, int S, int tiles) {
  __local float qs[ROWS * QLD], kv[KT * KVLD], ps[ROWS * PLD], red[ROWS * KW];
  __local float rm[ROWS], rmn[ROWS], rl[ROWS], ralpha[ROWS];
  __local int rtok[ROWS], rhq[ROWS], rlo[ROWS], rhi[ROWS];
#if MODE == 2 && TPG > 1
  __local int list[UCAP];
  __local uint msk[UCAP];
#if 2 * UCAP <= KT * KVLD /* the union's scratch lives in the K/V tile until the loop */
  __local int *cand = (__local int *)kv;
  __local uint *tmpm = (__local uint *)(kv + UCAP);
#else
  __local int cand[UCAP];
  __local uint tmpm[UCAP];
#endif
#elif MODE == 2
  __local int list[MAX_S], tmp[MAX_S];
  __local uint msk[1];
#else
  __local int list[1];
  __local uint msk[1];
#endif
  const attend_rows rows = {rtok, rhq, rlo, rhi};
  const int h = get_group_id(1), G = HQ / H, lid = get_local_id(0);
  attend_group grp;
#if MODE == 2 && TPG > 1
  (void)W, (void)B;
  attend_seq sq; /* no early return past the sequence: idle groups run with no tokens */
  const int t0 = selected_tile(cu, nseq, TQ, TK, tiles, &sq);
  setup_selected_multi(sq, t0, G, h, TPASS(bi), S, &grp, rows, list, msk, cand, tmpm);
#elif MODE == 2
  (void)W;
  setup_selected(cu, nseq, B, TQ, TK, G, h, tiles, TPASS(bi), S, &grp, rows, list, tmp);
#else
  (void)S, (void)NB, (void)bi, (void)bi_off, (void)bi_s0, (void)bi_s1, (void)bi_s2;
  if (!setup_dense(cu, nseq, TQ, TK, G, h, W, tiles, &grp, rows)) return;
#endif
  for (int r = lid; r < ROWS; r += WG) {
    rm[r] = -INFINITY;
    rl[r] = 0.0f;
  }
  LBARRIER();
  load_q(TPASS(q), grp.b, scale * M_LOG2E_F, rows, qs);

  float acc[RB][DB];
#pragma unroll
  for (int m = 0; m < RB; m++) {
#pragma unroll
    for (int n = 0; n < DB; n++) acc[m][n] = 0.0f;
  }

  /* PREFETCH: V loads overlap the scores, the next tile's K loads overlap P V. */
#if PREFETCH
  KRAW rk[PER_K];
  VRAW rv[PER_V];
  if (grp.lo < grp.hi) fetch_k(TPASS(k), grp, h, grp.lo, list, rk);
#endif
  for (int k0 = grp.lo; k0 < grp.hi; k0 += KT) {
#if PREFETCH
    store_k(rk, kv);
    fetch_v(TPASS(v), grp, h, k0, list, rv);
#else
    load_k(TPASS(k), grp, h, k0, list, kv);
#endif
    LBARRIER();
    tile_scores(qs, kv, k0, rows, list, msk, grp.hi, ps, red);
    LBARRIER();
    tile_softmax(ps, red, rm, rmn, ralpha);
#if PREFETCH
    store_v(rv, kv);
    if (k0 + KT < grp.hi) fetch_k(TPASS(k), grp, h, k0 + KT, list, rk);
#else
    load_v(TPASS(v), grp, h, k0, list, kv);
#endif
    LBARRIER();
    tile_pv(ps, kv, ralpha, acc);
    tile_row_stats(ps, rmn, ralpha, rm, rl);
    LBARRIER();
  }
  write_out(TPASS(o), TPASS(lse), grp.b, rows, rm, rl, acc);
}
