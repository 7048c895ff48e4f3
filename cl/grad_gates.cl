/* First step of the backward (semantics section 7): per query row (b, t, hq), for each
 * branch x that ran,
 *   dg_x = sum_d do * o_x          (written to the caller's dg_x when given)
 *   gate_x = g_x (1 for an absent g_slc),  delta_x = gate_x * dg_x = dO_x . o_x
 * into f32 scratch [3][B*TQ*HQ] (branch 0 selected, 1 compressed, 2 window), which the
 * attention backward (cl/attend_bwd.cl) reads to form dO_x = gate_x * do on the fly.
 * dg_swa of a window branch that did not run (W = 0) is 0.
 *
 * A work-group of 64 work-items takes 4 rows, 16 lanes per row striding over DV (so
 * neighbouring lanes read neighbouring elements), and sums the lanes as a fixed tree. */
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
#define LANES 16
#define GG_WG 64
#define GG_ROWS (GG_WG / LANES)

/* flags */
#define F_CMP 1   /* the compressed branch ran (g_cmp given) */
#define F_SWA 2   /* the window branch ran (W > 0, g_swa given) */
#define F_GSLC 4  /* g_slc given */
#define F_DGC 8   /* dg_cmp requested */
#define F_DGS 16  /* dg_slc requested */
#define F_DGW 32  /* dg_swa requested */

__kernel __attribute__((reqd_work_group_size(GG_WG, 1, 1))) void bwd_gate_grads(
    CTENSOR(DO_DT, dout), CTENSOR(0, os), CTENSOR(0, oc), CTENSOR(0, ow), CTENSOR(GS_DT, gs),
    CTENSOR(GC_DT, gc), CTENSOR(GW_DT, gw), TENSOR(DGS_DT, dgs), TENSOR(DGC_DT, dgc),
    TENSOR(DGW_DT, dgw), __global float *ws, long gate_off, long delta_off, long nrows,
    int flags, int TQ, int HQ, int DV) {
  __local float red[3][GG_WG];
  const int lid = get_local_id(0), lane = lid % LANES;
  const long row = (long)get_group_id(0) * GG_ROWS + lid / LANES;
  const int hq = (int)(row % HQ), t = (int)((row / HQ) % TQ), b = (int)(row / HQ / TQ);
  float s = 0.0f, c = 0.0f, w = 0.0f;
  if (row < nrows) {
    for (int d = lane; d < DV; d += LANES) {
      const float x = LOAD(DO_DT, dout, TIDX(dout, b, t, hq) + d);
      s += x * os[TIDX(os, b, t, hq) + d];
      if (flags & F_CMP) c += x * oc[TIDX(oc, b, t, hq) + d];
      if (flags & F_SWA) w += x * ow[TIDX(ow, b, t, hq) + d];
    }
  }
  red[0][lid] = s;
  red[1][lid] = c;
  red[2][lid] = w;
  for (int step = LANES / 2; step > 0; step /= 2) {
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lane < step)
      for (int x = 0; x < 3; x++) red[x][lid] += red[x][lid + step];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  if (row >= nrows || lane != 0) return;
  s = red[0][lid];
  c = red[1][lid];
  w = red[2][lid];
  const float g = (flags & F_GSLC) ? LOAD(GS_DT, gs, TIDX(gs, b, t, hq)) : 1.0f;
  ws[gate_off + row] = g;
  ws[delta_off + row] = g * s;
  if (flags & F_CMP) {
    const float gx = LOAD(GC_DT, gc, TIDX(gc, b, t, hq));
    ws[gate_off + nrows + row] = gx;
    ws[delta_off + nrows + row] = gx * c;
  }
  if (flags & F_SWA) {
    const float gx = LOAD(GW_DT, gw, TIDX(gw, b, t, hq));
    ws[gate_off + 2 * nrows + row] = gx;
    ws[delta_off + 2 * nrows + row] = gx * w;
  }
  if (flags & F_DGS) STORE(DGS_DT, dgs, TIDX(dgs, b, t, hq), s);
  if (flags & F_DGC) STORE(DGC_DT, dgc, TIDX(dgc, b, t, hq), c);
  if (flags & F_DGW) STORE(DGW_DT, dgw, TIDX(dgw, b, t, hq), w);
}
