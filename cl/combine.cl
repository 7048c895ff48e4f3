/* Gated combination of the three branches (semantics section 6):
 *   o = (g_slc or 1) * o_slc + g_cmp * o_cmp + g_swa * o_swa
 * A term is present only when its gate is: -DHAS_GCMP, -DHAS_GSLC, -DHAS_GSWA (the host
 * leaves HAS_GSWA out when the window is off). Branch outputs are f32 intermediates;
 * the gates and o have their own dtypes.
 *
 * A work-group of LANES x RPG work-items takes RPG consecutive rows (b, t, hq), LANES
 * work-items a row: each finds its row's (b, t, hq), element offsets and gates once,
 * then walks the row in vectors of VECW consecutive elements, lane l taking vectors l,
 * l + LANES, ..., so neighbouring work-items touch neighbouring vectors. VECW = 4 (float4
 * loads of the f32 branches, 4-element words of o) where the host found DV a multiple
 * of 4 and every row of o and of the branch outputs starting at a multiple of 4 elements
 * (combine_prepare); else VECW = 1, one element per step, any strides. */
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
#ifndef VECW
#define VECW 1
#endif
#define NV (DV / VECW) /* vectors a row */
#ifndef LANES
#define LANES NV
#endif
#ifndef RPG
#define RPG 1
#endif

__kernel __attribute__((reqd_work_group_size(LANES * RPG, 1, 1))) void combine_gated(
    TENSOR(O_DT, o), CTENSOR(0, os), CTENSOR(0, oc), CTENSOR(0, ow), CTENSOR(GS_DT, gs),
    CTENSOR(GC_DT, gc), CTENSOR(GW_DT, gw), int TQ, int HQ, long nrows) {
  const int lane = get_local_id(0) % LANES;
  const long r = (long)get_group_id(0) * RPG + get_local_id(0) / LANES;
  if (r >= nrows) return;
  int bt;
  const int hq = row_split(r, HQ, &bt), b = bt / TQ, t = bt - b * TQ;
  const long at_o = TIDX(o, b, t, hq), at_s = TIDX(os, b, t, hq);
#ifdef HAS_GSLC
  const float g_s = LOAD(GS_DT, gs, TIDX(gs, b, t, hq));
#endif
#ifdef HAS_GCMP
  const float g_c = LOAD(GC_DT, gc, TIDX(gc, b, t, hq));
  const long at_c = TIDX(oc, b, t, hq);
#endif
#ifdef HAS_GSWA
  const float g_w = LOAD(GW_DT, gw, TIDX(gw, b, t, hq));
  const long at_w = TIDX(ow, b, t, hq);
#endif
  for (int v = lane; v < NV; v += LANES) {
    const int d = v * VECW;
    /* the scalar expression, lane by lane: same products and sums in the same order */
    VFLOAT(VECW) acc = LOADV(VECW, 0, os, at_s + d);
#ifdef HAS_GSLC
    acc *= g_s;
#endif
#ifdef HAS_GCMP
    acc += g_c * LOADV(VECW, 0, oc, at_c + d);
#endif
#ifdef HAS_GSWA
    acc += g_w * LOADV(VECW, 0, ow, at_w + d);
#endif
    STOREV(VECW, O_DT, o, at_o + d, acc);
  }
}
