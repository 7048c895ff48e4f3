/* The selection turned around, for the kernels that walk selected attention block by
 * block (the backward's dk/dv, and with small G its dq and the forward: host
 * src/select_mask.c): for each kv head and block, which tokens selected it (positions =
 * token indices: full sequences only), as a bit mask, then cut into
 * chunks of similar size so that a block every token selects (block 0 always is) is
 * shared among work-groups. Integer work only (a column's bits set by its own item's
 * atomic_or, for latency, not sharing; OR commutes): the result does not depend on
 * scheduling.
 *
 * mask [H*B*NB, NCH] u32, NCH = ceil(longest sequence / 32). Row h*B*NB + r belongs to kv
 * head h and compressed row r (block c of its sequence); bit x of word w is set when token
 * 32 w + x of that sequence lists c among its valid blocks (0 <= c <= IC(p)).
 *
 * Chunks of a row: runs of whole words, each closed as soon as it holds at least
 * chunk_tokens tokens (the last may hold fewer). counts[row] = number of chunks; offsets =
 * exclusive prefix sum of counts (the slots of row r are offsets[r] .. offsets[r+1]-1);
 * slot_row[slot], slot_word[slot] = the row and first word of each chunk. Over all rows
 * there are at most H*B*TQ*S/chunk_tokens + H*B*NB slots.
 */
#ifndef SCAN_WG
#define SCAN_WG 256 /* select_chunk_scan's work-group: the host may lower it */
#endif
#ifndef CHUNK_WG
#define CHUNK_WG 32 /* items walking one mask row (select_mask_chunks) */
#endif

/* Row r of the mask: its block and sequence. */
inline crow mask_row_block(__global const int *cu, int nseq, int B, int NB, int TK, int r) {
  return locate_block(cu, nseq, NB, TK, r % (B * NB));
}

/* One work-item per (32-token chunk w, sequence, kv head) owns column w of its sequence's
 * rows: it clears the rows a token of the chunk can select (c <= IC of its last token),
 * then sets its tokens' bits. Rows of later blocks are never read for this column:
 * readers start block c at word c*BS/32. The bits are set by atomic_or although no other
 * item touches the column: an atomic whose result is unused does not wait, where each
 * `|=` waited for its load (32 tokens x S dependent round trips an item); a token's S
 * entries are loaded 8 at a time ahead of their updates. OR commutes: the mask does not
 * depend on their order. */
__kernel void select_mask_build(CITENSOR(bi), __global uint *mask, long mask_off, int NCH,
                                int S, int BS, SEQ_ARGS) {
  const int w = get_global_id(0), s = get_global_id(1), h = get_global_id(2);
  int b = s, t0 = 0, c0 = 0, len = TQ, nb = NB;
  if (nseq > 0) {
    __global const int *cuc = cu + 2 * (nseq + 1);
    b = 0;
    t0 = cu[s];
    c0 = cuc[s];
    len = cu[s + 1] - cu[s];
    nb = cuc[s + 1] - cuc[s];
  }
  if (w * 32 >= len) return;
  const int tend = min(w * 32 + 32, len), cmax = min(nb - 1, (tend - 1) / BS);
  __global uint *col = mask + mask_off + (((long)h * B + b) * NB + c0) * NCH + w;
  for (int c = 0; c <= cmax; c++) col[(long)c * NCH] = 0u;
  for (int t = w * 32; t < tend; t++) {
    const uint bit = 1u << (t - w * 32);
    const int ic = t / BS;
    __global const int *row = bi + TIDX(bi, b, t0 + t, h);
    for (int x0 = 0; x0 < S; x0 += 8) {
      int c[8];
#pragma unroll
      for (int j = 0; j < 8; j++) c[j] = x0 + j < S ? row[x0 + j] : -1;
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (c[j] >= 0 && c[j] <= ic) atomic_or(col + (long)c[j] * NCH, bit);
    }
  }
}

/* One work-group of CHUNK_WG items per mask row walks its words and cuts the chunks: with
 * fill = 0 it writes counts[row]; with fill = 1 (offsets known) each chunk's slot_row and
 * slot_word. A round loads 4 CHUNK_WG consecutive words (coalesced, all in flight) and
 * their popcounts go to local memory; then every item walks them in order with the same
 * state (the cut is sequential: a chunk closes at the word that reaches chunk_tokens),
 * and item 0 writes. One item a row, loading its words one (or eight) at a time, left
 * the kernel waiting on latency with a few thousand items on the device (a row has up
 * to 2048 words at T = 65536). */
#define CHUNK_WORDS (4 * CHUNK_WG)
__kernel __attribute__((reqd_work_group_size(CHUNK_WG, 1, 1))) void select_mask_chunks(
    __global const uint *mask, long mask_off, int NCH, __global int *sel, long counts_off,
    long offsets_off, long slot_row_off, long slot_word_off, int fill, int chunk_tokens, int BS,
    SEQ_ARGS) {
  __local int cnt[CHUNK_WORDS];
  const int row = get_group_id(0), lid = get_local_id(0);
  if (row >= H * B * NB) return; /* uniform over the group */
  const crow blk = mask_row_block(cu, nseq, B, NB, TK, row);
  __global const uint *m = mask + mask_off + (long)row * NCH;
  const int wend = (blk.tk + 31) / 32, slot0 = fill ? sel[offsets_off + row] : 0;
  int k = 0, n = 0, open = 0;
  for (int w0 = blk.c * BS / 32; w0 < wend; w0 += CHUNK_WORDS) {
    uint words[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int w = w0 + j * CHUNK_WG + lid;
      words[j] = w < wend ? m[w] : 0u;
    }
    barrier(CLK_LOCAL_MEM_FENCE); /* the previous round's walk is done */
#pragma unroll
    for (int j = 0; j < 4; j++) cnt[j * CHUNK_WG + lid] = (int)popcount(words[j]);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < CHUNK_WORDS; i++) {
      const int x = cnt[i];
      if (x == 0) continue;
      if (!open && fill && lid == 0) {
        sel[slot_row_off + slot0 + k] = row;
        sel[slot_word_off + slot0 + k] = w0 + i;
      }
      open = 1;
      n += x;
      if (n >= chunk_tokens) {
        open = n = 0;
        k++;
      }
    }
  }
  if (!fill && lid == 0) sel[counts_off + row] = k + open;
}

/* offsets[0..n] = exclusive prefix sum of counts[0..n-1], by one work-group. */
__kernel __attribute__((reqd_work_group_size(SCAN_WG, 1, 1))) void select_chunk_scan(
    __global int *sel, long counts_off, long offsets_off, int n) {
  __local int part[SCAN_WG];
  __global const int *counts = sel + counts_off;
  __global int *offsets = sel + offsets_off;
  const int lid = get_local_id(0), per = (n + SCAN_WG - 1) / SCAN_WG;
  const int lo = min(n, lid * per), hi = min(n, lo + per);
  int sum = 0;
  for (int i = lo; i < hi; i++) sum += counts[i];
  part[lid] = sum;
  barrier(CLK_LOCAL_MEM_FENCE);
  if (lid == 0) {
    int acc = 0;
    for (int x = 0; x < SCAN_WG; x++) {
      const int c = part[x];
      part[x] = acc;
      acc += c;
    }
    offsets[n] = acc;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  int acc = part[lid];
  for (int i = lo; i < hi; i++) {
    offsets[i] = acc;
    acc += counts[i];
  }
}
