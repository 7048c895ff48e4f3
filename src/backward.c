/* Backward pass (semantics section 7): launches cl/grad_gates.cl, cl/select_mask.cl,
 * cl/attend_bwd.cl and cl/grad_finalize.cl as one enqueue chain.
 *
 * Data flow (branches: selected always; compressed when g_cmp was given; window when
 * W > 0 and g_swa was given):
 *   bwd_gate_grads       do, o_x (workspace), gates -> dg_x; gate_x, delta_x = dO_x . o_x
 *   select_mask_build    block indices -> mask: which tokens selected each block
 *   select_mask_chunks   mask -> counts: chunks of about SEL_CHUNK tokens per mask row
 *   select_chunk_scan    counts -> offsets (exclusive prefix sum)
 *   select_mask_chunks   mask, offsets -> slot_row, slot_word (each chunk's row and start)
 *   bwd_dq_selected      (=)  \
 *   bwd_dq_compressed    (+=)  > q, k|k_cmp, v|v_cmp, do, lse_x, gate_x, delta_x -> dq_acc
 *   bwd_dq_window        (+=) /
 *   (with G <= KVQ_MAX_G on tensor cores the selected dq is kv-block-major instead:
 *   bwd_dq_selected_kvm_mma, one group per selection chunk -> dq partials per (row, slot),
 *   then bwd_dq_merge (cl/selected_merge.cl) -> dq_acc (=); the pair once per pass of
 *   tokens where the partials do not fit at once: kvq_pass_tokens)
 *   bwd_dkdv_selected    one work-group per (chunk, key slice): the chunk's tokens, all G
 *                        heads -> selected partial sums per chunk
 *   (bwd_dq_selected_mma and bwd_dkdv_selected_mma of cl/attend_bwd_mma.cl instead of the
 *   two selected kernels where tensor cores run and the tensors qualify: same arguments,
 *   same outputs, other group sizes; see bwd_mma_fits; likewise bwd_dq_compressed_mma and
 *   bwd_dkdv_compressed_mma of cl/attend_bwd_cmp_mma.cl for the compressed pair with bf16
 *   q, or 16-bit k_cmp in q's dtype: bwd_mma_cmp_configure)
 *   bwd_dkdv_window      one work-group per key tile -> window dk/dv
 *   bwd_dkdv_compressed  one work-group per (block tile, token chunk) -> compressed
 *                        partial sums per token chunk
 *   bwd_reduce_chunks    (twice) compressed partials -> dk_cmp, dv_cmp
 *   bwd_finalize_q       dq_acc -> dq
 *   bwd_finalize_kv      sum of the block's selected partials + window + dk_cmp[c]/len(c)
 *                        -> dk, dv
 * Every element of every accumulator has one writer per kernel, partial sums are added
 * in a fixed order, and kernels that read each other's results are ordered by the chain:
 * no atomics on data, and the gradients are bit-identical from run to run. Splitting the
 * key-side work into chunks keeps work-groups busy when one block is selected by every
 * token (block 0 is) and when the pooled keys are few.
 *
 * Scratch (after the forward's regions, at ws->last.layout.scratch; each region aligned
 * to 256 bytes; NR = B*TQ*HQ query rows, NK = B*TK*H key rows, NC = B*NB*H pooled rows
 * (also the mask rows), NCH = ceil(longest sequence / 32), P = compressed token chunks,
 * SLOTS = H*(B*TQ*S / SEL_CHUNK + B*NB) bounds the selected chunks):
 *   f32: gate [3, NR]  delta [3, NR]  dq_acc [NR, DK]  window dk [NK, DK], dv [NK, DV]
 *        compressed partials [P, NC, DK], [P, NC, DV]  dk_cmp [NC, DK]  dv_cmp [NC, DV]
 *        selected partials [SLOTS, BS, DK], [SLOTS, BS, DV]
 *   u32/i32: mask [NC, NCH]  counts [NC]  offsets [NC + 1]  slot_row, slot_word [SLOTS]
 *   f32, where the kv-block-major dq may run (kvq_pass_tokens): dq partials [PT HQ, S, DK]
 *        for one pass of PT tokens (b TQ + t) at a time
 * Every kernel is built before the first launch, so a build failure enqueues nothing. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BRANCH_SLC 0
#define BRANCH_CMP 1
#define BRANCH_SWA 2
#define SEL_CHUNK 1024        /* tokens per chunk of a block's selecting tokens */
#define BWD_MMA_MASK_WORDS 16 /* the tensor-core dk/dv lists 32 x this many tokens at once */
#define CMP_CHUNK_MIN 256     /* tokens per chunk of the compressed key-side work, at least */
#define CMP_CHUNKS_MAX 32     /* and at most this many chunks */

static size_t ceil_div(size_t a, size_t b) {
  return (a + b - 1) / b;
}

/* ---- scratch layout ---- */
typedef struct bwd_layout {
  /* bytes from the scratch start */
  size_t gate, delta, dq, win_k, win_v, cmp_pk, cmp_pv, cmp_k, cmp_v, sel_k, sel_v;
  size_t mask, counts, offsets, slot_row, slot_word;
  size_t part_dq; /* kv-block-major selected dq: [kvq_tokens HQ, S, DK] partials */
  size_t kvq_tokens; /* tokens (b TQ + t) a pass of that dq covers; 0: no partials */
  size_t end;
  int nch;        /* mask words per row */
  int cmp_chunks; /* P */
  int cmp_tokens; /* tokens per compressed chunk */
  size_t slots;   /* bound on the selected chunks */
} bwd_layout;

static int longest_sequence(const nsa_dims *d) {
  return d->seqs ? d->seqs->max_q : d->TQ;
}

static void scratch_layout(const nsa_dims *d, size_t kvq_tokens, bwd_layout *l) {
  const size_t nr = (size_t)d->B * d->TQ * d->HQ, nk = (size_t)d->B * d->TK * d->H;
  const size_t nc = (size_t)d->B * d->NB * d->H, len = (size_t)longest_sequence(d);
  size_t p = (len + CMP_CHUNK_MIN - 1) / CMP_CHUNK_MIN;
  p = p < 1 ? 1 : p > CMP_CHUNKS_MAX ? CMP_CHUNKS_MAX : p;
  l->cmp_chunks = (int)p;
  l->cmp_tokens = len ? (int)((len + p - 1) / p) : 1;
  l->nch = (int)((len + 31) / 32);
  l->slots = select_mask_slots(d, SEL_CHUNK);
  size_t at = 0;
  l->gate = ws_reserve(&at, 3 * nr);
  l->delta = ws_reserve(&at, 3 * nr);
  l->dq = ws_reserve(&at, nr * d->DK);
  l->win_k = ws_reserve(&at, nk * d->DK);
  l->win_v = ws_reserve(&at, nk * d->DV);
  l->cmp_pk = ws_reserve(&at, p * nc * d->DK);
  l->cmp_pv = ws_reserve(&at, p * nc * d->DV);
  l->cmp_k = ws_reserve(&at, nc * d->DK);
  l->cmp_v = ws_reserve(&at, nc * d->DV);
  l->sel_k = ws_reserve(&at, l->slots * d->BS * d->DK);
  l->sel_v = ws_reserve(&at, l->slots * d->BS * d->DV);
  l->mask = ws_reserve(&at, nc * (size_t)l->nch);
  l->counts = ws_reserve(&at, nc);
  l->offsets = ws_reserve(&at, nc + 1);
  l->slot_row = ws_reserve(&at, l->slots);
  l->slot_word = ws_reserve(&at, l->slots);
  l->kvq_tokens = kvq_tokens;
  l->part_dq = kvq_tokens ? ws_reserve(&at, kvq_tokens * d->HQ * (size_t)d->S * d->DK) : 0;
  l->end = at;
}

/* Warps per group of bwd_dq_selected_kvm_mma and the local bytes it declares (staged K
 * and V rows of a block in whole 16-key steps, K rows padded to (DK / 8) | 4 units of 16
 * bytes: KVQ_KLD; the token list and each token's slot, KVQ_LIST entries each; a mask
 * word an item).
 * Two warps: more groups per SM (H100, bf16, 64k: backward 15.6 -> 13.5 ms at G = 1,
 * 35.2 -> 33.7 at G = 4, against four; within 1.5 % at 16k). */
static int kvq_warps(bool emulate) {
  return emulate ? 1 : tuning_env_int("KVQ_NW", 2, 1);
}
#define KVQ_LIST 512 /* as in cl/attend_bwd_mma.cl */
static size_t kvq_local_bytes(const nsa_dims *d, bool emulate) {
  const size_t keys = ((size_t)d->BS + 15) / 16 * 16;
  return keys * (16 * (size_t)((d->DK / 8) | 4) + 2 * (size_t)d->DV) + 2 * 4 * KVQ_LIST +
         4 * 32 * (size_t)kvq_warps(emulate) + (emulate ? 4 * 32 * 6 : 0);
}

/* The q, k, v part of bwd_mma_fits (below): one 16-bit type, head dims in 32-wide chunks
 * within the accumulators' register budget, rows aligned to 16 bytes. */
static bool bwd_mma_qkv_fit(const nsa_dims *d, const clnsa_inputs *in) {
  const clnsa_dtype dt = in->q->dtype;
  return (dt == CLNSA_F16 || dt == CLNSA_BF16) && in->k->dtype == dt && in->v->dtype == dt &&
         d->DK % 32 == 0 && d->DV % 32 == 0 && d->DK <= 256 && d->DV <= 128 &&
         tensor_rows_aligned16(in->q, d->DK) && tensor_rows_aligned16(in->k, d->DK) &&
         tensor_rows_aligned16(in->v, d->DV);
}

/* Whether the selected dq may run kv-block-major (bwd_dq_selected_kvm_mma), and the
 * tokens (b TQ + t) of each of its passes, so that its partials are reserved (0: not):
 * small G (CLNSA_TUNE KVQ_MAX_G; BWD_KVQ=0 turns it off) on the tensor-core path, q, k
 * and v of one 16-bit type in the shapes the tensor-core kernels take, the block in local
 * memory, and a pass's partials (PT HQ S DK floats) with the rest of the scratch within
 * one buffer (ws_scratch_room). As few passes as fit: each pass costs its chunks' setup
 * and a tail (H200, bf16, G = 8, D = 128: backward 53.6 ms at T = 65536 in one pass,
 * 61.3 in eight of 2 GiB, 66.7 query-major; 10.9 / 12.2 / 14.0 at 16k with three). At G = 8,
 * T = 65536 all partials at once are 17 GB, more than the H100's largest buffer (19.79
 * GiB) holds beside the rest: two passes there. CLNSA_TUNE KVQ_PART_MB=n caps a pass's
 * partials at n MiB, KVQ_PASS=n its tokens (tests: many passes on small shapes). The
 * backward then takes it if d_o qualifies too (bwd_mma_fits). */
static clnsa_status kvq_pass_tokens(clnsa_context *ctx, const nsa_dims *d,
                                    const clnsa_inputs *in, size_t *tokens) {
  *tokens = 0;
  if (d->G > tuning_env_int("KVQ_MAX_G", 8, 0) || !tuning_env_int("BWD_KVQ", 1, 0) ||
      !bwd_mma_qkv_fit(d, in))
    return CLNSA_SUCCESS;
  int mode = MMA_OFF;
  CHECK_STATUS(mma_mode(ctx, &mode));
  const bool emulate = mode == MMA_EMULATED;
  if (mode == MMA_OFF || (size_t)(32 * kvq_warps(emulate)) > ctx->info.max_wg ||
      kvq_local_bytes(d, emulate) + 1024 > (size_t)ctx->info.local_mem)
    return CLNSA_SUCCESS;
  bwd_layout l;
  scratch_layout(d, 0, &l);
  const size_t room = ws_scratch_room(ctx, d, in), align = 256;
  const size_t budget = room > l.end + align ? room - l.end - align : 0;
  *tokens = ws_pass_tokens((size_t)d->B * d->TQ, budget, 4 * (size_t)d->HQ * d->S * d->DK,
                           "KVQ_PART_MB", "KVQ_PASS");
  return CLNSA_SUCCESS;
}

clnsa_status backward_scratch_bytes(clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in,
                                    size_t *bytes) {
  *bytes = 0;
  if (!dims_full_sequences(d)) return CLNSA_SUCCESS; /* no backward exists */
  size_t kvq;
  CHECK_STATUS(kvq_pass_tokens(ctx, d, in, &kvq));
  bwd_layout l;
  scratch_layout(d, kvq, &l);
  *bytes = l.end;
  return CLNSA_SUCCESS;
}

/* ---- tuning: tiles of cl/attend_bwd.cl that fit the device's local memory ---- */
typedef struct bwd_tuning {
  int threads, qrows, qkeys, krows, kkeys, mask_words, scan_wg;
} bwd_tuning;

/* Local bytes of one tile of cl/attend_bwd.cl (TILE_FLOATS + TILE_INTS). */
static size_t tile_bytes(int dk, int dv, int rows, int keys) {
  const size_t r = (size_t)rows, k = (size_t)keys, w = (size_t)dk + dv + 2;
  return 4 * (r * w + k * w + 2 * r * (k + 1) + 3 * r + 5 * r + 2 * k);
}

static void fit_tile(size_t budget, size_t extra, int dk, int dv, int *rows, int *keys) {
  while (tile_bytes(dk, dv, *rows, *keys) + extra > budget && (*rows > 1 || *keys > 1)) {
    if (*keys >= *rows && *keys > 1)
      *keys /= 2;
    else
      *rows /= 2;
  }
}

/* CLNSA_TUNE="NAME=VALUE,..." may set THREADS, QROWS, QKEYS, KROWS, KKEYS (experiments;
 * powers of two). */
static void tune_from_env(bwd_tuning *t) {
  t->threads = tuning_env_int("THREADS", t->threads, 1);
  t->qrows = tuning_env_int("QROWS", t->qrows, 1);
  t->qkeys = tuning_env_int("QKEYS", t->qkeys, 1);
  t->krows = tuning_env_int("KROWS", t->krows, 1);
  t->kkeys = tuning_env_int("KKEYS", t->kkeys, 1);
}

static bwd_tuning tuning_backward(const clnsa_context *ctx, int dk, int dv, int G) {
  const device_info *info = &ctx->info;
  const bool cpu = (info->type & CL_DEVICE_TYPE_CPU) != 0;
  bwd_tuning t = {cpu ? 64 : 128, 16, 16, 16, 16, 16, 256};
  if (!cpu && G <= 8) { /* dq rows are (token, head) pairs: few heads, longer key tiles */
    t.qrows = 8;
    t.qkeys = 32;
  }
  const size_t budget = info->local_mem > 2048 ? (size_t)info->local_mem - 1024 : 32768;
  tune_from_env(&t);
  while ((size_t)t.threads > info->max_wg && t.threads > 1) t.threads /= 2;
  while ((size_t)t.scan_wg > info->max_wg && t.scan_wg > 1) t.scan_wg /= 2;
  t.mask_words = t.threads < 16 ? t.threads : 16;
  /* cl/attend_bwd.cl spreads a tile's keys over the work-items: at most one per item */
  t.qkeys = t.qkeys > t.threads ? t.threads : t.qkeys;
  t.kkeys = t.kkeys > t.threads ? t.threads : t.kkeys;
  fit_tile(budget, 4 * 3 * CLNSA_MAX_BLOCK_COUNT, dk, dv, &t.qrows, &t.qkeys);
  fit_tile(budget, 4 * 33 * (size_t)t.mask_words, dk, dv, &t.krows, &t.kkeys);
  return t;
}

/* ---- validation ---- */
static clnsa_status check_grads(clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in,
                                const clnsa_grads *g) {
  if (!g) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "grads is NULL");
  CHECK_STATUS(tensor_check(ctx, g->dq, "dq", 4, in->q->shape, DT_FLOAT));
  CHECK_STATUS(tensor_check(ctx, g->dk, "dk", 4, in->k->shape, DT_FLOAT));
  CHECK_STATUS(tensor_check(ctx, g->dv, "dv", 4, in->v->shape, DT_FLOAT));
  const clnsa_tensor *dg[3] = {g->dg_cmp, g->dg_slc, g->dg_swa};
  const clnsa_tensor *gate[3] = {in->g_cmp, in->g_slc, in->g_swa};
  const char *name[3] = {"dg_cmp", "dg_slc", "dg_swa"};
  for (int i = 0; i < 3; i++) {
    if (dg[i] && !gate[i])
      return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "%s is given but its gate is not",
                        name[i]);
    CHECK_STATUS(dims_check_rows(ctx, d, dg[i], name[i]));
  }
  return CLNSA_SUCCESS;
}

static bool same_dims(const nsa_dims *a, const nsa_dims *b) {
  return a->B == b->B && a->TQ == b->TQ && a->TK == b->TK && a->HQ == b->HQ && a->H == b->H &&
         a->DK == b->DK && a->DV == b->DV && a->BS == b->BS && a->S == b->S && a->W == b->W &&
         a->NB == b->NB && a->scale == b->scale && a->seqs == b->seqs && a->kc_dt == b->kc_dt &&
         a->vc_dt == b->vc_dt;
}

static clnsa_status check_workspace(clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in,
                                    const clnsa_workspace *ws) {
  if (!ws) return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE, "workspace is NULL");
  if (ws->ctx != ctx)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE, "workspace belongs to another clnsa context");
  if (!ws->last.valid)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE, "no forward has been recorded in this workspace");
  if (!same_dims(d, &ws->last.dims) || ws->last.g_cmp != (in->g_cmp != NULL) ||
      ws->last.g_slc != (in->g_slc != NULL) || ws->last.g_swa != (in->g_swa != NULL) ||
      ws->last.caller_indices != (in->block_indices != NULL) ||
      ws->last.block_counts != (in->block_counts != NULL) || ws->last.q_dt != in->q->dtype ||
      ws->last.k_dt != in->k->dtype || ws->last.v_dt != in->v->dtype)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE,
                      "the workspace holds a forward of other shapes, parameters or inputs");
  if (!dims_full_sequences(d))
    return clnsa_fail(ctx, CLNSA_ERR_NO_BACKWARD,
                      "backward needs every query sequence to cover its keys (TQ = TK)");
  size_t scratch; /* as clnsa_backward_workspace_size */
  CHECK_STATUS(backward_scratch_bytes(ctx, d, in, &scratch));
  const size_t need = scratch ? ws->last.layout.scratch + scratch : ws->last.layout.end;
  if (ws->bytes < need)
    return clnsa_fail(ctx, CLNSA_ERR_WORKSPACE,
                      "workspace has %zu bytes, the backward needs %zu "
                      "(clnsa_backward_workspace_size)",
                      ws->bytes, need);
  return CLNSA_SUCCESS;
}

/* ---- the plan: inputs, saved views, scratch offsets and the built kernels ---- */

typedef struct bwd_plan {
  const nsa_dims *d;
  const clnsa_inputs *in;
  const clnsa_tensor *d_o;
  const clnsa_grads *g;
  bool cmp, swa; /* branches that ran besides the selected one */
  bwd_tuning tune;
  bwd_layout lay;
  cl_mem buf;                                   /* the workspace buffer */
  cl_long base;                                 /* element offset of the scratch in buf */
  clnsa_tensor idx, k_cmp, v_cmp, o[3], lse[3]; /* saved by the forward, by branch */
  cl_kernel gates, dq[3], dkdv[3], reduce, fin_q, fin_kv;
  select_mask_kernels sel;
  bool mma, mma_emulated; /* the selected kernels are cl/attend_bwd_mma.cl's */
  bool kvq;               /* the selected dq runs kv-block-major (lay.kvq_tokens a pass) */
  int kvq_nw;
  cl_kernel kvq_merge;         /* bwd_dq_merge (cl/selected_merge.cl) */
  bool cmp_dq_mma, cmp_kv_mma; /* the compressed dq, dk/dv kernels too (bwd_mma_cmp_configure) */
  int dq_nw, kv_nw;            /* their warps per group: selected dq, dk/dv */
  int cq_nw, ckv_nw;           /* compressed dq, dk/dv */
  int ckt;                     /* compressed dq: blocks per staged tile */
  int dq_tpg;                  /* portable selected dq: tokens per group (DQ_TPG) */
  /* the walks of bwd_gate_grads, bwd_finalize_q and bwd_finalize_kv */
  row_walk walk_gg, walk_q, walk_kv;
} bwd_plan;

static void plan_views(bwd_plan *p, const clnsa_workspace *ws) {
  const ws_layout *l = &ws->last.layout;
  ws_views v;
  workspace_views(ws, p->d, l, &v);
  p->idx = p->in->block_indices ? *p->in->block_indices : v.idx;
  p->k_cmp = v.k_cmp;
  p->v_cmp = v.v_cmp;
  p->o[BRANCH_SLC] = v.o_slc;
  p->o[BRANCH_CMP] = v.o_cmp;
  p->o[BRANCH_SWA] = v.o_swa;
  p->lse[BRANCH_SLC] = v.lse_slc;
  p->lse[BRANCH_CMP] = v.lse_cmp;
  p->lse[BRANCH_SWA] = v.lse_swa;
  p->buf = ws->buffer;
  p->base = (cl_long)((ws->offset + l->scratch) / 4);
}

/* -D<ROLE>_DT of an optional tensor; an absent one takes `fallback`, so that the option
 * string (and the cached program) does not change with which gates are given. */
static void add_dtype_or(build_options *o, const char *role, const clnsa_tensor *t,
                         clnsa_dtype fallback) {
  options_add(o, " -D%s_DT=%d", role, (int)(t ? t->dtype : fallback));
}

/* Tensor-core selected kernels (cl/attend_bwd_mma.cl): q, k, v and do all f16 or all
 * bf16 (the 16-byte fragment loads read every operand raw; a gate enters as an f32 row
 * factor), head dims in 32-wide chunks with the accumulators' register budget (DK <= 256,
 * DV <= 128, as the forward), rows aligned to 16 bytes. */
static bool bwd_mma_fits(const nsa_dims *d, const clnsa_inputs *in, const clnsa_tensor *d_o) {
  return bwd_mma_qkv_fit(d, in) && d_o->dtype == in->q->dtype && tensor_rows_aligned16(d_o, d->DV);
}

/* Local bytes of the two stages of 16 rows (q and do, RLD8 16-byte units a row) with their
 * 16-byte scalars that the warps of a dk/dv group share (rbuf, sbuf of
 * bwd_dkdv_selected_mma and bwd_dkdv_compressed_mma). */
static size_t dkdv_stage_bytes(const nsa_dims *d) {
  const size_t rld8 = ((size_t)(d->DK + d->DV) / 8) | 4; /* RLD8 */
  return 2 * 16 * 16 * (rld8 + 1);
}

/* Local bytes a warp of bwd_dkdv_selected_mma holds alone (its part of kvl): the k and v
 * A fragment slots of its 16 keys, 2 (DK/32 + DV/32) 16-byte slots a lane. */
static size_t sel_dkdv_warp_bytes(const nsa_dims *d) {
  return 16 * 32 * 2 * (size_t)(d->DK / 32 + d->DV / 32);
}

/* Warps per group of the two kernels and whether their local arrays fit: dq takes one
 * warp for a token's key slots (H200, bf16, G = 16, D = 128, 64k: bwd_dq_selected_mma
 * 32.3 ms, 36.1 with two warps splitting them, 51.1 with three: more groups fit an SM and
 * no warp waits for another's partial dq); dkdv one warp per 16 keys of a
 * block (BWD_KV_NW, up to 4), lowered until the group fits local memory and the warps
 * divide the block's 16-key slices: the group's staged rows take 18.5 KiB, a warp's
 * fragments 8 KiB at DK = DV = 128 (2 warps in NVIDIA's 48 KiB), 3 KiB at DK = 64, DV =
 * 32 (4 warps). The emulation runs one warp per group. */
static bool bwd_mma_configure(const clnsa_context *ctx, const nsa_dims *d, bool emulate,
                              bwd_plan *p) {
  const int per_block = (d->BS + 15) / 16;
  p->dq_nw = emulate ? 1 : tuning_env_int("BWD_MMA_NW", 1, 1);
  /* the compressed kernels (bwd_mma_cmp_configure may lower ckv_nw to fit) */
  p->cq_nw = emulate ? 1 : tuning_env_int("BWD_CQ_NW", 4, 1);
  /* 32 blocks a staged tile: H100, G = 16, 64k, bwd_dq_compressed_mma 14.0 -> 12.9 ms
   * against 16 (the emulation keeps 16: fewer emulated mma for PoCL to compile) */
  p->ckt = emulate ? 16 : tuning_env_int("CKT", 32, 16) / 16 * 16;
  p->ckv_nw = emulate ? 1 : tuning_env_int("BWD_CKV_NW", 2, 1);
  p->kv_nw = emulate ? 1 : tuning_env_int("BWD_KV_NW", 4, 1);
  if (p->kv_nw > per_block) p->kv_nw = per_block;
  if (ctx->info.local_mem <= 1024) return false;
  const size_t scratch = emulate ? 4 * 32 * 6 : 0, room = ctx->info.local_mem - 1024;
  /* the selected dq: its selection list, merge rows and q / do A fragments (DQ_QLOCAL) */
  const size_t dq_bytes = 4 * (3 * (size_t)CLNSA_MAX_BLOCK_COUNT + 16 * ((size_t)d->DK + 4)) +
                          16 * 2 * 32 * (size_t)(d->DK / 32 + d->DV / 32);
  /* the token list and the stages a group; a warp's fragments, a mask word an item */
  const size_t kv_list = 4 * 32 * (size_t)BWD_MMA_MASK_WORDS + dkdv_stage_bytes(d);
  const size_t kv_warp = sel_dkdv_warp_bytes(d) + 4 * 32;
  while (p->kv_nw > 1 && (kv_list + kv_warp * p->kv_nw + scratch > room || per_block % p->kv_nw))
    p->kv_nw--;
  const size_t kv_bytes = kv_list + kv_warp * p->kv_nw;
  const size_t most = dq_bytes > kv_bytes ? dq_bytes : kv_bytes;
  const int nw = p->dq_nw > p->kv_nw ? p->dq_nw : p->kv_nw;
  /* DK + DV above 320 (DK = 256 with DV = 128) fits one dk/dv warp since its rows are
   * staged, but has not run on hardware: it keeps the portable pair */
  return d->DK + d->DV <= 320 && (size_t)(32 * nw) <= ctx->info.max_wg && most + scratch <= room;
}

/* Local bytes a warp of bwd_dkdv_compressed_mma holds alone (its part of kvl): the A
 * fragment slots of its 16 blocks, KV_ALL 16-byte slots a lane (the lo terms only where
 * f32 k_cmp is split). */
static size_t cmp_dkdv_warp_bytes(const nsa_dims *d, bool split) {
  const size_t dkc = (size_t)d->DK / 32, dvc = (size_t)d->DV / 32;
  const size_t cv_split = split && tuning_env_int("CV_SPLIT", 0, 0) ? 1 : 0;
  const size_t slots = 2 * (dkc + dvc) + (split ? 2 * dkc : 0) + cv_split * 2 * dvc; /* KV_ALL */
  return 16 * 32 * slots;
}

/* Tensor-core compressed kernels (cl/attend_bwd_cmp_mma.cl): k_cmp and v_cmp are the forward's
 * f32 rows, split into bf16 hi + lo on the tensor cores, so q and do must be bf16 (an f16
 * split would lose small values to f16's range: f16 q with f32 k_cmp runs the portable
 * kernels); or, with CLNSA_FLAG_CMP_16BIT, rows in q's own 16-bit dtype, taken as they
 * are (no lo terms: half the staged bytes). dq: 4
 * warps of 16 rows share a staged tile of CKT blocks (hi and lo, 64-byte padded rows);
 * dk/dv: a warp owns 16 blocks whose hi/lo A fragments wait in local memory (12 KiB a
 * warp at DK = DV = 128), next to the group's two stages of its steps' rows (cp.async,
 * 18.5 KiB): BWD_CKV_NW warps, 2 by default, lowered here until the group fits. */
static bool bwd_mma_cmp_configure(const clnsa_context *ctx, const nsa_dims *d,
                                  const clnsa_inputs *in, bwd_plan *p) {
  const bool split =
      in->q->dtype == CLNSA_BF16 && p->k_cmp.dtype == CLNSA_F32 && p->v_cmp.dtype == CLNSA_F32;
  const bool native = p->k_cmp.dtype == in->q->dtype && p->v_cmp.dtype == in->q->dtype;
  if (!p->mma || !p->cmp || !(split || native) || !tensor_rows_aligned16(&p->k_cmp, d->DK) ||
      !tensor_rows_aligned16(&p->v_cmp, d->DV))
    return false;
  const size_t scratch = p->mma_emulated ? 4 * 32 * 6 : 0, room = ctx->info.local_mem - 1024;
  const size_t terms = split ? 2 : 1; /* the dq's staged k (and v with CV_SPLIT) terms */
  const size_t dq_bytes = terms * (size_t)p->ckt * 16 * (size_t)(d->DK / 8 + 4 + d->DV / 8 + 4);
  const size_t per_warp = cmp_dkdv_warp_bytes(d, split), stages = dkdv_stage_bytes(d);
  while (p->ckv_nw > 1 && stages + per_warp * p->ckv_nw + scratch > room) p->ckv_nw--;
  return ctx->info.local_mem > 1024 && (size_t)(32 * p->cq_nw) <= ctx->info.max_wg &&
         (size_t)(32 * p->ckv_nw) <= ctx->info.max_wg && dq_bytes + scratch <= room &&
         stages + per_warp * p->ckv_nw + scratch <= room;
}

#define BWD_PORTABLE "block_union.cl+bwd_mask.cl+attend_bwd.cl" /* the portable kernels */

static clnsa_status plan_kernels(clnsa_context *ctx, bwd_plan *p) {
  const nsa_dims *d = p->d;
  const clnsa_inputs *in = p->in;
  const clnsa_grads *g = p->g;
  const clnsa_dtype dt = p->d_o->dtype;
  build_options o = {{0}, 0};
  options_add(&o,
              "-DDK=%d -DDV=%d -DTHREADS=%d -DQROWS=%d -DQKEYS=%d -DKROWS=%d -DKKEYS=%d "
              "-DMASK_WORDS=%d",
              d->DK, d->DV, p->tune.threads, p->tune.qrows, p->tune.qkeys, p->tune.krows,
              p->tune.kkeys, p->tune.mask_words);
  options_add_dtype(&o, "Q", in->q);
  options_add_dtype(&o, "K", in->k);
  options_add_dtype(&o, "V", in->v);
  options_add_dtype(&o, "DO", p->d_o);
  options_add(&o, " -DKC_DT=%d -DVC_DT=%d", (int)p->k_cmp.dtype, (int)p->v_cmp.dtype);
  /* The portable selected dq packs DQ_TPG tokens into a group where their G heads fill
   * fewer than QROWS rows (each row masked to its own token's blocks of the union): with
   * one token a group, G = 1 left 15 of 16 rows idle and every group loaded its 1024 keys
   * for one row. The union's four arrays take the local bytes the single-token list has
   * (3 x 128 ints): DQ_TPG S <= 96. */
  p->dq_tpg = 1;
  if (!p->mma && d->G < p->tune.qrows && d->S > 0) {
    int tpg = p->tune.qrows / d->G;
    const int cap = 3 * CLNSA_MAX_BLOCK_COUNT / 4 / d->S;
    tpg = tpg > cap ? cap : tpg;
    tpg = tpg > 32 ? 32 : tpg;
    if (tpg > 1 && tuning_env_int("DQ_TPG", 1, 0)) {
      p->dq_tpg = tpg;
      options_add(&o, " -DDQ_TPG=%d -DDQ_UCAP=%d", tpg, tpg * d->S);
    }
  }
  const char *dq_names[3] = {"bwd_dq_selected", "bwd_dq_compressed", "bwd_dq_window"};
  const char *kv_names[3] = {"bwd_dkdv_selected", "bwd_dkdv_compressed", "bwd_dkdv_window"};
  const bool runs[3] = {true, p->cmp, p->swa};
  for (int x = 0; x < 3; x++) {
    if (!runs[x] || (x == BRANCH_SLC && p->mma)) continue;
    if (x != BRANCH_CMP || !p->cmp_dq_mma)
      CHECK_STATUS(
          program_kernel(ctx, BWD_PORTABLE, o.text, dq_names[x], &p->dq[x]));
    if (x != BRANCH_CMP || !p->cmp_kv_mma)
      CHECK_STATUS(program_kernel(ctx, BWD_PORTABLE, o.text, kv_names[x], &p->dkdv[x]));
  }
  if (p->mma) {
    build_options ot = {{0}, 0};
    options_add(&ot, "-DDK=%d -DDV=%d -DDQ_NW=%d -DKV_NW=%d -DMASK_WORDS=%d", d->DK, d->DV,
                p->dq_nw, p->kv_nw, BWD_MMA_MASK_WORDS);
    options_add(&ot, " -DCQ_NW=%d -DCKV_NW=%d -DCKT=%d", p->cq_nw, p->ckv_nw, p->ckt);
    if (p->kvq) options_add(&ot, " -DKVQ_BS=%d -DKVQ_NW=%d", d->BS, p->kvq_nw);
    options_add(&ot, " -DMMA_DT=%d -DWARP_EMULATE=%d", (int)in->q->dtype, p->mma_emulated);
    options_add_dtype(&ot, "Q", in->q);
    options_add_dtype(&ot, "K", in->k);
    options_add_dtype(&ot, "V", in->v);
    options_add_dtype(&ot, "DO", p->d_o);
    options_add(&ot, " -DKC_DT=%d -DVC_DT=%d", (int)p->k_cmp.dtype, (int)p->v_cmp.dtype);
    tuning_env_override(&ot); /* kernel-only defines (KT, CKT, CV_SPLIT) for experiments */
    const char *file =
        "warp_ops.cl+kvm_rows.cl+bwd_mask.cl+attend_bwd_mma.cl+attend_bwd_cmp_mma.cl";
    CHECK_STATUS(program_kernel(ctx, file, ot.text,
                                p->kvq ? "bwd_dq_selected_kvm_mma" : "bwd_dq_selected_mma",
                                &p->dq[BRANCH_SLC]));
    if (p->kvq) {
      const int w4 = d->DK / 4, rpg = w4 >= 128 ? 1 : 128 / w4;
      build_options om = {{0}, 0};
      options_add(&om, "-DWIDTH=%d -DRPG=%d -DBS=%d", d->DK, rpg, d->BS);
      CHECK_STATUS(
          program_kernel(ctx, "selected_merge.cl", om.text, "bwd_dq_merge", &p->kvq_merge));
    }
    CHECK_STATUS(program_kernel(ctx, file, ot.text, "bwd_dkdv_selected_mma", &p->dkdv[BRANCH_SLC]));
    if (p->cmp_dq_mma)
      CHECK_STATUS(program_kernel(ctx, file, ot.text, "bwd_dq_compressed_mma", &p->dq[BRANCH_CMP]));
    if (p->cmp_kv_mma)
      CHECK_STATUS(
          program_kernel(ctx, file, ot.text, "bwd_dkdv_compressed_mma", &p->dkdv[BRANCH_CMP]));
  }

  CHECK_STATUS(select_mask_kernels_get(ctx, p->tune.scan_wg, &p->sel));

  /* 4-element vectors where every row a kernel reads or writes starts aligned (strided
   * views or a workspace off a multiple of 16 bytes keep the scalar walk; the branch
   * outputs are checked whether they ran or not, so that the build options do not change
   * with the gates); CLNSA_TUNE=VEC=0 keeps it everywhere */
  const bool vec = tuning_env_int("VEC", 1, 0) != 0, ws_vec = p->base % 4 == 0;
  const bool gg_vec =
      vec && tensor_rows_vec(p->d_o, d->DV, 4) && tensor_rows_vec(&p->o[BRANCH_SLC], d->DV, 4) &&
      tensor_rows_vec(&p->o[BRANCH_CMP], d->DV, 4) && tensor_rows_vec(&p->o[BRANCH_SWA], d->DV, 4);
  /* bwd_gate_grads: lanes a power of two up to 8 for a short fixed tree, several vectors
   * a lane; finalize: a vector a lane */
  p->walk_gg = row_walk_plan(ctx, d->DV, gg_vec, 8, true);
  p->walk_q =
      row_walk_plan(ctx, d->DK, vec && ws_vec && tensor_rows_vec(g->dq, d->DK, 4), 0, false);
  p->walk_kv = row_walk_plan(
      ctx, d->DK + d->DV,
      vec && ws_vec && tensor_rows_vec(g->dk, d->DK, 4) && tensor_rows_vec(g->dv, d->DV, 4), 0,
      false);

  build_options og = {{0}, 0};
  options_add(&og, "-DDV=%d -DVECW=%d -DLANES=%d -DGG_WG=%d", d->DV, p->walk_gg.vecw,
              p->walk_gg.lanes, p->walk_gg.lanes * p->walk_gg.rows);
  options_add_dtype(&og, "DO", p->d_o);
  add_dtype_or(&og, "GS", in->g_slc, dt);
  add_dtype_or(&og, "GC", in->g_cmp, dt);
  add_dtype_or(&og, "GW", in->g_swa, dt);
  add_dtype_or(&og, "DGS", g->dg_slc, dt);
  add_dtype_or(&og, "DGC", g->dg_cmp, dt);
  add_dtype_or(&og, "DGW", g->dg_swa, dt);
  CHECK_STATUS(
      program_kernel(ctx, "rowvec.cl+grad_gates.cl", og.text, "bwd_gate_grads", &p->gates));

  build_options of = {{0}, 0};
  options_add(&of, "-DDK=%d -DDV=%d -DVECW_Q=%d -DQ_LANES=%d -DQ_RPG=%d", d->DK, d->DV,
              p->walk_q.vecw, p->walk_q.lanes, p->walk_q.rows);
  options_add(&of, " -DVECW_KV=%d -DKV_LANES=%d -DKV_RPG=%d", p->walk_kv.vecw, p->walk_kv.lanes,
              p->walk_kv.rows);
  options_add_dtype(&of, "DQ", g->dq);
  options_add_dtype(&of, "DKO", g->dk);
  options_add_dtype(&of, "DVO", g->dv);
  CHECK_STATUS(
      program_kernel(ctx, "rowvec.cl+grad_finalize.cl", of.text, "bwd_reduce_chunks", &p->reduce));
  CHECK_STATUS(
      program_kernel(ctx, "rowvec.cl+grad_finalize.cl", of.text, "bwd_finalize_q", &p->fin_q));
  return program_kernel(ctx, "rowvec.cl+grad_finalize.cl", of.text, "bwd_finalize_kv", &p->fin_kv);
}

/* ---- kernel arguments, in order ---- */
/* Element offset of a scratch region. */
static cl_long at(const bwd_plan *p, size_t region) {
  return p->base + (cl_long)(region / 4);
}

/* ---- the stages ---- */
static clnsa_status enqueue_gates(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  const clnsa_inputs *in = p->in;
  const clnsa_grads *g = p->g;
  const cl_long nr = (cl_long)d->B * d->TQ * d->HQ;
  int flags = (p->cmp ? 1 : 0) | (p->swa ? 2 : 0) | (in->g_slc ? 4 : 0) | (g->dg_cmp ? 8 : 0) |
              (g->dg_slc ? 16 : 0) | (g->dg_swa ? 32 : 0);
  kargs a = args_begin(p->gates);
  arg_tensor(&a, p->d_o);
  arg_tensor(&a, &p->o[BRANCH_SLC]);
  arg_tensor(&a, p->cmp ? &p->o[BRANCH_CMP] : NULL);
  arg_tensor(&a, p->swa ? &p->o[BRANCH_SWA] : NULL);
  arg_tensor(&a, in->g_slc);
  arg_tensor(&a, in->g_cmp);
  arg_tensor(&a, in->g_swa);
  arg_tensor(&a, g->dg_slc);
  arg_tensor(&a, g->dg_cmp);
  arg_tensor(&a, g->dg_swa);
  arg_mem(&a, p->buf);
  arg_long(&a, at(p, p->lay.gate));
  arg_long(&a, at(p, p->lay.delta));
  arg_long(&a, nr);
  arg_int(&a, flags);
  arg_int(&a, d->TQ);
  arg_int(&a, d->HQ);
  size_t local = (size_t)(p->walk_gg.lanes * p->walk_gg.rows);
  size_t global = ceil_div((size_t)nr, (size_t)p->walk_gg.rows) * local;
  return args_launch(ctx, c, &a, 1, &global, &local);
}

/* The selection turned around: mask, chunk counts, their prefix sum, the chunks. */
static clnsa_status enqueue_selection(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  const bwd_layout *l = &p->lay;
  const select_mask_at m = {p->buf,
                            at(p, l->mask),
                            at(p, l->counts),
                            at(p, l->offsets),
                            at(p, l->slot_row),
                            at(p, l->slot_word),
                            l->nch,
                            SEL_CHUNK};
  return select_mask_enqueue(ctx, p->d, &p->sel, &p->idx, &m, c);
}

/* Arguments every attention-backward kernel starts with: q, keys, values, do, lse. */
static void args_attend(kargs *a, const bwd_plan *p, int x) {
  arg_tensor(a, p->in->q);
  arg_tensor(a, x == BRANCH_CMP ? &p->k_cmp : p->in->k);
  arg_tensor(a, x == BRANCH_CMP ? &p->v_cmp : p->in->v);
  arg_tensor(a, p->d_o);
  arg_tensor(a, &p->lse[x]);
}

static size_t seq_groups(const nsa_dims *d) {
  return (size_t)(d->seqs ? d->seqs->n : d->B);
}

/* The selection chunks (enqueue_selection's mask, offsets, slot rows and words), as the
 * kernels that walk them take them. */
static void args_selection(kargs *a, const bwd_plan *p) {
  const bwd_layout *l = &p->lay;
  arg_mem(a, p->buf);
  arg_long(a, at(p, l->mask));
  arg_int(a, l->nch);
  arg_mem(a, p->buf);
  arg_long(a, at(p, l->offsets));
  arg_long(a, at(p, l->slot_row));
  arg_long(a, at(p, l->slot_word));
}

/* The selected dq kv-block-major, in passes of lay.kvq_tokens tokens (b TQ + t): per
 * pass, one group per selection chunk (spare slots and chunks without the pass's tokens
 * exit) writes the pass's partials, then bwd_dq_merge writes its rows of the dq
 * accumulator; the chain orders each pass after the previous one's merge. */
static clnsa_status enqueue_dq_kvm(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  const bwd_layout *l = &p->lay;
  const cl_long tokens = (cl_long)d->B * d->TQ, pt = (cl_long)l->kvq_tokens;
  const int w4 = d->DK / 4, rpg = w4 >= 128 ? 1 : 128 / w4;
  for (cl_long r0 = 0; r0 < tokens; r0 += pt) {
    const cl_long r1 = r0 + pt < tokens ? r0 + pt : tokens, rows = (r1 - r0) * d->HQ;
    kargs a = args_begin(p->dq[BRANCH_SLC]);
    args_attend(&a, p, BRANCH_SLC);
    arg_tensor(&a, &p->idx);
    args_selection(&a, p);
    arg_mem(&a, p->buf);
    arg_long(&a, at(p, l->gate));
    arg_long(&a, at(p, l->delta));
    arg_long(&a, at(p, l->part_dq));
    arg_long(&a, r0);
    arg_long(&a, r1);
    arg_float(&a, d->scale);
    arg_int(&a, d->S);
    arg_seq(&a, d);
    size_t local = 32 * (size_t)p->kvq_nw, global = l->slots * local;
    CHECK_STATUS(args_launch(ctx, c, &a, 1, &global, &local));

    a = args_begin(p->kvq_merge);
    arg_tensor(&a, &p->idx);
    arg_mem(&a, p->buf);
    arg_long(&a, at(p, l->part_dq));
    arg_long(&a, at(p, l->dq));
    arg_int(&a, d->S);
    arg_long(&a, r0 * d->HQ);
    arg_long(&a, rows);
    arg_seq(&a, d);
    size_t ml[2] = {(size_t)w4, (size_t)rpg};
    size_t mg[2] = {(size_t)w4, ceil_div((size_t)rows, (size_t)rpg) * (size_t)rpg};
    CHECK_STATUS(args_launch(ctx, c, &a, 2, mg, ml));
  }
  return CLNSA_SUCCESS;
}

static clnsa_status enqueue_dq(clnsa_context *ctx, const bwd_plan *p, int x, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  if (x == BRANCH_SLC && p->kvq) return enqueue_dq_kvm(ctx, p, c);
  const cl_long nr = (cl_long)d->B * d->TQ * d->HQ;
  const size_t len = (size_t)longest_sequence(d), rows = (size_t)p->tune.qrows;
  kargs a = args_begin(p->dq[x]);
  args_attend(&a, p, x);
  if (x == BRANCH_SLC) arg_tensor(&a, &p->idx);
  arg_mem(&a, p->buf);
  arg_long(&a, at(p, p->lay.gate) + x * nr);
  arg_long(&a, at(p, p->lay.delta) + x * nr);
  arg_long(&a, at(p, p->lay.dq));
  arg_float(&a, d->scale);
  if (x == BRANCH_SLC) arg_int(&a, d->S);
  if (x == BRANCH_SWA) arg_int(&a, d->W);
  arg_int(&a, d->BS);
  arg_seq(&a, d);
  /* selected: one group per (token, QROWS heads; 16 on tensor cores), or per DQ_TPG
   * tokens; others: QROWS flattened (token, g) rows (compressed on tensor cores: 16 per
   * warp) */
  const bool mma = x == BRANCH_SLC && p->mma, mma_cmp = x == BRANCH_CMP && p->cmp_dq_mma;
  const size_t groups = mma_cmp           ? ceil_div(len * (size_t)d->G, 16 * (size_t)p->cq_nw)
                        : x != BRANCH_SLC ? ceil_div(len * (size_t)d->G, rows)
                        : mma             ? len * ceil_div((size_t)d->G, 16)
                        : p->dq_tpg > 1   ? ceil_div(len, (size_t)p->dq_tpg)
                                          : len * ceil_div((size_t)d->G, rows);
  size_t local[3] = {mma       ? 32 * (size_t)p->dq_nw
                     : mma_cmp ? 32 * (size_t)p->cq_nw
                               : (size_t)p->tune.threads,
                     1, 1};
  size_t global[3] = {groups * local[0], seq_groups(d), (size_t)d->H};
  return args_launch(ctx, c, &a, 3, global, local);
}

static clnsa_status enqueue_dkdv(clnsa_context *ctx, const bwd_plan *p, int x, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  const bwd_layout *l = &p->lay;
  const cl_long nr = (cl_long)d->B * d->TQ * d->HQ;
  const bool mma = x == BRANCH_SLC && p->mma;            /* 16 keys per warp on tensor cores */
  const bool mma_cmp = x == BRANCH_CMP && p->cmp_kv_mma; /* 16 blocks per warp */
  const size_t len = (size_t)longest_sequence(d);
  const size_t keys = mma_cmp ? 16 * (size_t)p->ckv_nw : (size_t)p->tune.kkeys;
  const size_t parts = ceil_div((size_t)d->BS, mma ? 16 * (size_t)p->kv_nw : keys);
  kargs a = args_begin(p->dkdv[x]);
  args_attend(&a, p, x);
  if (x == BRANCH_SLC) {
    args_selection(&a, p);
  }
  arg_mem(&a, p->buf);
  arg_long(&a, at(p, l->gate) + x * nr);
  arg_long(&a, at(p, l->delta) + x * nr);
  const size_t out[3][2] = {{l->sel_k, l->sel_v}, {l->cmp_pk, l->cmp_pv}, {l->win_k, l->win_v}};
  arg_long(&a, at(p, out[x][0]));
  arg_long(&a, at(p, out[x][1]));
  arg_float(&a, d->scale);
  if (x == BRANCH_CMP) {
    arg_int(&a, l->cmp_chunks);
    arg_int(&a, l->cmp_tokens);
  }
  if (x == BRANCH_SWA) arg_int(&a, d->W);
  arg_int(&a, d->BS);
  arg_seq(&a, d);
  size_t local[3] = {mma       ? 32 * (size_t)p->kv_nw
                     : mma_cmp ? 32 * (size_t)p->ckv_nw
                               : (size_t)p->tune.threads,
                     1, 1};
  if (x == BRANCH_SLC) { /* one group per (chunk slot, key slice); spare slots exit */
    size_t global = l->slots * parts * local[0];
    return args_launch(ctx, c, &a, 1, &global, local);
  }
  const size_t groups = x == BRANCH_CMP
                            ? ceil_div(ceil_div(len, (size_t)d->BS), keys) * l->cmp_chunks
                            : ceil_div(len, keys);
  size_t global[3] = {groups * local[0], seq_groups(d), (size_t)d->H};
  return args_launch(ctx, c, &a, 3, global, local);
}

/* dk_cmp, dv_cmp = the compressed partials summed over the token chunks. */
static clnsa_status enqueue_reduce(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  const bwd_layout *l = &p->lay;
  const size_t nc = (size_t)d->B * d->NB * d->H;
  const size_t src[2] = {l->cmp_pk, l->cmp_pv}, dst[2] = {l->cmp_k, l->cmp_v};
  const size_t n[2] = {nc * d->DK, nc * d->DV};
  for (int i = 0; i < 2; i++) {
    kargs a = args_begin(p->reduce);
    arg_mem(&a, p->buf);
    arg_long(&a, at(p, src[i]));
    arg_long(&a, at(p, dst[i]));
    arg_long(&a, (cl_long)n[i]);
    arg_int(&a, l->cmp_chunks);
    size_t local = 64, global = ceil_div(n[i], local) * local;
    CHECK_STATUS(args_launch(ctx, c, &a, 1, &global, &local));
  }
  return CLNSA_SUCCESS;
}

static clnsa_status enqueue_finalize(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  const nsa_dims *d = p->d;
  const bwd_layout *l = &p->lay;
  const cl_long nr = (cl_long)d->B * d->TQ * d->HQ, nk = (cl_long)d->B * d->TK * d->H;
  size_t local = (size_t)(p->walk_q.lanes * p->walk_q.rows);
  kargs a = args_begin(p->fin_q);
  arg_tensor(&a, p->g->dq);
  arg_mem(&a, p->buf);
  arg_long(&a, at(p, l->dq));
  arg_long(&a, nr);
  arg_int(&a, d->TQ);
  arg_int(&a, d->HQ);
  size_t global = ceil_div((size_t)nr, (size_t)p->walk_q.rows) * local;
  CHECK_STATUS(args_launch(ctx, c, &a, 1, &global, &local));

  local = (size_t)(p->walk_kv.lanes * p->walk_kv.rows);
  a = args_begin(p->fin_kv);
  arg_tensor(&a, p->g->dk);
  arg_tensor(&a, p->g->dv);
  arg_mem(&a, p->buf);
  arg_mem(&a, p->buf);
  arg_long(&a, at(p, l->offsets));
  arg_long(&a, at(p, l->sel_k));
  arg_long(&a, at(p, l->sel_v));
  arg_long(&a, at(p, l->win_k));
  arg_long(&a, at(p, l->win_v));
  arg_long(&a, at(p, l->cmp_k));
  arg_long(&a, at(p, l->cmp_v));
  arg_int(&a, p->swa);
  arg_int(&a, p->cmp);
  arg_int(&a, d->BS);
  arg_seq(&a, d);
  global = ceil_div((size_t)nk, (size_t)p->walk_kv.rows) * local;
  return args_launch(ctx, c, &a, 1, &global, &local);
}

static clnsa_status backward_stages(clnsa_context *ctx, const bwd_plan *p, enqueue_chain *c) {
  CHECK_STATUS(enqueue_gates(ctx, p, c));
  CHECK_STATUS(enqueue_selection(ctx, p, c));
  const bool runs[3] = {true, p->cmp, p->swa};
  /* selected first: its dq kernel writes the accumulator, the others add */
  for (int x = 0; x < 3; x++)
    if (runs[x]) CHECK_STATUS(enqueue_dq(ctx, p, x, c));
  for (int x = 0; x < 3; x++)
    if (runs[x]) CHECK_STATUS(enqueue_dkdv(ctx, p, x, c));
  if (p->cmp) CHECK_STATUS(enqueue_reduce(ctx, p, c));
  return enqueue_finalize(ctx, p, c);
}

clnsa_status clnsa_backward(clnsa_context *ctx, const clnsa_params *params, const clnsa_inputs *in,
                            const clnsa_tensor *d_o, const clnsa_grads *grads, clnsa_workspace *ws,
                            cl_uint nwait, const cl_event *wait, cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d;
  CHECK_STATUS(inputs_validate(ctx, params, in, &d));
  int64_t so[4];
  dims_shape_o(&d, so);
  CHECK_STATUS(tensor_check(ctx, d_o, "d_o", 4, so, DT_FLOAT));
  CHECK_STATUS(check_grads(ctx, &d, in, grads));
  if (nwait > 0 && !wait)
    return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT,
                      "event_wait_list is NULL but num_events_in_wait_list is %u", nwait);
  CHECK_STATUS(check_workspace(ctx, &d, in, ws));

  bwd_plan p;
  memset(&p, 0, sizeof p);
  p.d = &d;
  p.in = in;
  p.d_o = d_o;
  p.g = grads;
  p.cmp = in->g_cmp != NULL;
  p.swa = ws->last.window;
  p.tune = tuning_backward(ctx, d.DK, d.DV, d.G);
  if (bwd_mma_fits(&d, in, d_o)) {
    int mode = MMA_OFF;
    CHECK_STATUS(mma_mode(ctx, &mode));
    p.mma_emulated = mode == MMA_EMULATED;
    /* CLNSA_TUNE=BWD_MMA=0 keeps the backward on the portable kernels */
    p.mma = mode != MMA_OFF && tuning_env_int("BWD_MMA", 1, 0) &&
            bwd_mma_configure(ctx, &d, p.mma_emulated, &p);
  }
  /* the selected dq kv-block-major where its partials were reserved (kvq_pass_tokens) */
  size_t kvq_tokens;
  CHECK_STATUS(kvq_pass_tokens(ctx, &d, in, &kvq_tokens));
  p.kvq = kvq_tokens > 0 && p.mma;
  p.kvq_nw = kvq_warps(p.mma_emulated);
  scratch_layout(&d, kvq_tokens, &p.lay);
  plan_views(&p, ws);
  /* CLNSA_TUNE=BWD_CMP_MMA=n: bit 0 the compressed dq, bit 1 its dk/dv on tensor cores */
  const int cmp_parts =
      bwd_mma_cmp_configure(ctx, &d, in, &p) ? tuning_env_int("BWD_CMP_MMA", 3, 0) : 0;
  p.cmp_dq_mma = cmp_parts & 1;
  p.cmp_kv_mma = (cmp_parts & 2) != 0;
  CHECK_STATUS(plan_kernels(ctx, &p));

  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  clnsa_status st = backward_stages(ctx, &p, &c);
  if (st == CLNSA_SUCCESS) st = chain_end(ctx, &c, event);
  if (st != CLNSA_SUCCESS) chain_abort(&c);
  return st;
}
