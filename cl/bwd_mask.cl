/* Shared by the selected branch's backward kernels, portable (cl/attend_bwd.cl) and on
 * tensor cores (cl/attend_bwd_mma.cl); prepended to either by src/backward.c. */
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
