/* The selection turned around (cl/select_mask.cl): for each kv head and block, which tokens
 * selected it, as a bit mask, cut into chunks of similar size. The backward's dk/dv of the
 * selected branch (backward.c) and the kv-block-major selected forward (selected_kvm.c)
 * walk these chunks: one work-group per chunk. */
#include "internal.h"

static size_t ceil_div(size_t a, size_t b) {
  return (a + b - 1) / b;
}

size_t select_mask_slots(const nsa_dims *d, int chunk_tokens) {
  return (size_t)d->H * ((size_t)d->B * d->TQ * d->S / (size_t)chunk_tokens + (size_t)d->B * d->NB);
}

clnsa_status select_mask_kernels_get(clnsa_context *ctx, int scan_wg, select_mask_kernels *k) {
  build_options om = {{0}, 0};
  options_add(&om, "-DSCAN_WG=%d", scan_wg);
  k->scan_wg = scan_wg;
  CHECK_STATUS(program_kernel(ctx, "select_mask.cl", om.text, "select_mask_build", &k->build));
  CHECK_STATUS(program_kernel(ctx, "select_mask.cl", om.text, "select_mask_chunks", &k->chunks));
  return program_kernel(ctx, "select_mask.cl", om.text, "select_chunk_scan", &k->scan);
}

/* mask, chunk counts, their prefix sum, then each chunk's row and first word */
clnsa_status select_mask_enqueue(clnsa_context *ctx, const nsa_dims *d,
                                 const select_mask_kernels *k, const clnsa_tensor *idx,
                                 const select_mask_at *at, enqueue_chain *c) {
  kargs a = args_begin(k->build);
  arg_tensor(&a, idx);
  arg_mem(&a, at->buf);
  arg_long(&a, at->mask);
  arg_int(&a, at->nch);
  arg_int(&a, d->S);
  arg_int(&a, d->BS);
  arg_seq(&a, d);
  size_t local[3] = {32, 1, 1};
  size_t global[3] = {ceil_div((size_t)at->nch, 32) * 32, (size_t)(d->seqs ? d->seqs->n : d->B),
                      (size_t)d->H};
  CHECK_STATUS(args_launch(ctx, c, &a, 3, global, local));

  const size_t rows = (size_t)d->H * d->B * d->NB;
  if (rows == 0) return CLNSA_SUCCESS; /* no keys: nothing selected */
  for (int fill = 0; fill < 2; fill++) {
    a = args_begin(k->chunks);
    arg_mem(&a, at->buf);
    arg_long(&a, at->mask);
    arg_int(&a, at->nch);
    arg_mem(&a, at->buf);
    arg_long(&a, at->counts);
    arg_long(&a, at->offsets);
    arg_long(&a, at->slot_row);
    arg_long(&a, at->slot_word);
    arg_int(&a, fill);
    arg_int(&a, at->chunk_tokens);
    arg_int(&a, d->BS);
    arg_seq(&a, d);
    size_t lc = 32, gc = rows * lc; /* a group of CHUNK_WG = 32 a row */
    CHECK_STATUS(args_launch(ctx, c, &a, 1, &gc, &lc));
    if (fill) break;
    a = args_begin(k->scan);
    arg_mem(&a, at->buf);
    arg_long(&a, at->counts);
    arg_long(&a, at->offsets);
    arg_int(&a, (cl_int)rows);
    size_t ls = (size_t)k->scan_wg;
    CHECK_STATUS(args_launch(ctx, c, &a, 1, &ls, &ls));
  }
  return CLNSA_SUCCESS;
}
