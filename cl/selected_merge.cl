/* The last step of the kv-block-major selected attention (MODE 3 of cl/attend_mma.cl,
 * host src/selected_kvm.c): each query row (token, head) has one partial result per slot
 * of its block_indices row, computed over that slot's block alone: the output normalised
 * by its own softmax sum, o_x, and its lse_x. A row's slots that count (0 <= c <= IC(p),
 * first occurrence of c; semantics section 4) merge as
 *   lse = log sum_x exp(lse_x),  o = sum_x exp(lse_x - lse) o_x,
 * in slot order, so the result does not depend on scheduling. A row with no valid slot gets
 * o = 0 and lse = -inf, as the query-major kernels give it.
 *
 * Work-group: RPG rows x DV/4 items, item d4 of a row owns dims 4 d4 .. 4 d4 + 3 (DV is a
 * multiple of 32 on this path). The row's valid slots are found once, in local memory.
 * Partials: part_o [rows, S, DV] and part_lse [rows, S] f32 at element offsets po, pl of
 * ws, rows numbered (b TQ + t) HQ + hq; only the valid slots were written.
 */
#ifndef DV
#define DV 128
#endif
#ifndef RPG
#define RPG 4 /* rows per work-group */
#endif
#ifndef BS
#define BS 64
#endif
#define MAX_S 128 /* CLNSA_MAX_BLOCK_COUNT */

__kernel __attribute__((reqd_work_group_size(DV / 4, RPG, 1))) void selected_merge(
    CITENSOR(bi), __global const float *ws, long po, long pl, TENSOR(0, o), TENSOR(0, lse), int S,
    SEQ_ARGS) {
  __local uchar valid[RPG][MAX_S];
  const int d4 = get_local_id(0), ry = get_local_id(1);
  const long R = get_global_id(1), nrows = (long)B * TQ * HQ;
  const bool live = R < nrows;
  const long bt = live ? R / HQ : 0;
  const int hq = live ? (int)(R - bt * HQ) : 0, G = HQ / H;
  const qrow q = locate_query(cu, nseq, B, TQ, TK, (int)bt);
  const long brow = TIDX(bi, q.b, q.t, hq / G);
  const int ic = q.p / BS;
  for (int x = d4; x < S; x += DV / 4) {
    const int c = live ? bi[brow + x] : -1;
    bool first = c >= 0 && c <= ic;
    for (int y = 0; y < x && first; y++) first = bi[brow + y] != c;
    valid[ry][x] = first;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  if (!live) return;
  __global const float *lp = ws + pl + R * S;
  float M = -INFINITY;
  for (int x = 0; x < S; x++)
    if (valid[ry][x]) M = fmax(M, lp[x]);
  float L = 0.0f;
  for (int x = 0; x < S; x++)
    if (valid[ry][x] && lp[x] != -INFINITY) L += exp(lp[x] - M);
  const float lse_row = L > 0.0f ? M + log(L) : -INFINITY;
  float4 acc = (float4)(0.0f);
  __global const float *op = ws + po + R * S * DV + 4 * d4;
  for (int x = 0; x < S; x++) {
    if (!valid[ry][x] || lp[x] == -INFINITY) continue;
    const float w = exp(lp[x] - lse_row);
    acc += w * vload4(0, op + (long)x * DV);
  }
  const long oa = TIDX(o, q.b, q.t, hq) + 4 * d4;
  o[oa] = acc.x, o[oa + 1] = acc.y, o[oa + 2] = acc.z, o[oa + 3] = acc.w;
  if (d4 == 0) lse[TIDX(lse, q.b, q.t, hq)] = lse_row;
}
