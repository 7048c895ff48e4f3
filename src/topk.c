/* Top-k block selection: launches cl/topk.cl (one work-group per query row and kv head). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Tunables of cl/topk.cl; see the kernel's header comment for what each one is. */
typedef struct topk_tuning {
  int tile; /* candidates per tile */
  int wg;   /* work-items: tile * g shares */
  int gc;   /* query rows in local memory at once */
  int gr;   /* query rows scored together in registers */
} topk_tuning;

/* Portable ceiling on local memory: NVIDIA's OpenCL gives 48 KiB, and a CPU device that
 * claims more should still run the configuration the GPUs run. */
#define TOPK_LOCAL_CAP 49152u
#define TOPK_LIST_MAX 128 /* SMAX in the kernel */

static int round_up(int x, int m) {
  return (x + m - 1) / m * m;
}

/* Bytes of the kernel's __local arrays, mirroring their declarations. */
static size_t topk_local_bytes(int dk, const topk_tuning *t) {
  const size_t dkp4 = (size_t)(dk + 3) / 4, kst4 = dkp4 | 1, gcp = (size_t)round_up(t->gc, t->gr);
  const size_t words = (size_t)t->tile * kst4 * 4 + gcp * dkp4 * 4 + gcp + (size_t)t->wg +
                       (size_t)t->tile + 4 * TOPK_LIST_MAX + 1;
  return words * sizeof(float);
}

/* CLNSA_TUNE may name TOPK_TILE, TOPK_WG, TOPK_GC, TOPK_GR (experiments only). */
static void topk_tune_env(topk_tuning *t) {
  t->tile = tuning_env_int("TOPK_TILE", t->tile, 1);
  t->wg = tuning_env_int("TOPK_WG", t->wg, 1);
  t->gc = tuning_env_int("TOPK_GC", t->gc, 1);
  t->gr = tuning_env_int("TOPK_GR", t->gr, 1);
}

/* Largest tile whose key tile and all G query rows fit (CPUs try 64, 32, 16; GPUs 32, 16:
 * on an H200 a 32-candidate tile in groups of 128 work-items ran 1.3-1.5x faster than 64
 * in 256, from the extra groups per compute unit); otherwise the query rows stream in
 * chunks of as many as fit. GPUs split the g rows of each candidate across 4 work-items
 * (an H200 preferred this even at G = 1: the extra work-items load and merge). */
static clnsa_status topk_tune(clnsa_context *ctx, int dk, int g, topk_tuning *t) {
  const device_info *info = &ctx->info;
  const size_t cap =
      info->local_mem && info->local_mem < TOPK_LOCAL_CAP ? info->local_mem : TOPK_LOCAL_CAP;
  const size_t budget = cap > 1024 ? cap - 256 : cap;
  const bool cpu = (info->type & CL_DEVICE_TYPE_CPU) != 0;
  const int cpu_tiles[3] = {64, 32, 16}, gpu_tiles[2] = {32, 16};
  const int *tiles = cpu ? cpu_tiles : gpu_tiles, ntiles = cpu ? 3 : 2;
  const int split = cpu ? 1 : 4;
  t->gr = 4;
  bool found = false;
  for (int i = 0; i < ntiles && !found; i++) { /* all query rows resident */
    t->tile = tiles[i];
    t->wg = t->tile * split;
    t->gc = round_up(g, t->gr);
    found = topk_local_bytes(dk, t) <= budget && (size_t)t->tile <= info->max_wg;
  }
  for (int i = 0; i < 2 && !found; i++) { /* query rows in chunks */
    t->tile = gpu_tiles[i];
    t->wg = t->tile * split;
    t->gc = round_up(g, t->gr);
    while (t->gc > t->gr && topk_local_bytes(dk, t) > budget) t->gc -= t->gr;
    found = topk_local_bytes(dk, t) <= budget && (size_t)t->tile <= info->max_wg;
  }
  while ((size_t)t->wg > info->max_wg && t->wg > t->tile) t->wg -= t->tile;
  topk_tune_env(t);
  if (!found || t->tile < 1 || t->gr < 1 || t->gc < 1 || t->wg < t->tile || t->wg % t->tile != 0 ||
      (size_t)t->wg > info->max_wg)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED,
                      "top-k: no tile configuration fits %llu bytes of local memory for DK=%d",
                      (unsigned long long)budget, dk);
  return CLNSA_SUCCESS;
}

/* Shape of the tensor-core top-k (cl/topk_mma.cl): warps per group, query tokens per warp,
 * candidates per step, candidate slots per token. */
typedef struct topk_mma_shape {
  int nw, mt, tpw, kt, cap;
  int list; /* > 0: each lane's best `list` candidates in registers instead of importances */
} topk_mma_shape;

/* Longest register list of cl/topk_mma.cl (its LIST): S = 19 selected blocks. */
#define TOPK_REG_LIST_MAX 16

/* Local memory of cl/topk_mma.cl, mirroring its __local arrays: per warp TPW tokens x CAP
 * importances and a selection list (with LIST: TPW selection lists of LIST + 3), the
 * staged k_cmp tile (rows padded by 64 bytes; f32 kept as hi and lo), the emulation's
 * scratch, and 1 KiB of slack. */
static size_t topk_mma_local_bytes(const nsa_dims *d, bool kc_f32, bool emulate,
                                   const topk_mma_shape *m) {
  const size_t stage = 16 * (size_t)m->kt * (size_t)(d->DK / 8 + 4) * (kc_f32 ? 2 : 1);
  const size_t nw = (size_t)m->nw, tpw = (size_t)m->tpw;
  const size_t per_warp = m->list ? 4 * tpw * (size_t)(m->list + 3)
                                  : 4 * (tpw * (size_t)m->cap + TOPK_LIST_MAX);
  return nw * per_warp + 4 * nw + stage + (emulate ? 4 * 32 * 6 : 0) + 1024;
}

/* Tensor-core top-k (cl/topk_mma.cl): q f16/bf16 with k_cmp of q's type (or f32 with
 * bf16 q), G a power of two up to 16 (a token's rows inside one 16-row tile), DK in
 * 32-wide chunks, 16-byte rows. With register lists (G <= 4, S <= 19) a warp takes
 * 16 MT / G tokens and NW = 4. Otherwise each warp keeps TPW tokens x CAP candidate
 * blocks of importances in local memory, which long sequences outgrow (G = 1, T = 65536:
 * 64 KiB per warp at TPW = 16, NVIDIA gives 48). The first shape that fits wins, trying
 * TPW = 16 MT / G (capped: tpw_cap below) down to 1 (fewer tokens per warp leave mma rows
 * idle, rather than leave the tensor cores for the portable kernel), for each NW = nw0
 * (8 at G = 1 with arrays, else 4) halved down to 1 (more tokens share each staged tile;
 * the emulation runs one warp per group), for each KT = 32 then 16 (32: 99 registers with
 * f32 k_cmp, tools/ptx_check.sh; 16 frees half the staged tile). With arrays, G = 1,
 * T = 65536, DK = 128 in 48 KiB gets TPW = 2 (the cap), NW = 4, KT = 16 (f32 k_cmp) or 32;
 * G = 16 there MT = 2, TPW = 2, NW = 4, KT = 16. CLNSA_TUNE's TOPK_KT fixes KT, TOPK_TPW
 * caps TPW, TOPK_MT sets MT (tests, experiments). Returns false where the portable kernel
 * runs. */
static bool topk_mma_shape_for(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                               const clnsa_tensor *k_cmp, bool emulate, topk_mma_shape *m) {
  const clnsa_dtype dt = q->dtype;
  const int G = d->G;
  if (!((dt == CLNSA_F16 || dt == CLNSA_BF16) &&
        (k_cmp->dtype == dt || (dt == CLNSA_BF16 && k_cmp->dtype == CLNSA_F32)) &&
        (G == 1 || G == 2 || G == 4 || G == 8 || G == 16) && d->DK % 32 == 0 && d->DK <= 256 &&
        tensor_rows_aligned16(q, d->DK) && tensor_rows_aligned16(k_cmp, d->DK)))
    return false;
  const int tk = d->seqs ? d->seqs->max_k : d->TK;
  m->cap = (tk + d->BS - 1) / d->BS;
  if (m->cap < 1) m->cap = 1;
  /* Register lists (LIST = S - 3, the rounds a token can need; 1 where S <= 3 and there
   * are none) for G <= 4 where they fit TOPK_REG_LIST_MAX: no importances in local
   * memory, so every warp fills its mma rows and the TPW cap below does not apply. H200,
   * bf16, f32 k_cmp, D = 128, S = 16, top-k ms at T = 16k / 64k, arrays -> lists
   * (2026-11-28, docs/bench/h200-2026-11-28-s11-topk-list.jsonl): G = 1 0.258 -> 0.162 /
   * 3.38 -> 1.49, G = 2 0.262 -> 0.188 / 3.48 -> 1.88, G = 4 0.346 -> 0.279 / 3.54 ->
   * 2.90; G = 8 0.459 -> 0.452 / 4.05 -> 4.57, G = 16 (8k / 64k) 0.218 -> 0.275 / 5.92 ->
   * 7.74. From G = 8 on a lane owns one slot of a step, so every step runs a whole
   * insertion for few candidates, where the arrays' selection is cheap against the mma.
   * CLNSA_TUNE's TOPK_LIST_G sets the largest G with lists (0: never). */
  m->list = d->S <= 3 ? 1 : d->S - 3;
  if (m->list > TOPK_REG_LIST_MAX || G > tuning_env_int("TOPK_LIST_G", 4, 0)) m->list = 0;
  const int kt_fixed = tuning_env_int("TOPK_KT", 0, 16);
  const int kts[2] = {kt_fixed ? kt_fixed : 32, 16}, nkt = kt_fixed ? 1 : 2;
  /* Fewer tokens a warp than fit: each token's CAP importances fill local memory, so many
   * tokens a warp leave few warps per SM, and a warp runs its tokens' selections one after
   * another; with long candidate lists that costs more than the staged k_cmp tiles that
   * fewer tokens share less. H100, bf16, D = 128, top-k ms at T = 8k / 16k / 64k
   * (2026-11-28, docs/bench/h100-2026-11-28-s8-topk-tpw.jsonl): G = 1 with TPW 8 (first
   * fit) 0.128 / 0.352 / 4.41, capped at 4 0.118 / 0.311 / 3.37, at 2 0.140 / 0.354 / 3.35;
   * G = 2 TPW 8 0.134 / 0.260 / 5.11, at 2 0.144 / 0.362 / 3.46; G = 4 TPW 4 0.151 / 0.343 /
   * 4.02, at 2 0.147 / 0.367 / 3.51 (16-bit k_cmp alike: G = 1 at 64k 3.54 -> 2.25). Hence
   * 2 where a token has 1024 or more candidates, 4 at G = 1 below that. */
  const int tpw_cap =
      tuning_env_int("TOPK_TPW", m->list ? 32 : m->cap >= 1024 ? 2 : G == 1 ? 4 : 32, 1);
  /* MT = 2: two 16-row m-tiles a warp share each staged k_cmp fragment, for G = 16 (H100,
   * bf16, f32 k_cmp, D = 128: 6.92 -> 6.03 ms at 64k with 16 candidates and 4 warps,
   * 0.191 -> 0.199 ms at 8k; at G = 1 it lost at 8k, 0.183 -> 0.200). TOPK_MT overrides. */
  m->mt = tuning_env_int("TOPK_MT", G == 16 ? 2 : 1, 1) >= 2 ? 2 : 1;
  /* Warps a group, the first tried: with importance arrays 8 at G = 1, where a warp's
   * tokens fill few mma rows and more tokens then share each staged k_cmp tile (H200,
   * bf16, D = 128: 0.314 -> 0.259 ms at 16k, 0.120 -> 0.116 at 8k; at 64k eight warps'
   * importances do not fit: 4), else 4 (G = 16 with 8: 0.609 -> 0.806 ms at 16k). With
   * lists 4 (G = 1, 64k: 1.49 ms; 8 warps 1.72, 2 warps 1.81; likewise at G = 2, 4).
   * CLNSA_TUNE TOPK_NW overrides. */
  const int nw0 = tuning_env_int("TOPK_NW", G == 1 && !m->list ? 8 : 4, 1);
  int tpw0 = 16 * m->mt / G;
  while (tpw0 > tpw_cap) tpw0 /= 2;
  for (m->tpw = tpw0; m->tpw >= 1; m->tpw /= 2)
    for (m->nw = emulate ? 1 : nw0; m->nw >= 1; m->nw /= 2)
      for (int i = 0; i < nkt; i++) {
        m->kt = kts[i];
        if (topk_mma_local_bytes(d, k_cmp->dtype == CLNSA_F32, emulate, m) <=
                (size_t)ctx->info.local_mem &&
            (size_t)(32 * m->nw) <= ctx->info.max_wg)
          return true;
      }
  return false;
}

clnsa_status topk_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                          const clnsa_tensor *k_cmp, const clnsa_tensor *lse_cmp,
                          const clnsa_tensor *block_counts, const clnsa_tensor *block_indices,
                          enqueue_chain *c) {
  int mma = MMA_OFF;
  if (q->dtype != CLNSA_F32) CHECK_STATUS(mma_mode(ctx, &mma));
  topk_mma_shape m = {0, 0, 0, 0, 0, 0};
  const bool tensor_cores =
      mma != MMA_OFF && topk_mma_shape_for(ctx, d, q, k_cmp, mma == MMA_EMULATED, &m);
  build_options o = {{0}, 0};
  size_t local[2] = {1, 1}, global[2] = {1, (size_t)d->H};
  const char *file = "topk.cl", *name = "topk_select";
  cl_int tiles = 0;
  if (tensor_cores) {
    const int per = m.nw * m.tpw; /* tokens per group */
    const size_t maxq = d->seqs ? (size_t)d->seqs->max_q : (size_t)d->TQ;
    const size_t nseg = d->seqs ? (size_t)d->seqs->n : (size_t)d->B;
    tiles = (cl_int)((maxq + (size_t)per - 1) / (size_t)per);
    file = "warp_ops.cl+attend_setup.cl+topk_mma.cl", name = "topk_mma_select";
    options_add(&o, "-DDK=%d -DWG=%d -DNW=%d -DGQ=%d -DMT=%d -DTPW=%d -DCAP=%d -DBS=%d -DKT=%d",
                d->DK, 32 * m.nw, m.nw, d->G, m.mt, m.tpw, m.cap, d->BS, m.kt);
    options_add(&o, " -DMMA_DT=%d -DLIST=%d", (int)q->dtype, m.list);
    options_add(&o, " -DWARP_EMULATE=%d", mma == MMA_EMULATED);
    local[0] = (size_t)(32 * m.nw);
    global[0] = nseg * (size_t)tiles * local[0];
  } else {
    topk_tuning t;
    CHECK_STATUS(topk_tune(ctx, d->DK, d->G, &t));
    options_add(&o, "-DDK=%d -DTILE=%d -DWG=%d -DGC=%d -DGR=%d", d->DK, t.tile, t.wg, t.gc, t.gr);
    local[0] = (size_t)t.wg;
    global[0] = (size_t)d->B * (size_t)d->TQ * local[0];
  }
  options_add_dtype(&o, "Q", q);
  options_add_dtype(&o, "KC", k_cmp);
  tuning_env_override(&o);
  cl_kernel kern;
  CHECK_STATUS(program_kernel(ctx, file, o.text, name, &kern));
  const cl_int has_counts = block_counts != NULL;
  const cl_int ints[4] = {has_counts, d->S, d->BS, d->G};
  const cl_float scale = d->scale;
  cl_uint arg = 0;
  cl_int err = tensor_set_args(kern, &arg, q);
  err |= tensor_set_args(kern, &arg, k_cmp);
  err |= tensor_set_args(kern, &arg, lse_cmp);
  err |=
      block_counts ? tensor_set_args(kern, &arg, block_counts) : tensor_set_absent_args(kern, &arg);
  err |= tensor_set_args(kern, &arg, block_indices);
  for (int i = 0; i < 4; i++) err |= clSetKernelArg(kern, arg++, sizeof(cl_int), &ints[i]);
  err |= clSetKernelArg(kern, arg++, sizeof scale, &scale);
  err |= dims_set_seq_args(kern, &arg, d);
  if (tensor_cores) err |= clSetKernelArg(kern, arg++, sizeof tiles, &tiles);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clSetKernelArg(top-k)");
  return chain_launch(ctx, c, kern, 2, global, local);
}

clnsa_status clnsa_topk(clnsa_context *ctx, const clnsa_params *params, const clnsa_seqs *seqs,
                        const clnsa_tensor *q, const clnsa_tensor *k_cmp,
                        const clnsa_tensor *lse_cmp, const clnsa_tensor *block_counts,
                        const clnsa_tensor *block_indices, cl_uint nwait, const cl_event *wait,
                        cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d = {0};
  CHECK_STATUS(dims_params(ctx, params, &d));
  CHECK_STATUS(dims_cmp(ctx, seqs, q, k_cmp, NULL, &d));
  int64_t rows[3], counts[3], idx[4];
  dims_shape_rows(&d, rows);
  dims_shape_counts(&d, counts);
  dims_shape_idx(&d, idx);
  CHECK_STATUS(tensor_check(ctx, lse_cmp, "lse_cmp", 3, rows, 1u << CLNSA_F32));
  /* Counts must lie in [0, S]; they are device data, so the kernel clamps them rather
   * than the host reading them back (which would block). */
  if (block_counts)
    CHECK_STATUS(tensor_check(ctx, block_counts, "block_counts", 3, counts, DT_INT));
  CHECK_STATUS(tensor_check(ctx, block_indices, "block_indices", 4, idx, DT_INT));
  if (nwait > 0 && !wait)
    return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "event_wait_list is NULL with %u events",
                      nwait);
  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  clnsa_status st = topk_enqueue(ctx, &d, q, k_cmp, lse_cmp, block_counts, block_indices, &c);
  if (st != CLNSA_SUCCESS) {
    chain_abort(&c);
    return st;
  }
  return chain_end(ctx, &c, event);
}
