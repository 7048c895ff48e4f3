/* Last steps of the backward (semantics section 7): partial sums added up in a fixed
 * order, the f32 accumulators of cl/attend_bwd.cl turned into the caller's dq, dk, dv in
 * their dtypes, and the gradients of the pooled keys sent back through the mean pooling:
 * each token of block c receives dk_cmp[c] / len(c) (and dv_cmp likewise).
 *
 * Scratch (f32, dense): dq [B*TQ*HQ, DK]; window dk/dv [B*TK*H, DK|DV]; compressed
 * dk_cmp/dv_cmp [B*NB*H, DK|DV]; selected partial sums [slots, BS, DK|DV], the slots of
 * selection-mask row h*B*NB + r being offsets[row] .. offsets[row+1]-1 (cl/select_mask.cl).
 * A work-group takes ROWS consecutive rows and its work-items walk their elements in
 * order, so neighbours touch neighbours. */
#ifndef DQ_DT
#define DQ_DT 0
#endif
#ifndef DKO_DT
#define DKO_DT 0
#endif
#ifndef DVO_DT
#define DVO_DT 0
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

__kernel void bwd_finalize_q(TENSOR(DQ_DT, dq), __global const float *ws, long acc_off,
                             long nrows, int rows, int TQ, int HQ, int DK) {
  const long row0 = (long)get_group_id(0) * rows;
  const int n = (int)min((long)rows, nrows - row0) * DK;
  for (int i = get_local_id(0); i < n; i += get_local_size(0)) {
    const long r = row0 + i / DK;
    const int d = i % DK, hq = (int)(r % HQ), t = (int)((r / HQ) % TQ), b = (int)(r / HQ / TQ);
    STORE(DQ_DT, dq, TIDX(dq, b, t, hq) + d, ws[acc_off + r * DK + d]);
  }
}

/* Gradient element e (< DK: dk, else dv) of key token row r = (b*TK + t) * H + h from the
 * selected partials, the window accumulator (has_swa) and the pooled keys (has_cmp). */
inline float key_grad(__global const float *ws, __global const int *offsets, long sel_k,
                      long sel_v, long win_k, long win_v, long cmp_k, long cmp_v, int has_swa,
                      int has_cmp, long r, int e, int BS, int DK, int DV, qrow at, int NB,
                      int B, int H, int nseq) {
  const int h = (int)(r % H), c = at.p / BS, j = at.p - c * BS;
  const long crow = (long)(nseq ? at.cstart : at.b * NB) + c;
  const long mrow = (long)h * B * NB + crow;
  const bool isk = e < DK;
  const int D = isk ? DK : DV, d = isk ? e : e - DK;
  const long sel = isk ? sel_k : sel_v;
  float x = 0.0f;
  for (int s = offsets[mrow]; s < offsets[mrow + 1]; s++) x += ws[sel + ((long)s * BS + j) * D + d];
  if (has_swa) x += ws[(isk ? win_k : win_v) + r * D + d];
  if (has_cmp) {
    const int len = min(BS, at.tk - c * BS);
    x += ws[(isk ? cmp_k : cmp_v) + (crow * H + h) * D + d] / (float)len;
  }
  return x;
}

__kernel void bwd_finalize_kv(TENSOR(DKO_DT, dk), TENSOR(DVO_DT, dv), __global const float *ws,
                              __global const int *sel, long offsets_off, long sel_k, long sel_v,
                              long win_k, long win_v, long cmp_k, long cmp_v, int has_swa,
                              int has_cmp, int rows, int BS, int DK, int DV, SEQ_ARGS) {
  const long nrows = (long)B * TK * H, row0 = (long)get_group_id(0) * rows;
  const int width = DK + DV, n = (int)min((long)rows, nrows - row0) * width;
  for (int i = get_local_id(0); i < n; i += get_local_size(0)) {
    const long r = row0 + i / width;
    const int e = i % width, h = (int)(r % H);
    const qrow at = locate_query(cu, nseq, B, TQ, TK, (int)(r / H));
    const float x = key_grad(ws, sel + offsets_off, sel_k, sel_v, win_k, win_v, cmp_k, cmp_v,
                             has_swa, has_cmp, r, e, BS, DK, DV, at, NB, B, H, nseq);
    if (e < DK)
      STORE(DKO_DT, dk, TIDX(dk, at.b, at.t, h) + e, x);
    else
      STORE(DVO_DT, dv, TIDX(dv, at.b, at.t, h) + e - DK, x);
  }
}
