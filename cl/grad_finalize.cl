/* Last steps of the backward (semantics section 7): partial sums added up in a fixed
 * order, the f32 accumulators of cl/attend_bwd.cl turned into the caller's dq, dk, dv in
 * their dtypes, and the gradients of the pooled keys sent back through the mean pooling:
 * each token of block c receives dk_cmp[c] / len(c) (and dv_cmp likewise).
 *
 * Scratch (f32, dense): dq [B*TQ*HQ, DK]; window dk/dv [B*TK*H, DK|DV]; compressed
 * dk_cmp/dv_cmp [B*NB*H, DK|DV]; selected partial sums [slots, BS, DK|DV], the slots of
 * selection-mask row h*B*NB + r being offsets[row] .. offsets[row+1]-1 (cl/select_mask.cl).
 *
 * bwd_finalize_q and bwd_finalize_kv: a work-group of LANES x RPG work-items takes RPG
 * consecutive rows, LANES work-items a row (Q_ for dq rows of DK elements, KV_ for key
 * rows of DK + DV elements: dk then dv). A work-item locates its row once (its
 * (b, t, head), for a key row its block, slot range and block length), then walks the
 * row in vectors of VECW consecutive elements, lane l taking vectors l, l + LANES, ...,
 * so neighbouring work-items touch neighbouring vectors. VECW_Q / VECW_KV = 4 (float4
 * loads of the scratch, 4-element words of the outputs; a vector never straddles dk and
 * dv) where the host found the head dims multiples of 4, the scratch starting at a
 * multiple of 4 elements and every output row too (plan_kernels); else 1, one element
 * per step, any strides. */
#ifndef DQ_DT
#define DQ_DT 0
#endif
#ifndef DKO_DT
#define DKO_DT 0
#endif
#ifndef DVO_DT
#define DVO_DT 0
#endif
#ifndef DK
#define DK 64
#endif
#ifndef DV
#define DV 64
#endif
#ifndef VECW_Q
#define VECW_Q 1
#endif
#ifndef Q_LANES
#define Q_LANES (DK / VECW_Q)
#endif
#ifndef Q_RPG
#define Q_RPG 1
#endif
#ifndef VECW_KV
#define VECW_KV 1
#endif
#ifndef KV_LANES
#define KV_LANES ((DK + DV) / VECW_KV)
#endif
#ifndef KV_RPG
#define KV_RPG 1
#endif

/* out[i] = sum over c < chunks of part[c * n + i], c increasing. */
__kernel void bwd_reduce_chunks(__global float *ws, long part_off, long out_off, long n,
                                int chunks) {
  const long i = get_global_id(0);
  if (i >= n) return;
  float x = 0.0f;
  for (int c = 0; c < chunks; c++) x += ws[part_off + c * n + i];
  ws[out_off + i] = x;
}

__kernel __attribute__((reqd_work_group_size(Q_LANES * Q_RPG, 1, 1))) void bwd_finalize_q(
    TENSOR(DQ_DT, dq), __global const float *ws, long acc_off, long nrows, int TQ, int HQ) {
  const int lane = get_local_id(0) % Q_LANES;
  const long r = (long)get_group_id(0) * Q_RPG + get_local_id(0) / Q_LANES;
  if (r >= nrows) return;
  int bt;
  const int hq = row_split(r, HQ, &bt), b = bt / TQ, t = bt - b * TQ;
  const long at = TIDX(dq, b, t, hq), src = acc_off + r * DK;
  for (int d = lane * VECW_Q; d < DK; d += Q_LANES * VECW_Q)
    STOREV(VECW_Q, DQ_DT, dq, at + d, LOADV(VECW_Q, 0, ws, src + d));
}

/* Key token row r = (b*TK + t) * H + h: each gradient element (dk, then dv) is the sum of
 * the selected partials of its block's slots (in slot order), then the window
 * accumulator (has_swa), then the pooled key's gradient over the block length
 * (has_cmp). */
__kernel __attribute__((reqd_work_group_size(KV_LANES * KV_RPG, 1, 1))) void bwd_finalize_kv(
    TENSOR(DKO_DT, dk), TENSOR(DVO_DT, dv), __global const float *ws, __global const int *sel,
    long offsets_off, long sel_k, long sel_v, long win_k, long win_v, long cmp_k, long cmp_v,
    int has_swa, int has_cmp, int BS, SEQ_ARGS) {
  const int lane = get_local_id(0) % KV_LANES;
  const long r = (long)get_group_id(0) * KV_RPG + get_local_id(0) / KV_LANES;
  if (r >= (long)B * TK * H) return;
  int bt;
  const int h = row_split(r, H, &bt);
  const qrow at = locate_query(cu, nseq, B, TQ, TK, bt);
  const int c = at.p / BS, j = at.p - c * BS;
  const long crow = (long)(nseq ? at.cstart : at.b * NB) + c;
  __global const int *offsets = sel + offsets_off;
  const long mrow = (long)h * B * NB + crow;
  const int s0 = offsets[mrow], s1 = offsets[mrow + 1];
  const float len = (float)min(BS, at.tk - c * BS);
  const long at_k = TIDX(dk, at.b, at.t, h), at_v = TIDX(dv, at.b, at.t, h);
  for (int e = lane * VECW_KV; e < DK + DV; e += KV_LANES * VECW_KV) {
    const bool isk = e < DK;
    const int D = isk ? DK : DV, d = isk ? e : e - DK;
    /* slot s of the partials: [s][j][d] */
    const long part = (isk ? sel_k : sel_v) + (long)j * D + d, slot = (long)BS * D;
    VFLOAT(VECW_KV) x = 0.0f;
    for (int s = s0; s < s1; s++) x += LOADV(VECW_KV, 0, ws, part + s * slot);
    if (has_swa) x += LOADV(VECW_KV, 0, ws, (isk ? win_k : win_v) + r * D + d);
    if (has_cmp) x += LOADV(VECW_KV, 0, ws, (isk ? cmp_k : cmp_v) + (crow * H + h) * D + d) / len;
    if (isk)
      STOREV(VECW_KV, DKO_DT, dk, at_k + d, x);
    else
      STOREV(VECW_KV, DVO_DT, dv, at_v + d, x);
  }
}
