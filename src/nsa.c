/* The whole forward pass (semantics sections 1-6) and its workspace.
 *
 * clnsa_forward validates everything, then enqueues one chain:
 *   pool -> compressed attention -> top-k -> selected attention -> window -> combine
 * into the caller's workspace, and only the last kernel (cl/combine.cl) writes o. The
 * stages first run through a dry chain (src/launch.c) that builds every kernel and
 * enqueues nothing, so a build or tuning failure leaves every buffer untouched.
 *
 * Workspace layout (byte offsets from the workspace start, each rounded up to 256; all
 * f32 except the indices, and k_cmp, v_cmp in the dtypes of k, v with CLNSA_FLAG_CMP_16BIT):
 *   k_cmp [B,NB,H,DK]  v_cmp [B,NB,H,DV]  o_cmp [B,TQ,HQ,DV]  lse_cmp [B,TQ,HQ]
 *   block_indices i32 [B,TQ,H,S]  o_slc [B,TQ,HQ,DV]  lse_slc [B,TQ,HQ]
 *   o_swa [B,TQ,HQ,DV]  lse_swa [B,TQ,HQ]     (the last two only when W > 0 and g_swa)
 * then scratch: the kv-block-major selected attention's (src/selected_kvm.c; small G on
 * the tensor-core path), and for clnsa_backward_workspace_size the backward's, which
 * reuses the same bytes (the larger of the two is reserved). Kernels see the
 * regions as contiguous clnsa_tensor views of the one buffer (no sub-buffers, so the
 * workspace offset needs only 4-byte alignment).
 *
 * Which stages run:
 *  - pool + compressed attention: unless g_cmp is absent and block_indices are given
 *    (then nothing reads their results);
 *  - top-k: unless block_indices are given (block_counts act only here);
 *  - selected attention: always (kv-block-major where selected_kvm_plan takes it);
 *  - window: when W > 0 and g_swa is given. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define WS_ALIGN 256

static size_t align_up(size_t x) {
  return (x + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
}

static size_t count4(int64_t a, int64_t b, int64_t c, int64_t d) {
  return (size_t)a * (size_t)b * (size_t)c * (size_t)d;
}

size_t ws_reserve(size_t *at, size_t elems) {
  size_t off = align_up(*at);
  *at = off + 4 * elems;
  return off;
}

/* A region of `elems` elements of dtype dt (4 or 2 bytes). */
static size_t ws_reserve_dt(size_t *at, size_t elems, clnsa_dtype dt) {
  return ws_reserve(at, clnsa_dtype_size(dt) == 2 ? (elems + 1) / 2 : elems);
}

static void workspace_layout(const nsa_dims *d, bool window, ws_layout *l) {
  const size_t rows = count4(d->B, d->TQ, d->HQ, 1);
  size_t at = 0;
  memset(l, 0, sizeof *l);
  l->k_cmp = ws_reserve_dt(&at, count4(d->B, d->NB, d->H, d->DK), d->kc_dt);
  l->v_cmp = ws_reserve_dt(&at, count4(d->B, d->NB, d->H, d->DV), d->vc_dt);
  l->o_cmp = ws_reserve(&at, rows * (size_t)d->DV);
  l->lse_cmp = ws_reserve(&at, rows);
  l->block_indices = ws_reserve(&at, count4(d->B, d->TQ, d->H, d->S));
  l->o_slc = ws_reserve(&at, rows * (size_t)d->DV);
  l->lse_slc = ws_reserve(&at, rows);
  if (window) {
    l->o_swa = ws_reserve(&at, rows * (size_t)d->DV);
    l->lse_swa = ws_reserve(&at, rows);
  }
  l->end = at;
  l->scratch = align_up(at);
}

/* A contiguous view of a workspace region (its start is a multiple of 4 bytes). */
static clnsa_tensor ws_view(const clnsa_workspace *ws, size_t byte_off, clnsa_dtype dt, int ndim,
                            const int64_t *shape) {
  return clnsa_tensor_make(ws->buffer, (ws->offset + byte_off) / clnsa_dtype_size(dt), dt, ndim,
                           shape);
}

/* ---- validation shared by the size queries and the forward ---- */
clnsa_status inputs_validate(clnsa_context *ctx, const clnsa_params *params, const clnsa_inputs *in,
                             nsa_dims *d) {
  if (!in) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "inputs are NULL");
  memset(d, 0, sizeof *d);
  CHECK_STATUS(dims_params(ctx, params, d));
  CHECK_STATUS(dims_kv(ctx, in->seqs, in->k, in->v, "k", "v", d));
  CHECK_STATUS(dims_q(ctx, in->q, d));
  CHECK_STATUS(dims_check_rows(ctx, d, in->g_cmp, "g_cmp"));
  CHECK_STATUS(dims_check_rows(ctx, d, in->g_slc, "g_slc"));
  CHECK_STATUS(dims_check_rows(ctx, d, in->g_swa, "g_swa"));
  d->kc_dt = d->cmp16 ? in->k->dtype : CLNSA_F32;
  d->vc_dt = d->cmp16 ? in->v->dtype : CLNSA_F32;
  int64_t si[4], sc[3];
  dims_shape_idx(d, si);
  dims_shape_counts(d, sc);
  if (in->block_indices)
    CHECK_STATUS(tensor_check(ctx, in->block_indices, "block_indices", 4, si, DT_INT));
  if (in->block_counts)
    CHECK_STATUS(tensor_check(ctx, in->block_counts, "block_counts", 3, sc, DT_INT));
  return CLNSA_SUCCESS;
}

static bool window_runs(const nsa_dims *d, const clnsa_inputs *in) {
  return d->W > 0 && in->g_swa != NULL;
}

size_t ws_scratch_room(const clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in) {
  ws_layout l;
  workspace_layout(d, window_runs(d, in), &l);
  const size_t most = (size_t)ctx->info.max_alloc;
  return most > l.scratch ? most - l.scratch : 0;
}

size_t ws_pass_tokens(size_t all, size_t budget, size_t per_token, const char *cap_mb,
                      const char *fixed_tokens) {
  const size_t cap = (size_t)tuning_env_int(cap_mb, 0, 1) << 20;
  if (cap && cap < budget) budget = cap;
  size_t pt = budget / per_token;
  pt = pt < all ? pt : all;
  const int fixed = tuning_env_int(fixed_tokens, 0, 1);
  if (fixed > 0 && (size_t)fixed < pt) return (size_t)fixed;
  if (pt == 0 || pt < (all < WS_PASS_MIN ? all : WS_PASS_MIN)) return 0;
  const size_t passes = (all + pt - 1) / pt; /* of equal size: no short last pass */
  return (all + passes - 1) / passes;
}

/* Bytes of the forward's regions, and with `backward` the backward's scratch after them. */
static clnsa_status workspace_size(clnsa_context *ctx, const clnsa_params *params,
                                   const clnsa_inputs *in, bool backward, size_t *bytes) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  if (!bytes) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "bytes is NULL");
  nsa_dims d;
  CHECK_STATUS(inputs_validate(ctx, params, in, &d));
  ws_layout l;
  workspace_layout(&d, window_runs(&d, in), &l);
  size_t kvm_range, scratch;
  CHECK_STATUS(selected_kvm_plan(ctx, &d, in->q, in->k, in->v, ws_scratch_room(ctx, &d, in),
                                 &kvm_range, &scratch));
  size_t bwd = 0;
  if (backward) CHECK_STATUS(backward_scratch_bytes(ctx, &d, in, &bwd));
  if (bwd > scratch) scratch = bwd;
  *bytes = scratch ? l.scratch + scratch : l.end;
  return CLNSA_SUCCESS;
}

clnsa_status clnsa_forward_workspace_size(clnsa_context *ctx, const clnsa_params *params,
                                          const clnsa_inputs *in, size_t *bytes) {
  return workspace_size(ctx, params, in, false, bytes);
}

clnsa_status clnsa_backward_workspace_size(clnsa_context *ctx, const clnsa_params *params,
                                           const clnsa_inputs *in, size_t *bytes) {
  return workspace_size(ctx, params, in, true, bytes);
}

/* ---- workspace handles ---- */
clnsa_status clnsa_workspace_create(clnsa_context *ctx, cl_mem buffer, size_t offset, size_t bytes,
                                    clnsa_workspace **out) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  if (!buffer || !out)
    return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "clnsa_workspace_create: %s is NULL",
                      buffer ? "out" : "buffer");
  *out = NULL;
  cl_context owner = NULL;
  size_t size = 0;
  if (clGetMemObjectInfo(buffer, CL_MEM_CONTEXT, sizeof owner, &owner, NULL) != CL_SUCCESS ||
      clGetMemObjectInfo(buffer, CL_MEM_SIZE, sizeof size, &size, NULL) != CL_SUCCESS)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_HANDLE, "workspace buffer is not a valid cl_mem");
  if (owner != ctx->cl)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_HANDLE,
                      "workspace buffer belongs to another OpenCL context");
  if (offset % 4 != 0)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT,
                      "workspace offset %zu is not a multiple of 4 bytes", offset);
  if (offset > size || bytes > size - offset)
    return clnsa_fail(ctx, CLNSA_ERR_BUFFER_TOO_SMALL,
                      "workspace of %zu bytes from offset %zu exceeds the buffer's %zu", bytes,
                      offset, size);
  clnsa_workspace *ws = calloc(1, sizeof *ws);
  if (!ws) return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  clRetainMemObject(buffer);
  ws->ctx = ctx;
  ws->buffer = buffer;
  ws->offset = offset;
  ws->bytes = bytes;
  *out = ws;
  return CLNSA_SUCCESS;
}

void clnsa_workspace_destroy(clnsa_workspace *ws) {
  if (!ws) return;
  clReleaseMemObject(ws->buffer);
  free(ws);
}

clnsa_status clnsa_forward_block_indices(const clnsa_workspace *ws, clnsa_tensor *out) {
  if (!ws) return CLNSA_ERR_NULL_ARGUMENT;
  if (!out) return clnsa_fail(ws->ctx, CLNSA_ERR_NULL_ARGUMENT, "out is NULL");
  if (!ws->last.valid)
    return clnsa_fail(ws->ctx, CLNSA_ERR_WORKSPACE,
                      "no successful clnsa_forward has been recorded in this workspace");
  if (ws->last.caller_indices)
    return clnsa_fail(ws->ctx, CLNSA_ERR_INVALID_ARGUMENT,
                      "the last forward used the caller's own block_indices; the workspace "
                      "holds none");
  int64_t s[4];
  dims_shape_idx(&ws->last.dims, s);
  *out = ws_view(ws, ws->last.layout.block_indices, CLNSA_I32, 4, s);
  return CLNSA_SUCCESS;
}

/* ---- the pass ---- */
void workspace_views(const clnsa_workspace *ws, const nsa_dims *d, const ws_layout *l,
                     ws_views *v) {
  int64_t skc[4], svc[4], so[4], sr[3], si[4];
  dims_shape_kcmp(d, skc);
  dims_shape_vcmp(d, svc);
  dims_shape_o(d, so);
  dims_shape_rows(d, sr);
  dims_shape_idx(d, si);
  v->k_cmp = ws_view(ws, l->k_cmp, d->kc_dt, 4, skc);
  v->v_cmp = ws_view(ws, l->v_cmp, d->vc_dt, 4, svc);
  v->o_cmp = ws_view(ws, l->o_cmp, CLNSA_F32, 4, so);
  v->lse_cmp = ws_view(ws, l->lse_cmp, CLNSA_F32, 3, sr);
  v->idx = ws_view(ws, l->block_indices, CLNSA_I32, 4, si);
  v->o_slc = ws_view(ws, l->o_slc, CLNSA_F32, 4, so);
  v->lse_slc = ws_view(ws, l->lse_slc, CLNSA_F32, 3, sr);
  v->o_swa = ws_view(ws, l->o_swa, CLNSA_F32, 4, so);
  v->lse_swa = ws_view(ws, l->lse_swa, CLNSA_F32, 3, sr);
}

/* The combine kernel, built (or fetched from the program cache) with its arguments set,
 * so that building it cannot fail after the other stages were launched. */
typedef struct combine_launch {
  cl_kernel kernel;
  size_t global, local;
} combine_launch;

static clnsa_status combine_prepare(clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in,
                                    bool window, const clnsa_tensor *o, const ws_views *v,
                                    combine_launch *cl) {
  /* 4-element vectors where every row it reads or writes starts aligned (a strided view
   * or a workspace offset off a multiple of 16 bytes keeps the scalar walk);
   * CLNSA_TUNE=VEC=0 keeps it everywhere */
  const bool vec = tuning_env_int("VEC", 1, 0) && tensor_rows_vec(o, d->DV, 4) &&
                   tensor_rows_vec(&v->o_slc, d->DV, 4) &&
                   (!in->g_cmp || tensor_rows_vec(&v->o_cmp, d->DV, 4)) &&
                   (!window || tensor_rows_vec(&v->o_swa, d->DV, 4));
  const row_walk w = row_walk_plan(ctx, d->DV, vec, 0, false);
  build_options opt = {{0}, 0};
  options_add(&opt, "-DDV=%d -DVECW=%d -DLANES=%d -DRPG=%d", d->DV, w.vecw, w.lanes, w.rows);
  options_add_dtype(&opt, "O", o);
  options_add_dtype(&opt, "GS", in->g_slc);
  options_add_dtype(&opt, "GC", in->g_cmp);
  options_add_dtype(&opt, "GW", window ? in->g_swa : NULL);
  if (in->g_slc) options_add(&opt, " -DHAS_GSLC");
  if (in->g_cmp) options_add(&opt, " -DHAS_GCMP");
  if (window) options_add(&opt, " -DHAS_GSWA");
  tuning_env_override(&opt);
  CHECK_STATUS(program_kernel(ctx, "rowvec.cl+combine.cl", opt.text, "combine_gated", &cl->kernel));
  cl_uint arg = 0;
  cl_int err = tensor_set_args(cl->kernel, &arg, o);
  err |= tensor_set_args(cl->kernel, &arg, &v->o_slc);
  err |= in->g_cmp ? tensor_set_args(cl->kernel, &arg, &v->o_cmp)
                   : tensor_set_absent_args(cl->kernel, &arg);
  err |= window ? tensor_set_args(cl->kernel, &arg, &v->o_swa)
                : tensor_set_absent_args(cl->kernel, &arg);
  err |= in->g_slc ? tensor_set_args(cl->kernel, &arg, in->g_slc)
                   : tensor_set_absent_args(cl->kernel, &arg);
  err |= in->g_cmp ? tensor_set_args(cl->kernel, &arg, in->g_cmp)
                   : tensor_set_absent_args(cl->kernel, &arg);
  err |= window ? tensor_set_args(cl->kernel, &arg, in->g_swa)
                : tensor_set_absent_args(cl->kernel, &arg);
  cl_int tq = d->TQ, hq = d->HQ;
  cl_long nrows = (cl_long)d->B * d->TQ * d->HQ;
  err |= clSetKernelArg(cl->kernel, arg++, sizeof tq, &tq);
  err |= clSetKernelArg(cl->kernel, arg++, sizeof hq, &hq);
  err |= clSetKernelArg(cl->kernel, arg++, sizeof nrows, &nrows);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clSetKernelArg(combine_gated)");
  cl->local = (size_t)(w.lanes * w.rows);
  cl->global = (size_t)((nrows + w.rows - 1) / w.rows) * cl->local;
  return CLNSA_SUCCESS;
}

/* kvm_range > 0: the selected branch runs kv-block-major, kvm_range tokens a launch, its
 * scratch at byte kvm_at of buf */
static clnsa_status forward_stages(clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in,
                                   bool compressed, bool window, const ws_views *v,
                                   size_t kvm_range, cl_mem buf, size_t kvm_at,
                                   const combine_launch *comb, enqueue_chain *c) {
  if (compressed) {
    CHECK_STATUS(pool_enqueue(ctx, d, in->k, in->v, &v->k_cmp, &v->v_cmp, c));
    CHECK_STATUS(
        compressed_enqueue(ctx, d, in->q, &v->k_cmp, &v->v_cmp, &v->o_cmp, &v->lse_cmp, c));
  }
  const clnsa_tensor *idx = in->block_indices;
  if (!idx) {
    CHECK_STATUS(topk_enqueue(ctx, d, in->q, &v->k_cmp, &v->lse_cmp, in->block_counts, &v->idx, c));
    idx = &v->idx;
  }
  if (kvm_range)
    CHECK_STATUS(selected_kvm_enqueue(ctx, d, in->q, in->k, in->v, idx, &v->o_slc, &v->lse_slc, buf,
                                      kvm_at, kvm_range, c));
  else
    CHECK_STATUS(selected_enqueue(ctx, d, in->q, in->k, in->v, idx, &v->o_slc, &v->lse_slc, c));
  if (window) CHECK_STATUS(window_enqueue(ctx, d, in->q, in->k, in->v, &v->o_swa, &v->lse_swa, c));
  return chain_launch(ctx, c, comb->kernel, 1, &comb->global, &comb->local);
}

clnsa_status clnsa_forward(clnsa_context *ctx, const clnsa_params *params, const clnsa_inputs *in,
                           const clnsa_tensor *o, clnsa_workspace *ws, cl_uint nwait,
                           const cl_event *wait, cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d;
  CHECK_STATUS(inputs_validate(ctx, params, in, &d));
  int64_t so[4];
  dims_shape_o(&d, so);
  CHECK_STATUS(tensor_check(ctx, o, "o", 4, so, DT_FLOAT));
  if (nwait > 0 && !wait)
    return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT,
                      "event_wait_list is NULL but num_events_in_wait_list is %u", nwait);
  if (!ws) return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE, "workspace is NULL");
  if (ws->ctx != ctx)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE, "workspace belongs to another clnsa context");
  const bool window = window_runs(&d, in);
  const bool compressed = in->g_cmp || !in->block_indices;
  ws_layout l;
  workspace_layout(&d, window, &l);
  size_t kvm_range, kvm_bytes;
  CHECK_STATUS(selected_kvm_plan(ctx, &d, in->q, in->k, in->v, ws_scratch_room(ctx, &d, in),
                                 &kvm_range, &kvm_bytes));
  const size_t need = kvm_range ? l.scratch + kvm_bytes : l.end;
  if (ws->bytes < need)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE,
                      "workspace has %zu bytes, this forward needs %zu "
                      "(clnsa_forward_workspace_size)",
                      ws->bytes, need);

  ws_views v;
  workspace_views(ws, &d, &l, &v);
  combine_launch comb;
  CHECK_STATUS(combine_prepare(ctx, &d, in, window, o, &v, &comb));

  enqueue_chain c;
  chain_begin_dry(&c); /* every build and tuning check first: nothing enqueued on failure */
  const size_t kvm_at = ws->offset + l.scratch;
  CHECK_STATUS(forward_stages(ctx, &d, in, compressed, window, &v, kvm_range, ws->buffer, kvm_at,
                              &comb, &c));
  ws->last.valid = false; /* its contents are about to be overwritten */
  chain_begin(&c, nwait, wait);
  clnsa_status st =
      forward_stages(ctx, &d, in, compressed, window, &v, kvm_range, ws->buffer, kvm_at, &comb, &c);
  if (st == CLNSA_SUCCESS) st = chain_end(ctx, &c, event);
  if (st != CLNSA_SUCCESS) {
    chain_abort(&c);
    return st;
  }
  ws->last.dims = d;
  ws->last.q_dt = in->q->dtype;
  ws->last.k_dt = in->k->dtype;
  ws->last.v_dt = in->v->dtype;
  ws->last.g_cmp = in->g_cmp != NULL;
  ws->last.g_slc = in->g_slc != NULL;
  ws->last.g_swa = in->g_swa != NULL;
  ws->last.window = window;
  ws->last.compressed = compressed;
  ws->last.caller_indices = in->block_indices != NULL;
  ws->last.block_counts = in->block_counts != NULL;
  ws->last.layout = l;
  ws->last.valid = true;
  return CLNSA_SUCCESS;
}
