/* The last step of the kv-block-major selected kernels: each query row (token, head) has
 * one partial result per slot of its block_indices row, computed over that slot's block
 * alone. The slots that count (0 <= c <= IC(p), first occurrence of c; semantics section
 * 4) are merged in slot order, so the result does not depend on scheduling; only they
 * were written.
 *  - selected_merge (forward: MODE 3 of cl/attend_mma.cl, host src/selected_kvm.c): o_x,
 *    the output normalised by its own softmax sum, and lse_x give
 *      lse = log sum_x exp(lse_x),  o = sum_x exp(lse_x - lse) o_x;
 *    a row with no valid slot gets o = 0 and lse = -inf, as the query-major kernels give.
 *  - bwd_dq_merge (backward: bwd_dq_selected_kvm_mma of cl/attend_bwd_mma.cl): dq is the
 *    sum of the slots' dq (0 for a row with none), written as the dq accumulator.
 *
 * Work-group: RPG rows x WIDTH/4 items, item d4 of a row owns dims 4 d4 .. 4 d4 + 3 (WIDTH,
 * DV or DK, is a multiple of 32 on these paths). The row's valid slots are found once, in
 * local memory. Partials: [rows, S, WIDTH] (and the forward's lse [rows, S]) f32 at
 * element offsets of ws, rows numbered (b TQ + t) HQ + hq from a pass's first, R0.
 */
#ifndef WIDTH
#define WIDTH 128
#endif
#define DV WIDTH
#ifndef RPG
#define RPG 4 /* rows per work-group */
#endif
#ifndef BS
#define BS 64
#endif
#define MAX_S 128 /* CLNSA_MAX_BLOCK_COUNT */
#define TPASS(t) t, t##_off, t##_s0, t##_s1, t##_s2

/* valid[x] for row R's slots (R past the rows: none); returns the row's query. Contains a
 * barrier: call from every item. */
inline qrow merge_slots(CITENSOR(bi), long R, int S, __local uchar *valid, SEQ_ARGS) {
  const bool live = R < (long)B * TQ * HQ;
  const long bt = live ? R / HQ : 0;
  const int hq = live ? (int)(R - bt * HQ) : 0;
  const qrow q = locate_query(cu, nseq, B, TQ, TK, (int)bt);
  const long brow = TIDX(bi, q.b, q.t, hq / (HQ / H));
  const int ic = q.p / BS;
  for (int x = get_local_id(0); x < S; x += WIDTH / 4) {
    const int c = live ? bi[brow + x] : -1;
    bool first = c >= 0 && c <= ic;
    for (int y = 0; y < x && first; y++) first = bi[brow + y] != c;
    valid[x] = first;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return q;
}

/* Rows R0 .. R0 + nrows - 1 (one pass of the kv-block-major forward: partial row R - R0). */
__kernel __attribute__((reqd_work_group_size(DV / 4, RPG, 1))) void selected_merge(
    CITENSOR(bi), __global const float *ws, long po, long pl, TENSOR(0, o), TENSOR(0, lse), int S,
    long R0, long nrows, SEQ_ARGS) {
  __local uchar valid_all[RPG][MAX_S];
  __local uchar *valid = valid_all[get_local_id(1)];
  const int d4 = get_local_id(0);
  const long i = get_global_id(1), R = i < nrows ? R0 + i : (long)B * TQ * HQ; /* else none */
  const qrow q = merge_slots(TPASS(bi), R, S, valid, SEQ_PASS);
  if (R >= (long)B * TQ * HQ) return;
  const int hq = (int)(R % HQ);
  __global const float *lp = ws + pl + i * S;
  float M = -INFINITY;
  for (int x = 0; x < S; x++)
    if (valid[x]) M = fmax(M, lp[x]);
  float L = 0.0f;
  for (int x = 0; x < S; x++)
    if (valid[x] && lp[x] != -INFINITY) L += exp(lp[x] - M);
  const float lse_row = L > 0.0f ? M + log(L) : -INFINITY;
  float4 acc = (float4)(0.0f);
  __global const float *op = ws + po + i * S * DV + 4 * d4;
  for (int x = 0; x < S; x++) {
    if (!valid[x] || lp[x] == -INFINITY) continue;
    const float w = exp(lp[x] - lse_row);
    acc += w * vload4(0, op + (long)x * DV);
  }
  const long oa = TIDX(o, q.b, q.t, hq) + 4 * d4;
  o[oa] = acc.x, o[oa + 1] = acc.y, o[oa + 2] = acc.z, o[oa + 3] = acc.w;
  if (d4 == 0) lse[TIDX(lse, q.b, q.t, hq)] = lse_row;
}

/* Rows R0 .. R0 + nrows - 1 (one pass of the kv-block-major dq: partial row R - R0). */
__kernel __attribute__((reqd_work_group_size(WIDTH / 4, RPG, 1))) void bwd_dq_merge(
    CITENSOR(bi), __global float *ws, long part, long dq, int S, long R0, long nrows, SEQ_ARGS) {
  __local uchar valid_all[RPG][MAX_S];
  __local uchar *valid = valid_all[get_local_id(1)];
  const long i = get_global_id(1), R = i < nrows ? R0 + i : (long)B * TQ * HQ; /* else none */
  (void)merge_slots(TPASS(bi), R, S, valid, SEQ_PASS);
  if (R >= (long)B * TQ * HQ) return;
  __global const float *pp = ws + part + i * S * WIDTH + 4 * get_local_id(0);
  float4 acc = (float4)(0.0f);
  for (int x = 0; x < S; x++)
    if (valid[x]) acc += vload4(0, pp + (long)x * WIDTH);
  vstore4(acc, 0, ws + dq + R * WIDTH + 4 * get_local_id(0));
}
