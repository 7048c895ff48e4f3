/* The rows of a kv-block-major group (small G: the forward's selected attention, MODE 3 of
 * cl/attend_mma.cl, and the backward's bwd_dq_selected_kvm_mma): which tokens selected
 * its block (a selection-mask row, cl/select_mask.cl), and in which slot of their
 * block_indices rows. Both are waits on global memory before any matrix work, paid once
 * per list of tokens, so each helper keeps many loads in flight at once. */

/* Bits of mask word w for the tokens in [tlo, thi). */
inline uint kvm_token_bits(int w, int tlo, int thi) {
  const int a = clamp(tlo - 32 * w, 0, 32), e = clamp(thi - 32 * w, 0, 32);
  const uint below_e = e == 32 ? ~0u : (1u << e) - 1u, below_a = a == 32 ? ~0u : (1u << a) - 1u;
  return below_e & ~below_a;
}

/* Appends to list[*n ..] the tokens of mask words w, w + 1, ... (bit x of word i: token
 * 32 i + x selected the block) that lie in [tlo, thi), in increasing order, a round of
 * `round` words (one per item; words[] holds them) at a time, while whole words fit `cap`
 * entries and words remain before wend. Returns the first word not taken (wend when all
 * were). Items 0 .. round - 1 must exist; starts and ends with a barrier. Rounds of many
 * words, each filling the list as far as it goes, replace windows of a fixed few words:
 * a block that few tokens chose spreads them thinly over its mask row, and a window of
 * 16 words then held a handful of tokens for a whole load latency. */
inline __attribute__((always_inline)) int kvm_mask_fill(__global const uint *mrow, int w, int wend,
                                                        int tlo, int thi, int cap, int round,
                                                        __local uint *words, __local int *list,
                                                        int *n) {
  const int lid = get_local_id(0);
  for (;;) {
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous round's words consumed */
    if (lid < round)
      words[lid] = w + lid < wend ? mrow[w + lid] & kvm_token_bits(w + lid, tlo, thi) : 0u;
    barrier(CLK_LOCAL_MEM_FENCE);
    const int room = cap - *n, last = min(round, wend - w);
    int before = 0, run = 0, taken = 0, added = 0;
    for (int i = 0; i < last; i++) { /* the longest prefix of whole words that fits */
      const int c = (int)popcount(words[i]);
      before += i < lid ? c : 0;
      run += c;
      if (run <= room && taken == i) taken = i + 1, added = run;
    }
    if (lid < taken) {
      const uint bits = words[lid];
      for (int x = 0; x < 32; x++)
        if ((bits >> x) & 1u) list[*n + before++] = (w + lid) * 32 + x;
    }
    *n += added;
    w += taken;
    if (w >= wend || taken < round) break; /* uniform over the group */
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  return w;
}

/* tslot[x] = the first slot s < S of token t0 + list[x]'s block_indices row (batch b, kv
 * head h) that names block c, for x < n (S - 1 where none; the masks come from these
 * rows, so there is always one); wg is the work-group size. Each item takes two tokens
 * at a time with eight entries of each in flight: one (token, slot) an item behind a
 * local atomic_min issued them one latency after another (a chunk of ~500 tokens at
 * S = 16: ~68 dependent loads an item). Ends with a barrier. */
inline __attribute__((always_inline)) void kvm_block_slots(CITENSOR(bi), int b, int t0, int h,
                                                           int c, int S, __local const int *list,
                                                           int n, int wg, __local int *tslot) {
  const int lid = get_local_id(0);
  for (int x0 = lid; x0 < n; x0 += 2 * wg) {
    long row[2];
    int found[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
      const int x = x0 + u * wg;
      row[u] = x < n ? TIDX(bi, b, t0 + list[x], h) : -1;
      found[u] = S - 1;
    }
    for (int s0 = 0; s0 < S; s0 += 8) {
      int e[2][8];
#pragma unroll
      for (int u = 0; u < 2; u++) {
#pragma unroll
        for (int j = 0; j < 8; j++) e[u][j] = row[u] >= 0 && s0 + j < S ? bi[row[u] + s0 + j] : -1;
      }
#pragma unroll
      for (int u = 0; u < 2; u++) {
#pragma unroll
        for (int j = 7; j >= 0; j--)
          if (e[u][j] == c) found[u] = min(found[u], s0 + j);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; u++)
      if (x0 + u * wg < n) tslot[x0 + u * wg] = found[u];
  }
  barrier(CLK_LOCAL_MEM_FENCE);
}
