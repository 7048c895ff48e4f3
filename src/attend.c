/* Compressed, selected and sliding-window attention: launches cl/attend.cl, one flash-
 * attention kernel whose MODE picks how each query row's key set is built, or its
 * tensor-core twins cl/attend_mma.cl (f16/bf16) and cl/attend_tf32.cl (f32 with
 * CLNSA_FLAG_TF32) where the context has a tensor-core path. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { MODE_COMPRESSED = 0, MODE_WINDOW = 1, MODE_SELECTED = 2 };

/* Tunables of attend_fwd (see the thread layouts at the top of cl/attend.cl). */
typedef struct attend_config {
  int rows, kt, wg, kw, dw;
  int tpg, ucap; /* selected branch: query tokens per group, capacity of their block union */
  int vearly;    /* tensor-core kernel: V loads issued with K loads */
  int mt;        /* tensor-core kernel, compressed and window: 16-row m-tiles per warp */
  int wg_n_v;    /* > 0: compressed and window on wgmma (Hopper), dims per P V instruction */
} attend_config;

static int pow2_floor(long x) {
  int p = 1;
  while ((long)p * 2 <= x) p *= 2;
  return p;
}
static int pow2_ceil(long x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}
/* Largest power of two p with p*p <= x. */
static int pow2_sqrt(long x) {
  int p = 1;
  while ((long)(2 * p) * (2 * p) <= x) p *= 2;
  return p;
}
static bool is_pow2(int x) {
  return x > 0 && (x & (x - 1)) == 0;
}

/* Bytes of __local memory attend_fwd declares for a configuration. */
static size_t attend_local_bytes(int mode, int dk, int dv, const attend_config *c) {
  size_t kvld = (size_t)(dk + 1 > dv ? dk + 1 : dv);
  size_t floats = (size_t)c->rows * (dk + 1) + (size_t)c->kt * kvld +
                  (size_t)c->rows * (c->kt + 1) + (size_t)c->rows * c->kw + 4 * (size_t)c->rows;
  size_t ints = 4 * (size_t)c->rows + 1;
  if (mode == MODE_SELECTED && c->tpg > 1) {
    ints += 2 * (size_t)c->ucap;                                                 /* list, msk */
    if (2 * (size_t)c->ucap > (size_t)c->kt * kvld) ints += 2 * (size_t)c->ucap; /* scratch */
  } else if (mode == MODE_SELECTED) {
    ints += 2 * CLNSA_MAX_BLOCK_COUNT;
  }
  return 4 * (floats + ints);
}

/* Register tiles: an item owning a x b outputs loads a + b values per step, so the
 * splits keep a and b near equal (KW keys x RA rows; DW columns x RB rows). */
static void attend_split(attend_config *c, int dv) {
  const int min_lanes = c->wg / c->rows; /* fewer lanes leave row groups without rows */
  int kw = pow2_sqrt((long)c->wg * c->kt / c->rows);
  kw = kw < min_lanes ? min_lanes : kw;
  c->kw = kw > c->kt ? c->kt : kw; /* then some row groups idle (ROWS * KT < WG) */
  int dw = pow2_sqrt((long)c->wg * dv / c->rows);
  dw = dw < min_lanes ? min_lanes : dw;
  if (dw > pow2_ceil(dv) && pow2_ceil(dv) >= min_lanes) dw = pow2_ceil(dv);
  c->dw = dw > c->wg ? c->wg : dw;
  c->kw = tuning_env_int("KW", c->kw, 0);
  c->dw = tuning_env_int("DW", c->dw, 0);
}

static bool attend_valid(const attend_config *c) {
  return is_pow2(c->rows) && is_pow2(c->kt) && is_pow2(c->wg) && is_pow2(c->kw) && is_pow2(c->dw) &&
         c->rows <= c->wg && c->kw <= c->kt && c->kw <= c->wg && c->dw <= c->wg;
}

/* Rows per group before local memory shrinks them: 32 rows share each K/V tile. On an
 * H200 (D=128, bf16) 32 rows ran the compressed and window branches 25% faster than 16. */
#define ATTEND_ROWS 32

/* Selected branch: the union of TPG tokens' block lists is built with O((TPG*S)^2) local
 * comparisons per group; past this many entries the setup would rival the attention. */
#define ATTEND_UNION_MAX 512

/* Selected branch with G <= rows / 4: TPG = rows / G tokens per group (at most 32, the bits of
 * a membership mask, and at most ATTEND_UNION_MAX / S), then rows cut to the power of two
 * that holds TPG * G. With TPG = 1 a group owns the G heads of one token (rows chunks). */
static void attend_tokens(attend_config *c, const nsa_dims *d, bool keep_rows) {
  c->tpg = 1;
  c->ucap = 0;
  /* Pack only where at least 4 tokens fit: the one-token layout is what was measured on
   * NVIDIA at G >= 16 (docs/PERFORMANCE.md); packing there is unmeasured. */
  if (d->G * 4 > c->rows) {
    if (!keep_rows && pow2_ceil(d->G) < c->rows) c->rows = pow2_ceil(d->G);
    return;
  }
  int tpg = c->rows / d->G, cap = ATTEND_UNION_MAX / (d->S > 0 ? d->S : 1);
  if (tpg > 32) tpg = 32;
  if (tpg > cap) tpg = cap;
  if (tpg < 1) tpg = 1;
  c->tpg = tpg;
  if (!keep_rows) c->rows = pow2_ceil((long)tpg * d->G);
  if (tpg > 1) c->ucap = tpg * (d->S > 0 ? d->S : 1);
}

/* Sizes from the device's tuning, then keys per tile and rows halved until the local
 * arrays fit. The selected branch packs TPG tokens into a group when G is small (see
 * attend_tokens); with one token per group it takes longer key tiles. */
static clnsa_status attend_configure(clnsa_context *ctx, int mode, const nsa_dims *d,
                                     attend_config *c) {
  attend_tuning t = tuning_attend(ctx, d->DK, d->DV, ATTEND_ROWS);
  c->wg = pow2_floor(t.threads > 1 ? t.threads : 1);
  c->rows = pow2_floor(t.rows > 1 ? t.rows : 1);
  if (c->rows > c->wg) c->rows = c->wg;
  c->rows = tuning_env_int("ROWS", c->rows, 0);
  c->tpg = 1, c->ucap = 0;
  if (mode == MODE_SELECTED) attend_tokens(c, d, tuning_env_int("ROWS", 0, 0) != 0);
  c->kt = c->rows <= 4 ? 64 : 32;
  c->kt = tuning_env_int("KT", c->kt, 0);
  c->wg = tuning_env_int("WG", c->wg, 0);
  const bool fixed = tuning_env_int("ROWS", 0, 0) || tuning_env_int("KT", 0, 0);
  size_t budget = ctx->info.local_mem > 2048 ? (size_t)ctx->info.local_mem - 1024 : 32768;
  for (;;) {
    attend_split(c, d->DV);
    if (!attend_valid(c))
      return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT,
                        "attend_fwd: ROWS=%d KT=%d WG=%d KW=%d DW=%d is not a valid layout "
                        "(check CLNSA_TUNE)",
                        c->rows, c->kt, c->wg, c->kw, c->dw);
    if (attend_local_bytes(mode, d->DK, d->DV, c) <= budget) break;
    if (fixed || (c->kt <= 8 && c->rows <= 1))
      return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED,
                        "attend_fwd: %zu bytes of local memory needed, the device has %zu",
                        attend_local_bytes(mode, d->DK, d->DV, c), budget);
    if (c->kt > 8) {
      c->kt /= 2;
    } else {
      c->rows /= 2;
      if (mode == MODE_SELECTED) attend_tokens(c, d, false);
    }
  }
  if ((size_t)c->wg > ctx->info.max_wg)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED, "attend_fwd: work-group %d > device limit %zu",
                      c->wg, ctx->info.max_wg);
  return CLNSA_SUCCESS;
}

/* Tensor-core path (cl/attend_mma.cl): q f16 or bf16; k and v of q's type, or f32 with
 * bf16 q (split into two bf16 terms: the whole forward's f32 k_cmp/v_cmp); head dims in
 * 32-wide chunks (the 16-byte fragment loads), rows aligned to 16 bytes, and head dims
 * the register budget holds: 128 for the accumulators, 256 for q (see PERFORMANCE.md). */
bool attend_mma_fits(const nsa_dims *d, const clnsa_tensor *q, const clnsa_tensor *k,
                            const clnsa_tensor *v) {
  const clnsa_dtype dt = q->dtype;
  const bool split = dt == CLNSA_BF16;
  return (dt == CLNSA_F16 || dt == CLNSA_BF16) &&
         (k->dtype == dt || (split && k->dtype == CLNSA_F32)) &&
         (v->dtype == dt || (split && v->dtype == CLNSA_F32)) && d->DK % 32 == 0 &&
         d->DV % 32 == 0 && d->DK <= 256 && d->DV <= 128 && tensor_rows_aligned16(q, d->DK) &&
         tensor_rows_aligned16(k, d->DK) && tensor_rows_aligned16(v, d->DV);
}

/* Rows, token packing and the local bytes other than staged K/V tiles, shared by the
 * tensor-core kernels (cl/attend_mma.cl, cl/attend_tf32.cl): the selected branch takes 16
 * rows per group (16/G tokens packed when G < 16, the union of their block lists in local
 * memory) and merges its nw warps' partial states; compressed and window take 16 mt rows
 * a warp. */
static size_t mma_rows_layout(int mode, const nsa_dims *d, int nw, int mt, attend_config *c) {
  c->kw = c->dw = 0;
  c->tpg = 1, c->ucap = 0;
  c->rows = mode == MODE_SELECTED ? 16 : 16 * nw * mt;
  if (mode == MODE_SELECTED && d->G < 16) {
    int tpg = 16 / d->G, cap = ATTEND_UNION_MAX / (d->S > 0 ? d->S : 1);
    tpg = tpg > cap ? cap : tpg;
    if (tpg > 1) c->tpg = tpg, c->ucap = tpg * (d->S > 0 ? d->S : 1);
  }
  size_t bytes = 16 * (size_t)c->rows;
  if (mode == MODE_SELECTED) {
    const size_t merge = (size_t)nw * 16 * (size_t)(d->DV + 4);
    bytes += 4 * (2 * (size_t)nw * 16 + merge);
    bytes += c->tpg > 1 ? 8 * (size_t)c->ucap * (2 * (size_t)c->ucap > merge ? 2 : 1)
                        : 8 * (size_t)CLNSA_MAX_BLOCK_COUNT;
  }
  return bytes;
}

/* Warps per group and keys per step of cl/attend_mma.cl; rows and token packing as in
 * attend_tokens (16 rows: one mma tile). Returns false where local memory is short. */
static bool attend_mma_configure(clnsa_context *ctx, int mode, const nsa_dims *d, bool emulate,
                                 bool k32, bool v32, bool wgmma, attend_config *c) {
  const bool split = k32 || v32;
  c->wg_n_v = 0;
  if (mode != MODE_SELECTED && wgmma && !(v32 && tuning_env_int("V_SPLIT", 0, 0))) {
    /* wgmma (cl/wgmma_ops.cl): NW/4 warpgroups of 64 rows share each staged tile (WG_NW,
     * 4 or 8 warps); keys per step = the S instruction's columns, 32 or 64 (WG_KT) */
    const int nw = emulate ? 1 : tuning_env_int("WG_NW", 4, 4) / 4 * 4;
    c->wg = 32 * nw, c->mt = 1, c->vearly = 0;
    c->kt = tuning_env_int("WG_KT", 32, 32) >= 64 ? 64 : 32;
    c->wg_n_v = d->DV % 64 == 0 ? 64 : 32;
    size_t bytes = mma_rows_layout(mode, d, nw, 1, c);
    bytes += 2 * (size_t)c->kt * ((size_t)d->DK * (k32 ? 2 : 1) + (size_t)d->DV) + 256;
    if (emulate) bytes += 4 * 32 * 6;
    if ((size_t)c->wg <= ctx->info.max_wg && bytes + 1024 <= (size_t)ctx->info.local_mem)
      return true;
    c->wg_n_v = 0; /* too big here: the mma.sync layout below */
  }
  /* warps per group: MMA_NW for the selected branch (they would split one token's keys:
   * one warp walks them all, H200, bf16, G = 16, 64k: 14.9 ms, 15.8 with two warps, 17.7
   * with four, which merged their partial outputs at the end and fitted fewer groups an
   * SM), MMA_NWD for compressed and window (each owns 16 MT rows; they share the staged
   * tiles) */
  const int nw = emulate ? 1
                         : mode == MODE_SELECTED ? tuning_env_int("MMA_NW", 1, 1)
                                                 : tuning_env_int("MMA_NWD", 4, 1);
  c->wg = 32 * nw;
  /* Selected branch: keys per step and early V loads, from H200 runs (bf16, D=128, G=16,
   * 8k): 32 keys 3.02 ms, 16 keys 2.15 ms, 16 keys with the tile's V loads issued before
   * S = Q K^T 2.08 ms (ptxas: 204 registers, no spills); the f32 split doubles the K/V
   * fragments, and early V would need 255 registers. Compressed and window stage each
   * tile in local memory for the group. The compressed branch gives each warp two 16-row
   * m-tiles (MT) that share every staged fragment it reads: on the H100 (bf16, f32 k_cmp,
   * D=128, G=16) 0.346 / 10.3 ms at 8k / 64k against 0.438 / 12.9 with one m-tile and 16
   * keys (MT=2 with 16 keys: 0.340 / 11.1). Since the V fragments come by ldmatrix, 16
   * keys a step are faster there too (H200, 64k: 9.00 against 9.94 ms with 32). The window
   * branch keeps one m-tile (no change on the dense 8k run) and 32 keys (16 with the
   * split). */
  c->mt = mode == MODE_SELECTED ? 1 : tuning_env_int("MMA_MT", mode == MODE_COMPRESSED ? 2 : 1, 1);
  /* the emulation (tests on CPUs) takes 16 keys: with two m-tiles, 32 keys unroll into
   * hundreds of emulated mma, each two barriers, that PoCL compiles for minutes */
  const int keys = mode != MODE_WINDOW || (split && c->mt == 1) || emulate ? 16 : 32;
  c->kt = tuning_env_int("MMA_KT", keys, 16);
  c->vearly = mode == MODE_SELECTED ? tuning_env_int("VEARLY", split ? 0 : 1, 0) : 0;
  size_t bytes = mma_rows_layout(mode, d, nw, c->mt, c);
  /* staged K/V tiles (K rows swizzled, V rows padded by 16 bytes for ldmatrix: VLDM);
   * f32 K kept as hi and lo, f32 V as hi alone unless V_SPLIT (cl/attend_mma.cl) */
  if (mode != MODE_SELECTED) {
    const size_t kt = (size_t)c->kt;
    bytes += 2 * kt * (size_t)d->DK * (k32 ? 2 : 1);
    bytes += kt * (2 * (size_t)d->DV + 16) * (v32 && tuning_env_int("V_SPLIT", 0, 0) ? 2 : 1);
  }
  if (emulate) bytes += 4 * 32 * 6;
  return c->kt % 16 == 0 && (c->mt == 1 || c->mt == 2) && (size_t)c->wg <= ctx->info.max_wg &&
         bytes + 1024 <= (size_t)ctx->info.local_mem;
}

/* TF32 path (cl/attend_tf32.cl, only with CLNSA_FLAG_TF32): q, k and v f32, head dims in
 * 16-byte units per lane (DK a multiple of 16, DV of 32), rows aligned to 16 bytes, and
 * head dims the register budget holds (q and the accumulators: DK/2 + DV/2 per lane). */
static bool attend_tf32_fits(const nsa_dims *d, const clnsa_tensor *q, const clnsa_tensor *k,
                             const clnsa_tensor *v) {
  return d->tf32 && q->dtype == CLNSA_F32 && k->dtype == CLNSA_F32 && v->dtype == CLNSA_F32 &&
         d->DK % 16 == 0 && d->DV % 32 == 0 && d->DK <= 128 && d->DV <= 128 &&
         tensor_rows_aligned16(q, d->DK) && tensor_rows_aligned16(k, d->DK) &&
         tensor_rows_aligned16(v, d->DV);
}

/* Warps, keys per step and token packing of cl/attend_tf32.cl: the layouts of
 * attend_mma_configure. Returns false where local memory is short. */
static bool attend_tf32_configure(clnsa_context *ctx, int mode, const nsa_dims *d, bool emulate,
                                  attend_config *c) {
  const int nw = emulate ? 1 : tuning_env_int(mode == MODE_SELECTED ? "MMA_NW" : "MMA_NWD", 4, 1);
  c->wg = 32 * nw;
  /* Selected: 16 keys per warp and step (each warp holds its S tile and reads its own
   * fragments); compressed and window: 32 keys staged for all warps, 35 KiB at D = 128. */
  c->kt = tuning_env_int("MMA_KT", mode == MODE_SELECTED ? 16 : 32, 8);
  c->vearly = 0;
  size_t bytes = mma_rows_layout(mode, d, nw, 1, c);
  if (mode != MODE_SELECTED) { /* staged K and V tiles, rows padded as in cl/attend_tf32.cl */
    bytes += 4 * (size_t)c->kt * (size_t)(d->DK + 16 - d->DK % 32 + d->DV + 4);
  }
  if (emulate) bytes += 4 * 32 * 6;
  return c->kt % 8 == 0 && (size_t)c->wg <= ctx->info.max_wg &&
         bytes + 1024 <= (size_t)ctx->info.local_mem;
}

/* One launch of attend_fwd, or of a tensor-core kernel where the context's tensor-core
 * path takes these tensors: attend_mma_fwd for f16/bf16 q, attend_tf32_fwd for f32 with
 * CLNSA_FLAG_TF32. bi is used in MODE_SELECTED only; lse may be NULL. */
static clnsa_status attend_enqueue(clnsa_context *ctx, int mode, const nsa_dims *d,
                                   const clnsa_tensor *q, const clnsa_tensor *k,
                                   const clnsa_tensor *v, const clnsa_tensor *bi,
                                   const clnsa_tensor *o, const clnsa_tensor *lse,
                                   enqueue_chain *c) {
  /* The kernel numbers query rows (token * G + g) and tiles in int. */
  if ((size_t)d->B * (size_t)d->TQ * (size_t)d->HQ > (size_t)INT32_MAX)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED, "attend_fwd: more than 2^31 query rows");
  const bool tf32 = attend_tf32_fits(d, q, k, v), half = attend_mma_fits(d, q, k, v);
  int mma = MMA_OFF;
  bool wgmma = false;
  if (tf32 || half) CHECK_STATUS(mma_mode(ctx, &mma));
  if (half && mode != MODE_SELECTED) CHECK_STATUS(wgmma_enabled(ctx, mma, &wgmma));
  attend_config cfg = {0};
  build_options opt = {{0}, 0};
  const char *file = "block_union.cl+attend_setup.cl+attend.cl", *name = "attend_fwd";
  if (mma != MMA_OFF && tf32 && attend_tf32_configure(ctx, mode, d, mma == MMA_EMULATED, &cfg)) {
    file = "warp_ops.cl+block_union.cl+attend_setup.cl+attend_tf32.cl", name = "attend_tf32_fwd";
    options_add(&opt, "-DMODE=%d -DDK=%d -DDV=%d -DROWS=%d -DKT=%d -DWG=%d -DNW=%d", mode, d->DK,
                d->DV, cfg.rows, cfg.kt, cfg.wg, cfg.wg / 32);
    options_add(&opt, " -DWARP_EMULATE=%d -DHAS_LSE=%d", mma == MMA_EMULATED, lse ? 1 : 0);
  } else if (mma != MMA_OFF && half &&
             attend_mma_configure(ctx, mode, d, mma == MMA_EMULATED, k->dtype == CLNSA_F32,
                                  v->dtype == CLNSA_F32, wgmma, &cfg)) {
    file = cfg.wg_n_v ? "warp_ops.cl+wgmma_ops.cl+attend_setup.cl+attend_mma.cl"
                      : "warp_ops.cl+block_union.cl+attend_setup.cl+attend_mma.cl";
    name = "attend_mma_fwd";
    if (cfg.wg_n_v)
      options_add(&opt, "-DWGMMA=1 -DWG_N_S=%d -DWG_N_V=%d ", cfg.kt, cfg.wg_n_v);
    options_add(&opt, "-DMODE=%d -DDK=%d -DDV=%d -DROWS=%d -DKT=%d -DWG=%d -DNW=%d", mode, d->DK,
                d->DV, cfg.rows, cfg.kt, cfg.wg, cfg.wg / 32);
    options_add(&opt, " -DMMA_DT=%d -DWARP_EMULATE=%d -DHAS_LSE=%d -DVEARLY=%d -DMT=%d",
                (int)q->dtype, mma == MMA_EMULATED, lse ? 1 : 0, cfg.vearly, cfg.mt);
  } else {
    /* the portable kernel; tuning_attend sizes its f32 local tiles */
    CHECK_STATUS(attend_configure(ctx, mode, d, &cfg));
    options_add(&opt, "-DMODE=%d -DDK=%d -DDV=%d -DROWS=%d -DKT=%d -DWG=%d -DKW=%d -DDW=%d", mode,
                d->DK, d->DV, cfg.rows, cfg.kt, cfg.wg, cfg.kw, cfg.dw);
    /* On an H200 (bf16, D=128) 16-byte loads ran the selected branch 1.7-2.4x faster;
     * the register prefetch gained nothing there (and makes PoCL builds 3x longer), so it
     * stays a tunable, off by default. */
    const int vec = tuning_env_int("VEC", 1, 0);
    options_add(&opt, " -DHAS_LSE=%d -DPREFETCH=%d -DVEC_K=%d -DVEC_V=%d", lse ? 1 : 0,
                tuning_env_int("PREFETCH", 0, 0), vec && tensor_rows_aligned16(k, d->DK),
                vec && tensor_rows_aligned16(v, d->DV));
  }
  options_add_dtype(&opt, "K", k);
  options_add_dtype(&opt, "V", v);
  if (cfg.tpg > 1) options_add(&opt, " -DTPG=%d -DUCAP=%d", cfg.tpg, cfg.ucap);
  if (mode != MODE_WINDOW) options_add(&opt, " -DBS=%d", d->BS);
  options_add_dtype(&opt, "Q", q);
  options_add_dtype(&opt, "O", o);
  tuning_env_override(&opt);
  cl_kernel kern;
  CHECK_STATUS(program_kernel(ctx, file, opt.text, name, &kern));

  /* Groups: row tiles of every sequence (MODE 0/1), or ROWS-head chunks of every query. */
  size_t groups, G = (size_t)d->G;
  cl_int tiles;
  if (mode == MODE_SELECTED && cfg.tpg == 1) {
    tiles = (cl_int)((G + cfg.rows - 1) / cfg.rows);
    groups = (size_t)d->B * (size_t)d->TQ * (size_t)tiles;
  } else {
    size_t maxq = d->seqs ? (size_t)d->seqs->max_q : (size_t)d->TQ;
    size_t nseg = d->seqs ? (size_t)d->seqs->n : (size_t)d->B;
    size_t per = mode == MODE_SELECTED ? (size_t)cfg.tpg : (size_t)cfg.rows;
    tiles = (cl_int)((maxq * (mode == MODE_SELECTED ? 1 : G) + per - 1) / per);
    groups = nseg * (size_t)tiles;
  }
  cl_uint arg = 0;
  cl_float scale = d->scale;
  cl_int W = d->W, S = d->S;
  cl_int err = tensor_set_args(kern, &arg, q);
  err |= tensor_set_args(kern, &arg, k);
  err |= tensor_set_args(kern, &arg, v);
  err |= bi ? tensor_set_args(kern, &arg, bi) : tensor_set_absent_args(kern, &arg);
  err |= tensor_set_args(kern, &arg, o);
  err |= lse ? tensor_set_args(kern, &arg, lse) : tensor_set_absent_args(kern, &arg);
  err |= dims_set_seq_args(kern, &arg, d);
  err |= clSetKernelArg(kern, arg++, sizeof scale, &scale);
  err |= clSetKernelArg(kern, arg++, sizeof W, &W);
  err |= clSetKernelArg(kern, arg++, sizeof S, &S);
  err |= clSetKernelArg(kern, arg++, sizeof tiles, &tiles);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clSetKernelArg(attend_fwd)");
  size_t local[2] = {(size_t)cfg.wg, 1};
  size_t global[2] = {groups * (size_t)cfg.wg, (size_t)d->H};
  return chain_launch(ctx, c, kern, 2, global, local);
}

clnsa_status compressed_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                                const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp,
                                const clnsa_tensor *o, const clnsa_tensor *lse, enqueue_chain *c) {
  return attend_enqueue(ctx, MODE_COMPRESSED, d, q, k_cmp, v_cmp, NULL, o, lse, c);
}

clnsa_status window_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                            const clnsa_tensor *k, const clnsa_tensor *v, const clnsa_tensor *o,
                            const clnsa_tensor *lse, enqueue_chain *c) {
  return attend_enqueue(ctx, MODE_WINDOW, d, q, k, v, NULL, o, lse, c);
}

clnsa_status selected_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                              const clnsa_tensor *k, const clnsa_tensor *v,
                              const clnsa_tensor *block_indices, const clnsa_tensor *o,
                              const clnsa_tensor *lse, enqueue_chain *c) {
  return attend_enqueue(ctx, MODE_SELECTED, d, q, k, v, block_indices, o, lse, c);
}

/* ---- public entry points: validate everything, then enqueue as one chain ---- */

/* o [B,TQ,HQ,DV] in any float dtype; lse (optional) [B,TQ,HQ] f32. */
static clnsa_status check_outputs(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *o,
                                  const char *oname, const clnsa_tensor *lse, const char *lname) {
  int64_t so[4], sl[3];
  dims_shape_o(d, so);
  dims_shape_rows(d, sl);
  CHECK_STATUS(tensor_check(ctx, o, oname, 4, so, DT_FLOAT));
  if (lse) CHECK_STATUS(tensor_check(ctx, lse, lname, 3, sl, 1u << CLNSA_F32));
  return CLNSA_SUCCESS;
}

static clnsa_status finish_chain(clnsa_context *ctx, enqueue_chain *c, clnsa_status st,
                                 cl_event *event) {
  if (st != CLNSA_SUCCESS) {
    chain_abort(c);
    return st;
  }
  return chain_end(ctx, c, event);
}

clnsa_status clnsa_compressed_attention(clnsa_context *ctx, const clnsa_params *params,
                                        const clnsa_seqs *seqs, const clnsa_tensor *q,
                                        const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp,
                                        const clnsa_tensor *o_cmp, const clnsa_tensor *lse_cmp,
                                        cl_uint nwait, const cl_event *wait, cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d = {0};
  CHECK_STATUS(dims_params(ctx, params, &d));
  if (!v_cmp) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "v_cmp is NULL");
  CHECK_STATUS(dims_cmp(ctx, seqs, q, k_cmp, v_cmp, &d));
  CHECK_STATUS(check_outputs(ctx, &d, o_cmp, "o_cmp", lse_cmp, "lse_cmp"));
  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  return finish_chain(ctx, &c, compressed_enqueue(ctx, &d, q, k_cmp, v_cmp, o_cmp, lse_cmp, &c),
                      event);
}

clnsa_status clnsa_window_attention(clnsa_context *ctx, const clnsa_params *params,
                                    const clnsa_seqs *seqs, const clnsa_tensor *q,
                                    const clnsa_tensor *k, const clnsa_tensor *v,
                                    const clnsa_tensor *o_swa, const clnsa_tensor *lse_swa,
                                    cl_uint nwait, const cl_event *wait, cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d = {0};
  CHECK_STATUS(dims_params(ctx, params, &d));
  CHECK_STATUS(dims_kv(ctx, seqs, k, v, "k", "v", &d));
  CHECK_STATUS(dims_q(ctx, q, &d));
  CHECK_STATUS(check_outputs(ctx, &d, o_swa, "o_swa", lse_swa, "lse_swa"));
  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  return finish_chain(ctx, &c, window_enqueue(ctx, &d, q, k, v, o_swa, lse_swa, &c), event);
}

clnsa_status clnsa_selected_attention(clnsa_context *ctx, const clnsa_params *params,
                                      const clnsa_seqs *seqs, const clnsa_tensor *q,
                                      const clnsa_tensor *k, const clnsa_tensor *v,
                                      const clnsa_tensor *block_indices, const clnsa_tensor *o_slc,
                                      const clnsa_tensor *lse_slc, cl_uint nwait,
                                      const cl_event *wait, cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d = {0};
  CHECK_STATUS(dims_params(ctx, params, &d));
  CHECK_STATUS(dims_kv(ctx, seqs, k, v, "k", "v", &d));
  CHECK_STATUS(dims_q(ctx, q, &d));
  int64_t si[4];
  dims_shape_idx(&d, si);
  CHECK_STATUS(tensor_check(ctx, block_indices, "block_indices", 4, si, DT_INT));
  CHECK_STATUS(check_outputs(ctx, &d, o_slc, "o_slc", lse_slc, "lse_slc"));
  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  return finish_chain(ctx, &c,
                      selected_enqueue(ctx, &d, q, k, v, block_indices, o_slc, lse_slc, &c), event);
}
