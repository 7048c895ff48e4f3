/* First step of the backward (semantics section 7): per query row (b, t, hq), for each
 * branch x that ran,
 *   dg_x = sum_d do * o_x          (written to the caller's dg_x when given)
 *   gate_x = g_x (1 for an absent g_slc),  delta_x = gate_x * dg_x = dO_x . o_x
 * into f32 scratch [3][B*TQ*HQ] (branch 0 selected, 1 compressed, 2 window), which the
 * attention backward (cl/attend_bwd.cl) reads to form dO_x = gate_x * do on the fly.
 * dg_swa of a window branch that did not run (W = 0) is 0.
 *
 * A work-group of GG_WG work-items (64 on CPUs, 128 elsewhere) takes GG_WG / LANES rows,
 * LANES work-items a row (a power of two up to 8, about DV / VECW: the host's choice; up
 * to 32 lanes, one vector each, spent longer in the tree's barriers than in the loads:
 * H100, 64k G = 16, 2.96 ms against 2.40 for the scalar kernel it replaced). A work-item finds its row's
 * (b, t, hq) and offsets once, then walks the row in vectors of VECW consecutive
 * elements, lane l taking vectors l, l + LANES, ... (neighbouring lanes read neighbouring
 * vectors), summing products per vector component; the components are then added in a
 * fixed order (VSUM) and the lanes as a fixed tree. VECW = 4 (4-element loads) where
 * the host found DV a multiple of 4 and every row of do and the branch outputs starting
 * at a multiple of 4 elements (src/backward.c, plan_kernels); else VECW = 1, one
 * element per step, any strides. */
#ifndef DO_DT
#define DO_DT 0
#endif
#ifndef GC_DT
#define GC_DT 0
#endif
#ifndef GS_DT
#define GS_DT 0
#endif
#ifndef GW_DT
#define GW_DT 0
#endif
#ifndef DGC_DT
#define DGC_DT 0
#endif
#ifndef DGS_DT
#define DGS_DT 0
#endif
#ifndef DGW_DT
#define DGW_DT 0
#endif
#ifndef DV
#define DV 64
#endif
#ifndef VECW
#define VECW 1
#endif
#ifndef LANES
#define LANES 16
#endif
#ifndef GG_WG
#define GG_WG 64
#endif
#define GG_ROWS (GG_WG / LANES)

/* flags */
#define F_CMP 1  /* the compressed branch ran (g_cmp given) */
#define F_SWA 2  /* the window branch ran (W > 0, g_swa given) */
#define F_GSLC 4 /* g_slc given */
#define F_DGC 8  /* dg_cmp requested */
#define F_DGS 16 /* dg_slc requested */
#define F_DGW 32 /* dg_swa requested */

__kernel __attribute__((reqd_work_group_size(GG_WG, 1, 1))) void bwd_gate_grads(
    CTENSOR(DO_DT, dout), CTENSOR(0, os), CTENSOR(0, oc), CTENSOR(0, ow), CTENSOR(GS_DT, gs),
    CTENSOR(GC_DT, gc), CTENSOR(GW_DT, gw), TENSOR(DGS_DT, dgs), TENSOR(DGC_DT, dgc),
    TENSOR(DGW_DT, dgw), __global float *ws, long gate_off, long delta_off, long nrows, int flags,
    int TQ, int HQ) {
  __local float red[3][GG_WG];
  const int lid = get_local_id(0), lane = lid % LANES;
  const long row = (long)get_group_id(0) * GG_ROWS + lid / LANES;
  int bt = 0, hq = 0;
  if (row < nrows) hq = row_split(row, HQ, &bt);
  const int b = bt / TQ, t = bt - b * TQ;
  VFLOAT(VECW) s = 0.0f, c = 0.0f, w = 0.0f;
  if (row < nrows) {
    const long at_d = TIDX(dout, b, t, hq), at_s = TIDX(os, b, t, hq);
    const long at_c = TIDX(oc, b, t, hq), at_w = TIDX(ow, b, t, hq);
    for (int d = lane * VECW; d < DV; d += LANES * VECW) {
      const VFLOAT(VECW) x = LOADV(VECW, DO_DT, dout, at_d + d);
      s += x * LOADV(VECW, 0, os, at_s + d);
      if (flags & F_CMP) c += x * LOADV(VECW, 0, oc, at_c + d);
      if (flags & F_SWA) w += x * LOADV(VECW, 0, ow, at_w + d);
    }
  }
  red[0][lid] = VSUM(VECW, s);
  red[1][lid] = VSUM(VECW, c);
  red[2][lid] = VSUM(VECW, w);
  for (int step = LANES / 2; step > 0; step /= 2) {
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lane < step)
      for (int x = 0; x < 3; x++) red[x][lid] += red[x][lid + step];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  if (row >= nrows || lane != 0) return;
  const float ss = red[0][lid], cs = red[1][lid], wsum = red[2][lid];
  const float g = (flags & F_GSLC) ? LOAD(GS_DT, gs, TIDX(gs, b, t, hq)) : 1.0f;
  ws[gate_off + row] = g;
  ws[delta_off + row] = g * ss;
  if (flags & F_CMP) {
    const float gx = LOAD(GC_DT, gc, TIDX(gc, b, t, hq));
    ws[gate_off + nrows + row] = gx;
    ws[delta_off + nrows + row] = gx * cs;
  }
  if (flags & F_SWA) {
    const float gx = LOAD(GW_DT, gw, TIDX(gw, b, t, hq));
    ws[gate_off + 2 * nrows + row] = gx;
    ws[delta_off + 2 * nrows + row] = gx * wsum;
  }
  if (flags & F_DGS) STORE(DGS_DT, dgs, TIDX(dgs, b, t, hq), ss);
  if (flags & F_DGC) STORE(DGC_DT, dgc, TIDX(dgc, b, t, hq), cs);
  if (flags & F_DGW) STORE(DGW_DT, dgw, TIDX(dgw, b, t, hq), wsum);
}
