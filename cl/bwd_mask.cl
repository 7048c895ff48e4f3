/* Shared by the selected branch's backward kernels, portable (cl/attend_bwd.cl) and on
 * tensor cores (cl/attend_bwd_mma.cl); prepended to either by src/backward.c: the
 * selection list of a query (dq) and the expansion of a block's selection mask (dk/dv). */
#ifndef MASK_WORDS
#define MASK_WORDS 16 /* selection-mask words expanded at once; at most the work-group size */
#endif

/* Expands words [w0, min(w0 + MASK_WORDS, wend)) of a selection-mask row (bit x of word w:
 * token 32 w + x selected the block) into list[], in increasing token order; returns the
 * count. Starts and ends with a barrier. */
inline int mask_expand(__global const uint *mrow, int w0, int wend, __local uint *words,
                       __local int *list) {
  const int lid = get_local_id(0);
  barrier(CLK_LOCAL_MEM_FENCE); /* the previous list consumed */
  if (lid < MASK_WORDS) words[lid] = w0 + lid < wend ? mrow[w0 + lid] : 0u;
  barrier(CLK_LOCAL_MEM_FENCE);
  int before = 0, n = 0;
  for (int w = 0; w < MASK_WORDS; w++) {
    const int c = (int)popcount(words[w]);
    before += w < lid ? c : 0;
    n += c;
  }
  if (lid < MASK_WORDS) {
    const uint bits = words[lid];
    for (int x = 0; x < 32; x++)
      if ((bits >> x) & 1u) list[before++] = (w0 + lid) * 32 + x;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return n;
}

/* The valid blocks (0 <= c <= ic) of one (token, kv head) selection row, deduplicated,
 * in first occurrence order, into blist[]; returns their number. raw and keep hold S ints
 * each; wg is the work-group size. Contains barriers (call from every item); ends with one. */
inline int selection_rows(__global const int *row, int S, int ic, __local int *raw,
                          __local int *keep, __local int *blist, int wg) {
  const int lid = get_local_id(0);
  for (int s = lid; s < S; s += wg) raw[s] = row[s];
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = lid; s < S; s += wg) {
    const int c = raw[s];
    int k = c >= 0 && c <= ic;
    for (int x = 0; x < s && k; x++) k = raw[x] != c;
    keep[s] = k;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  int n = 0;
  for (int s = 0; s < S; s++) {
    if (keep[s] && (s % wg) == lid) blist[n] = raw[s];
    n += keep[s];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return n;
}
