/* The union of several query tokens' selected blocks, for the kernels that pack tokens
 * whose G heads fill fewer rows than a work-group holds: the forward's selected attention
 * (cl/attend_setup.cl, MODE 2 with TPG > 1) and the backward's portable selected dq
 * (cl/attend_bwd.cl, DQ_TPG > 1). Each row then masks the union to its own token's bit.
 *
 * block_union: the sorted distinct valid blocks of the lists of ntok <= 32 tokens (token u
 * at row tok0 + u of bi, position p0 + u; block size bs) into list[], and into msk[]
 * which tokens list each (bit u); returns their number. cand[] and tmpm[] (ntok * S
 * each) are scratch. wg is the work-group size. Contains barriers: call from every item.
 */
inline int block_union(CITENSOR(bi), int b, int tok0, int ntok, int p0, int h, int S, int bs,
                       int wg, __local int *list, __local uint *msk, __local int *cand,
                       __local uint *tmpm) {
  const int lid = get_local_id(0), nc = ntok * S;
  for (int i = lid; i < nc; i += wg) {
    const int u = i / S, c = bi[TIDX(bi, b, tok0 + u, h) + (i - u * S)];
    cand[i] = c >= 0 && c <= (p0 + u) / bs ? c : -1;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int i = lid; i < nc; i += wg) { /* first occurrence of each block: all its tokens */
    const int c = cand[i];
    uint m = 0u;
    bool first = true;
    for (int u = 0; u < ntok; u++) {
      const uint bit = 1u << u;
      for (int j = u * S; j < u * S + S; j++) {
        const int cj = cand[j];
        if (cj == c) {
          m |= bit;
          if (j < i) first = false;
        }
      }
    }
    tmpm[i] = c >= 0 && first ? m : 0u;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int i = lid; i < nc; i += wg) { /* rank = number of smaller kept blocks */
    const uint m = tmpm[i];
    if (m == 0u) continue;
    const int c = cand[i];
    int rank = 0;
    for (int j = 0; j < nc; j++) rank += tmpm[j] != 0u && cand[j] < c;
    list[rank] = c;
    msk[rank] = m;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  /* counted after the last barrier: PoCL lost a count made before it (2026-11-28: the
   * backward's packed dq saw 0 blocks where the same count printed 2) */
  int n = 0;
  for (int j = 0; j < nc; j++) n += tmpm[j] != 0u;
  return n;
}
