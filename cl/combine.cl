/* Gated combination of the three branches (semantics section 6):
 *   o = (g_slc or 1) * o_slc + g_cmp * o_cmp + g_swa * o_swa
 * A term is present only when its gate is: -DHAS_GCMP, -DHAS_GSLC, -DHAS_GSWA (the host
 * leaves HAS_GSWA out when the window is off). Branch outputs are f32 intermediates;
 * the gates and o have their own dtypes.
 *
 * One work-group per block of ROWS consecutive rows (b, t, hq); its work-items walk the
 * ROWS x DV elements of the block in order, so neighbouring work-items touch
 * neighbouring elements of d whatever DV is. */
#ifndef O_DT
#define O_DT 0
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
#ifndef DV
#define DV 64
#endif
#ifndef ROWS
#define ROWS 4
#endif

__kernel void combine_gated(TENSOR(O_DT, o), CTENSOR(0, os), CTENSOR(0, oc), CTENSOR(0, ow),
                            CTENSOR(GS_DT, gs), CTENSOR(GC_DT, gc), CTENSOR(GW_DT, gw),
                            int TQ, int HQ, long nrows) {
  const long row0 = (long)get_group_id(0) * ROWS;
  const int nloc = (int)min((long)ROWS, nrows - row0) * DV;
  for (int i = get_local_id(0); i < nloc; i += get_local_size(0)) {
    const long r = row0 + i / DV;
    const int d = i % DV;
    const int hq = (int)(r % HQ);
    const long bt = r / HQ;
    const int t = (int)(bt % TQ), b = (int)(bt / TQ);
    float acc = os[TIDX(os, b, t, hq) + d];
#ifdef HAS_GSLC
    acc *= LOAD(GS_DT, gs, TIDX(gs, b, t, hq));
#endif
#ifdef HAS_GCMP
    acc += LOAD(GC_DT, gc, TIDX(gc, b, t, hq)) * oc[TIDX(oc, b, t, hq) + d];
#endif
#ifdef HAS_GSWA
    acc += LOAD(GW_DT, gw, TIDX(gw, b, t, hq)) * ow[TIDX(ow, b, t, hq) + d];
#endif
    STORE(O_DT, o, TIDX(o, b, t, hq) + d, acc);
  }
}
