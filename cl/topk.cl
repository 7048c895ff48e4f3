/* Top-k block selection (semantics section 3).
 *
 * One work-group per (query row, kv head). For the query at position p, IC = p / BS is
 * its own block; blocks IC, IC-1 and 0 are forced, in that priority, and the other
 * candidates 1 .. IC-2 compete on importance: the compressed-attention probability
 * summed over the G query heads of the group, sum_g exp(scale q_g.k_cmp[c] - lse_g).
 *
 * The group keeps its G query rows in local memory (pre-multiplied by scale*log2(e), so
 * that exp becomes exp2), in chunks of GC rows when they do not fit. It streams the
 * candidates in tiles of TILE compressed keys: the tile is loaded cooperatively and
 * coalesced into local memory, work-item (j, gp) scores candidate j over its share of
 * the g rows (GR rows at a time, kept in registers), and the shares are summed in a
 * fixed order. The tile then merges into a running list of the n best candidates, kept
 * sorted in local memory: each tile member and each list member counts how many members
 * of (tile u list) come before it in the total order (forced priority, importance
 * descending, block index ascending); whoever has rank < n moves to that slot of the
 * other list buffer. No sorting network, no atomics on data, deterministic. At the end
 * the n winners are ranked by block index and written ascending, then -1 up to S.
 *
 * Per-token counts are clamped into [0, S] here: they live on the device, so the host
 * cannot check them without blocking.
 *
 * Speed (NVIDIA H200, OpenCL, bf16, HQ=64 H=4 DK=128 BS=64 S=16): 0.80 / 2.9 / 10.8 / 41
 * ms at T = 8k / 16k / 32k / 64k, about 13 TFLOP/s of scores. Limits: the scores run on
 * f32 FMAs fed from local memory (one float4 key load and GR broadcast query loads per 4*GR
 * FMAs); each group reads its own copy of every key tile (nothing is shared between the
 * queries of one block), which dominates at small G (G = 1: 25 ms at 64k). Several tokens
 * per group and matrix-unit scores are the next steps.
 */
#ifndef Q_DT
#define Q_DT 0
#endif
#ifndef KC_DT
#define KC_DT 0
#endif
#ifndef DK
#define DK 64
#endif
#ifndef TILE /* candidates per tile */
#define TILE 32
#endif
#ifndef WG /* work-items: TILE times the number of g shares */
#define WG 32
#endif
#ifndef GC /* query rows held in local memory at once */
#define GC 16
#endif
#ifndef GR /* query rows a work-item scores together (registers) */
#define GR 4
#endif
#define SMAX 128 /* CLNSA_MAX_BLOCK_COUNT */

#if WG % TILE != 0
#error "WG must be a multiple of TILE"
#endif
#define GSPLIT (WG / TILE)
#define DKP4 ((DK + 3) / 4)
/* Row stride of the key tile in float4: odd, so that the 128-bit loads of consecutive
 * candidates fall in different banks. */
#define KST4 (DKP4 | 1)
#define GCP (((GC + GR - 1) / GR) * GR)

/* Keys of the forced blocks: above any importance (clamped to IMP_MAX). */
#define KEY_OWN 3.0e38f
#define KEY_PREV 2.0e38f
#define KEY_FIRST 1.0e38f
#define IMP_MAX 1.0e30f

/* Does (ka, ia) come before (kb, ib): higher key first, then the lower block index. */
inline bool topk_ahead(float ka, int ia, float kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

/* Four consecutive elements of a row as floats (the row's tail past DK reads as 0). */
inline float4 ld4_dt0(__global const float *p, long i) {
  return vload4(0, p + i);
}
inline float4 ld4_dt1(__global const ushort *p, long i) {
  return vload_half4(0, (__global const half *)(p + i));
}
inline float4 ld4_dt2(__global const ushort *p, long i) {
  return as_float4(convert_uint4(vload4(0, p + i)) << 16);
}
#if DK % 4 == 0
#define ROW_LOAD4(DT, p, row, d4) CAT(ld4_dt, DT)(p, (row) + 4 * (d4))
#else
#define ROW_LOAD4(DT, p, row, d4)                                        \
  (float4)(LOAD(DT, p, (row) + 4 * (d4)),                                \
           4 * (d4) + 1 < DK ? LOAD(DT, p, (row) + 4 * (d4) + 1) : 0.0f, \
           4 * (d4) + 2 < DK ? LOAD(DT, p, (row) + 4 * (d4) + 2) : 0.0f, \
           4 * (d4) + 3 < DK ? LOAD(DT, p, (row) + 4 * (d4) + 3) : 0.0f)
#endif

#ifndef LOAD_BATCH /* float4 loads a work-item keeps in flight before storing them */
#define LOAD_BATCH 8
#endif

/* Rows base + r*stride (r < nrows) of a tensor into local rows of dst_st4 float4, times
 * mul; `slots` float4 are written, those of rows >= nrows as zeros. The loads of a batch
 * are issued before any store, so that their latencies overlap. One function per dtype
 * role (Q_DT, KC_DT). */
#define TOPK_LOAD_ROWS(NAME, DT)                                                                  \
  inline void NAME(__local float4 *dst, int dst_st4, __global const STORAGE(DT) *src, long base, \
                   long stride, int nrows, int slots, float mul, int lid) {                       \
    for (int s0 = 0; s0 < slots; s0 += WG * LOAD_BATCH) {                                         \
      float4 buf[LOAD_BATCH];                                                                     \
      for (int i = 0; i < LOAD_BATCH; i++) {                                                      \
        const int e = s0 + i * WG + lid, r = e / DKP4, d4 = e - r * DKP4;                         \
        buf[i] = (float4)(0.0f);                                                                  \
        if (r < nrows) buf[i] = mul * ROW_LOAD4(DT, src, base + r * stride, d4);                  \
      }                                                                                           \
      for (int i = 0; i < LOAD_BATCH; i++) {                                                      \
        const int e = s0 + i * WG + lid, r = e / DKP4, d4 = e - r * DKP4;                         \
        if (e < slots) dst[r * dst_st4 + d4] = buf[i];                                            \
      }                                                                                           \
    }                                                                                             \
  }
TOPK_LOAD_ROWS(topk_load_q_rows, Q_DT)
TOPK_LOAD_ROWS(topk_load_k_rows, KC_DT)

/* Query rows g0 .. g0+cnt-1 of the group into local memory, scaled, zero-padded to GR. */
inline void topk_load_q(__local float4 *ql, __local float *lsel, __global const STORAGE(Q_DT) *q,
                        long q_row, long q_s2, __global const float *lse, long lse_row, int g0,
                        int cnt, float qscale, int lid) {
  const int rows = ((cnt + GR - 1) / GR) * GR;
  topk_load_q_rows(ql, DKP4, q, q_row + g0 * q_s2, q_s2, cnt, rows * DKP4, qscale, lid);
  for (int g = lid; g < cnt; g += WG) lsel[g] = lse[lse_row + g0 + g] * M_LOG2E_F;
}

/* Candidate j's share of the importance over local rows gp*GR, gp*GR + GSPLIT*GR, ... */
inline float topk_score(__local const float4 *krow, __local const float4 *ql,
                        __local const float *lsel, int cnt, int gp) {
  float imp = 0.0f;
  for (int g0 = gp * GR; g0 < cnt; g0 += GSPLIT * GR) {
    float acc[GR];
    for (int i = 0; i < GR; i++) acc[i] = 0.0f;
    for (int d4 = 0; d4 < DKP4; d4++) {
      const float4 kv = krow[d4];
      for (int i = 0; i < GR; i++) acc[i] += dot(ql[(g0 + i) * DKP4 + d4], kv);
    }
    for (int i = 0; i < GR; i++)
      if (g0 + i < cnt) imp += exp2(acc[i] - lsel[g0 + i]);
  }
  return imp;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void topk_select(
    CTENSOR(Q_DT, q), CTENSOR(KC_DT, kc), CTENSOR(0, lse), CITENSOR(bc), ITENSOR(bi),
    int has_counts, int S, int BS, int G, float scale, SEQ_ARGS) {
  __local float4 k_l[TILE * KST4];
  __local float4 q_l[GCP * DKP4];
  __local float lse_l[GCP];
  __local float part_l[WG];
  __local float key_l[TILE];
  __local float lkey[2][SMAX];
  __local int lidx[2][SMAX];
  __local int any_l;

  const int lid = get_local_id(0), r = get_group_id(0), h = get_group_id(1);
  const qrow qr = locate_query(cu, nseq, B, TQ, TK, r);
  const int ic = qr.p / BS;
  int count = S;
  if (has_counts) count = clamp(bc[TIDX(bc, qr.b, qr.t, h)], 0, S);
  const int n = min(count, ic + 1);
  __global int *out = bi + TIDX(bi, qr.b, qr.t, h);

  if (n == ic + 1) { /* every candidate is kept */
    for (int j = lid; j < S; j += WG) out[j] = j < n ? j : -1;
    return;
  }

  /* Forced blocks head the list; there are 1 (ic = 0), 2 (ic = 1) or 3 of them. */
  const int forced = min(ic + 1, 3);
  int m = min(n, forced), cur = 0;
  if (lid == 0) {
    const float fk[3] = {KEY_OWN, KEY_PREV, KEY_FIRST};
    const int fi[3] = {ic, ic - 1, 0};
    for (int i = 0; i < m; i++) {
      lkey[0][i] = fk[i];
      lidx[0][i] = fi[i];
    }
  }

  const int c_end = ic - 1; /* candidates 1 .. ic-2 */
  if (n > m) {
    const float qscale = scale * M_LOG2E_F;
    const long q_row = TIDX(q, qr.b, qr.t, h * G), lse_row = TIDX(lse, qr.b, qr.t, h * G);
    const bool resident = G <= GC;
    const int j = lid % TILE, gp = lid / TILE;
    if (resident) topk_load_q(q_l, lse_l, q, q_row, q_s2, lse, lse_row, 0, G, qscale, lid);
    for (int c0 = 1; c0 < c_end; c0 += TILE) {
      const int cnt = min(TILE, c_end - c0);
      topk_load_k_rows(k_l, KST4, kc, TIDX(kc, qr.b, qr.cstart + c0, h), kc_s1, cnt, cnt * DKP4,
                       1.0f, lid);
      float imp = 0.0f;
      for (int g0 = 0; g0 < G; g0 += GC) {
        const int gcnt = min(GC, G - g0);
        barrier(CLK_LOCAL_MEM_FENCE); /* the previous chunk's readers are done */
        if (!resident) topk_load_q(q_l, lse_l, q, q_row, q_s2, lse, lse_row, g0, gcnt, qscale, lid);
        barrier(CLK_LOCAL_MEM_FENCE);
        if (j < cnt) imp += topk_score(k_l + j * KST4, q_l, lse_l, gcnt, gp);
      }
      if (GSPLIT > 1) {
        part_l[lid] = imp;
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < TILE)
          for (int s = 1; s < GSPLIT; s++) imp += part_l[s * TILE + lid];
      }
      /* Garbage inputs must not break the order: NaN sorts last, +inf below the forced. */
      if (lid < TILE) key_l[lid] = isnan(imp) ? -1.0f : fmin(imp, IMP_MAX);
      if (lid == 0) any_l = 0;
      barrier(CLK_LOCAL_MEM_FENCE);

      /* A tile member may enter only if the list has room or it beats the last entry. */
      float key = 0.0f;
      int idx = c0 + lid, rank = n;
      if (lid < cnt) {
        key = key_l[lid];
        if (m < n || topk_ahead(key, idx, lkey[cur][m - 1], lidx[cur][m - 1])) {
          rank = 0;
          for (int i = 0; i < cnt; i++) rank += topk_ahead(key_l[i], c0 + i, key, idx);
          int lo = 0, hi = m; /* list members before it: the list is sorted */
          while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (topk_ahead(lkey[cur][mid], lidx[cur][mid], key, idx))
              lo = mid + 1;
            else
              hi = mid;
          }
          rank += lo;
          if (rank < n) atomic_or(&any_l, 1);
        }
      }
      barrier(CLK_LOCAL_MEM_FENCE);
      if (any_l) { /* uniform: the whole group merges or none of it */
        const int nxt = cur ^ 1;
        if (rank < n) {
          lkey[nxt][rank] = key;
          lidx[nxt][rank] = idx;
        }
        for (int i = lid; i < m; i += WG) {
          const float lk = lkey[cur][i];
          const int li = lidx[cur][i];
          int lr = i;
          for (int t = 0; t < cnt; t++) lr += topk_ahead(key_l[t], c0 + t, lk, li);
          if (lr < n) {
            lkey[nxt][lr] = lk;
            lidx[nxt][lr] = li;
          }
        }
        m = min(n, m + cnt);
        cur = nxt;
      }
      barrier(CLK_LOCAL_MEM_FENCE);
    }
  } else {
    barrier(CLK_LOCAL_MEM_FENCE);
  }

  /* The n winners, ascending by block index, then -1. */
  for (int i = lid; i < n; i += WG) {
    const int c = lidx[cur][i];
    int pos = 0;
    for (int t = 0; t < n; t++) pos += lidx[cur][t] < c;
    out[pos] = c;
  }
  for (int j = n + lid; j < S; j += WG) out[j] = -1;
}
