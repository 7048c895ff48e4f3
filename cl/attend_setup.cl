/* Row and key-set setup shared by the attention forward kernels, cl/attend.cl (portable)
 * and cl/attend_mma.cl (NVIDIA tensor cores): which query rows a work-group owns and which
 * keys each of them sees, in the MODE 0 (compressed), 1 (window) and 2 (selected) layouts
 * described at the top of cl/attend.cl, and MODE 3 (selected, kv-block-major: one block,
 * the tokens that chose it; cl/attend_mma.cl only, see its header). Prepended to either
 * kernel file by the host ("attend_setup.cl+attend.cl"), after cl/common.cl.
 *
 * Needs MODE, BS, ROWS (rows of the group's tile), WG (work-items), TPG and UCAP
 * (MODE 2 token packing), LCAP (MODE 3: tokens a chunk holds at most); the host passes
 * them all as -D options. MODE 2 with TPG > 1 needs cl/block_union.cl before this file.
 */
#ifndef MODE
#define MODE 1
#endif
#ifndef BS
#define BS 64
#endif
#ifndef ROWS
#define ROWS 16
#endif
#ifndef WG
#define WG 128
#endif
#ifndef TPG
#define TPG 1 /* MODE 2: query tokens per group (G < ROWS), TPG * G <= ROWS, TPG <= 32 */
#endif
#ifndef UCAP
#define UCAP 128 /* MODE 2, TPG > 1: capacity of the block union, TPG * S */
#endif
#define MAX_S 128 /* CLNSA_MAX_BLOCK_COUNT */

#if TPG < 1 || TPG > 32 || (TPG > 1 && MODE != 2)
#error "attend_setup.cl: TPG must be 1 .. 32, and > 1 only in MODE 2"
#endif

/* A tensor's five kernel arguments, to hand it on to a helper. */
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2
#define LBARRIER() barrier(CLK_LOCAL_MEM_FENCE)

/* What every work-item of a group knows about it. */
typedef struct attend_group {
  int b;      /* batch element */
  int krow0;  /* row of k/v (MODE 1, 2) or k_cmp (MODE 0) where key index 0 lives */
  int lo, hi; /* union of the rows' key ranges */
} attend_group;

/* Per-row facts in local memory; rtok < 0 marks a padding row. */
typedef struct attend_rows {
  __local int *tok, *hq, *lo, *hi;
} attend_rows;

/* ------------------------------------------------------------------ row setup */

/* One independent sequence: batch element s, or packed sequence s. */
typedef struct attend_seq {
  int b, q0, tq, kstart, cstart, tk;
} attend_seq;

inline attend_seq locate_seq(__global const int *cu, int nseq, int TQ, int TK, int s) {
  attend_seq q;
  if (nseq == 0) {
    q.b = s, q.q0 = 0, q.tq = TQ, q.kstart = 0, q.cstart = 0, q.tk = TK;
  } else {
    __global const int *cuk = cu + nseq + 1, *cuc = cu + 2 * (nseq + 1);
    q.b = 0, q.q0 = cu[s], q.tq = cu[s + 1] - cu[s];
    q.kstart = cuk[s], q.tk = cuk[s + 1] - cuk[s], q.cstart = cuc[s];
  }
  return q;
}

/* Key range of a query at position p (MODE 0: complete past blocks; MODE 1: window). */
inline int2 dense_range(int p, int W) {
#if MODE == 0
  (void)W;
  return (int2)(0, (p + 1) / BS);
#else
  return W > 0 ? (int2)(max(0, p - W + 1), p + 1) : (int2)(0, 0);
#endif
}

/* MODE 0/1: the group is tile (group id % tiles) of sequence (group id / tiles).
 * Returns false (for the whole group) when the tile lies past the sequence's rows. */
inline bool setup_dense(__global const int *cu, int nseq, int TQ, int TK, int G, int h, int W,
                        int tiles, attend_group *grp, attend_rows rows) {
  const int s = get_group_id(0) / tiles;
  const int row0 = (get_group_id(0) - s * tiles) * ROWS;
  const attend_seq sq = locate_seq(cu, nseq, TQ, TK, s);
  const int nrows = sq.tq * G, shift = sq.tk - sq.tq;
  if (row0 >= nrows) return false;
  const int pfirst = row0 / G + shift, plast = (min(row0 + ROWS, nrows) - 1) / G + shift;
  grp->b = sq.b;
  grp->krow0 = MODE == 0 ? sq.cstart : sq.kstart;
  grp->lo = dense_range(pfirst, W).x;
  grp->hi = dense_range(plast, W).y;
  for (int r = get_local_id(0); r < ROWS; r += WG) {
    const int gr = row0 + r, t = gr / G;
    const int2 range = dense_range(t + shift, W);
    const bool ok = gr < nrows;
    rows.tok[r] = ok ? sq.q0 + t : -1;
    rows.hq[r] = h * G + gr - t * G;
    rows.lo[r] = ok ? range.x : 0;
    rows.hi[r] = ok ? range.y : 0;
  }
  return true;
}

/* MODE 2: the sorted distinct blocks c of the list with 0 <= c <= ic, into list[];
 * returns their number. tmp[] is scratch. Contains barriers: call from every item. */
inline int sorted_blocks(CITENSOR(bi), int b, int t, int h, int S, int ic, __local int *list,
                         __local int *tmp) {
  const int lid = get_local_id(0);
  const long row = TIDX(bi, b, t, h);
  for (int i = lid; i < S; i += WG) {
    const int c = bi[row + i];
    list[i] = c >= 0 && c <= ic ? c : -1;
  }
  LBARRIER();
  for (int i = lid; i < S; i += WG) { /* keep the first occurrence of each block */
    int c = list[i];
    for (int j = 0; j < i; j++) c = list[j] == c ? -1 : c;
    tmp[i] = c;
  }
  LBARRIER();
  int n = 0;
  for (int j = 0; j < S; j++) n += tmp[j] >= 0;
  for (int i = lid; i < S; i += WG) { /* rank = number of smaller kept blocks */
    const int c = tmp[i];
    if (c < 0) continue;
    int rank = 0;
    for (int j = 0; j < S; j++) rank += tmp[j] >= 0 && tmp[j] < c;
    list[rank] = c;
  }
  LBARRIER();
  return n;
}

/* MODE 2: the group is chunk (group id % tiles) of the G heads of query row
 * (group id / tiles). Every row sees all of the group's keys. */
inline void setup_selected(__global const int *cu, int nseq, int B, int TQ, int TK, int G, int h,
                           int tiles, CITENSOR(bi), int S, attend_group *grp, attend_rows rows,
                           __local int *list, __local int *tmp) {
  const int r0 = get_group_id(0) / tiles;
  const int g0 = (get_group_id(0) - r0 * tiles) * ROWS;
  const qrow q = locate_query(cu, nseq, B, TQ, TK, r0);
  const int n = sorted_blocks(TPASS(bi), q.b, q.t, h, S, q.p / BS, list, tmp);
  grp->b = q.b;
  grp->krow0 = q.kstart;
  grp->lo = 0;
  grp->hi = n == 0 ? 0 : (n - 1) * BS + min(BS, q.p + 1 - list[n - 1] * BS);
  for (int r = get_local_id(0); r < ROWS; r += WG) {
    const bool ok = g0 + r < G;
    rows.tok[r] = ok ? q.t : -1;
    rows.hq[r] = h * G + g0 + r;
    rows.lo[r] = 0;
    rows.hi[r] = ok ? grp->hi : 0;
  }
}

#if MODE == 2 && TPG > 1
/* MODE 2, TPG > 1: the first token of the group's tile (group id % tiles) of TPG tokens
 * of sequence (group id / tiles); >= sq->tq when the tile lies past the sequence. */
inline int selected_tile(__global const int *cu, int nseq, int TQ, int TK, int tiles,
                         attend_seq *sq) {
  const int s = get_group_id(0) / tiles;
  *sq = locate_seq(cu, nseq, TQ, TK, s);
  return (get_group_id(0) - s * tiles) * TPG;
}

/* MODE 2, TPG > 1: tokens t0 .. of sequence sq (none when t0 >= sq.tq: the group then
 * runs with idle rows and no keys: an early return before the barriers gave wrong,
 * run-to-run varying results on PoCL 3.1, correct ones under Oclgrind). Rows keep their token's
 * index in the group in lo, position + 1 in hi. */
inline void setup_selected_multi(attend_seq sq, int t0, int G, int h, CITENSOR(bi), int S,
                                 attend_group *grp, attend_rows rows, __local int *list,
                                 __local uint *msk, __local int *cand, __local uint *tmpm) {
  const int ntok = clamp(sq.tq - t0, 0, TPG), p0 = t0 + sq.tk - sq.tq;
  const int n =
      block_union(TPASS(bi), sq.b, sq.q0 + t0, ntok, p0, h, S, BS, WG, list, msk, cand, tmpm);
  const int plast = p0 + ntok - 1;
  grp->b = sq.b;
  grp->krow0 = sq.kstart;
  grp->lo = 0;
  grp->hi = n == 0 ? 0 : (n - 1) * BS + min(BS, plast + 1 - list[n - 1] * BS);
  for (int r = get_local_id(0); r < ROWS; r += WG) {
    const int u = r / G;
    const bool ok = u < ntok;
    rows.tok[r] = ok ? sq.q0 + t0 + u : -1;
    rows.hq[r] = h * G + r - u * G;
    rows.lo[r] = ok ? u : 0;
    rows.hi[r] = ok ? p0 + u + 1 : 0;
  }
}
#endif

#if MODE == 3
/* MODE 3: the group is chunk slot (group id) of the selection mask of cl/select_mask.cl
 * (mask rows, chunk offsets, slot_row and slot_word as that file describes): kv head h,
 * block c of one sequence, and the tokens of that chunk, all of whom listed c. */
typedef struct kvm_chunk {
  int h, ntok; /* kv head; tokens in list[] (-1: the slot lies past the last chunk) */
  crow blk;    /* the block: batch element, index c, its sequence's first key and length */
} kvm_chunk;

/* The chunk's tokens (positions in their sequence, increasing) among this pass's, b TQ + t
 * in [r0, r1), into list[], and for each the first slot of its block_indices row that
 * names c into tslot[] (where the partial result goes), by cl/kvm_rows.cl. words[] holds
 * WG mask words. Contains barriers: call from every item. */
inline __attribute__((always_inline)) kvm_chunk
kvm_setup(__global const uint *mask, long mask_off, int NCH, __global const int *sel,
          long offsets_off, long slot_row_off, long slot_word_off, CITENSOR(bi), int S, SEQ_ARGS,
          long r0, long r1, __local uint *words, __local int *list, __local int *tslot) {
  kvm_chunk k;
  const int slot = get_group_id(0);
  __global const int *offsets = sel + offsets_off;
  (void)HQ;
  k.ntok = -1;
  if (slot >= offsets[H * B * NB]) return k; /* uniform over the group */
  const int srow = sel[slot_row_off + slot];
  k.h = srow / (B * NB);
  k.blk = locate_block(cu, nseq, NB, TK, srow % (B * NB));
  const int w0 = sel[slot_word_off + slot];
  const int wend = slot + 1 < offsets[srow + 1] ? sel[slot_word_off + slot + 1] : (k.blk.tk + 31) / 32;
  __global const uint *mrow = mask + mask_off + (long)srow * NCH;
  /* the pass's tokens of the chunk's sequence, [tlo, thi), and the words that hold them;
   * the host sizes LCAP for the longest chunk, so one fill takes all its words */
  const long sb = (long)k.blk.b * TQ + k.blk.kstart;
  const int tlo = (int)clamp(r0 - sb, 0L, (long)k.blk.tk);
  const int thi = (int)clamp(r1 - sb, 0L, (long)k.blk.tk);
  const int wa = max(w0, tlo / 32), wb = min(wend, (thi + 31) / 32);
  int n = 0;
  if (wa < wb) kvm_mask_fill(mrow, wa, wb, tlo, thi, LCAP, WG, words, list, &n); /* uniform */
  k.ntok = n;
  kvm_block_slots(TPASS(bi), k.blk.b, k.blk.kstart, k.h, k.blk.c, S, list, n, WG, tslot);
  return k;
}

/* MODE 3: rows of pass `pass` (ROWS of the chunk's ntok G rows, token x at rows x G ..
 * x G + G - 1); keys are the block's, numbered from its first (grp->krow0), and a row sees
 * those at or before its token's position. */
inline void kvm_rows(kvm_chunk k, int pass, int G, __local const int *list,
                     attend_group *grp, attend_rows rows) {
  const int c0 = k.blk.c * BS, nkeys = min(BS, k.blk.tk - c0);
  grp->b = k.blk.b;
  grp->krow0 = k.blk.kstart + c0;
  grp->lo = 0;
  grp->hi = nkeys;
  for (int r = get_local_id(0); r < ROWS; r += WG) {
    const int f = pass * ROWS + r, x = f / G;
    const bool ok = x < k.ntok;
    const int t = ok ? list[x] : 0;
    rows.tok[r] = ok ? k.blk.kstart + t : -1;
    rows.hq[r] = k.h * G + f - x * G;
    rows.lo[r] = 0;
    rows.hi[r] = ok ? min(nkeys, t - c0 + 1) : 0;
  }
}
#endif

/* ------------------------------------------------------------------ tiles */

/* Row of k/v (or k_cmp/v_cmp) holding key index kidx. */
inline int key_row(int kidx, int krow0, __local const int *list) {
#if MODE == 2
  const int slot = kidx / BS;
  return krow0 + list[slot] * BS + (kidx - slot * BS);
#else
  (void)list;
  return krow0 + kidx;
#endif
}

/* ------------------------------------------------------------------ warp kernels */

/* Tensor-core kernels (cl/attend_mma.cl, cl/attend_tf32.cl): does a row of this lane see
 * key index kidx? khi bounds the keys the warp walks; lo/hi are the row's range (MODE 2
 * with TPG > 1: its token's bit in the membership mask and its position + 1). */
inline bool key_visible(int kidx, int khi, int lo, int hi, __local const int *list,
                        __local const uint *msk) {
#if MODE == 2 && TPG > 1
  const int slot = min(kidx, khi - 1) / BS;
  return kidx < khi && ((msk[slot] >> lo) & 1u) != 0u && list[slot] * BS + (kidx - slot * BS) < hi;
#elif MODE == 2
  (void)lo, (void)hi, (void)list, (void)msk;
  return kidx < khi;
#else
  (void)khi, (void)list, (void)msk;
  return kidx >= lo && kidx < hi;
#endif
}

#if MODE == 2
/* Tensor-core kernels, MODE 2: row r's softmax state merged over the partial states
 * (m_w, l_w) of the WG / 32 warps: (M, L) with M = max m_w and L = sum l_w exp2(m_w - M). */
inline float2 merged_state(__local const float *part_m, __local const float *part_l, int r) {
  float M = -INFINITY, L = 0.0f;
  for (int w = 0; w < WG / 32; w++) M = fmax(M, part_m[w * 16 + r]);
  for (int w = 0; w < WG / 32; w++) {
    const float mw = part_m[w * 16 + r];
    L += mw == -INFINITY ? 0.0f : part_l[w * 16 + r] * exp2(mw - M);
  }
  return (float2)(M, L);
}
#endif
