/* Mean pooling: k_cmp[c] = mean of k over block c (true length), same for v.
 * One work-group per (compressed row, kv head); its work-items stride over the head
 * dimension, so each token's row is read once, coalesced. */
#ifndef K_DT
#define K_DT 0
#endif
#ifndef V_DT
#define V_DT 0
#endif
#ifndef KC_DT
#define KC_DT 0
#endif
#ifndef VC_DT
#define VC_DT 0
#endif
#ifndef BS
#define BS 64
#endif
#ifndef DK
#define DK 64
#endif
#ifndef DV
#define DV 64
#endif

__kernel void pool_mean(CTENSOR(K_DT, k), CTENSOR(V_DT, v), TENSOR(KC_DT, kc),
                        TENSOR(VC_DT, vc), SEQ_ARGS) {
  const int r = get_group_id(0), h = get_group_id(1), lid = get_local_id(0);
  const crow blk = locate_block(cu, nseq, NB, TK, r);
  const int j0 = blk.c * BS;
  const int len = min(BS, blk.tk - j0);
  const float inv = 1.0f / (float)len;
  for (int d = lid; d < DK + DV; d += get_local_size(0)) {
    float acc = 0.0f;
    if (d < DK) {
      for (int j = 0; j < len; j++) acc += LOAD(K_DT, k, TIDX(k, blk.b, blk.kstart + j0 + j, h) + d);
      STORE(KC_DT, kc, TIDX(kc, blk.b, r - (nseq ? 0 : blk.b * NB), h) + d, acc * inv);
    } else {
      const int e = d - DK;
      for (int j = 0; j < len; j++) acc += LOAD(V_DT, v, TIDX(v, blk.b, blk.kstart + j0 + j, h) + e);
      STORE(VC_DT, vc, TIDX(vc, blk.b, r - (nseq ? 0 : blk.b * NB), h) + e, acc * inv);
    }
  }
}
