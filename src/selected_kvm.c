/* Selected attention in kv-block-major order (semantics section 4), for small GQA groups on
 * the tensor-core path: MODE 3 of cl/attend_mma.cl, then cl/selected_merge.cl.
 *
 * Why: the query-major kernel (MODE 2) gives a 16-row mma tile to one token's G heads, or
 * with G < 16 to 16/G tokens and the union of their block lists. On random or real
 * selections those lists barely overlap, so at G = 1 each token still reads the K/V of
 * its 16 blocks alone (512 KB a token at D = 128, bf16: L2-bound) while 15 of 16 rows of
 * every mma are masked. Turned around, a work-group takes one block of one kv head and the
 * tokens that selected it (the backward's selection masks, select_mask.c): the block's
 * K/V is read once per chunk of tokens, every mma row is a real (token, head), and each
 * row's result over that block goes to a partial slot. A merge then combines a row's
 * slots by their lse. The price: the partials, B TQ HQ S (DV + 1) floats written and read
 * once, which grow with G; so it runs for G <= KVM_MAX_G (CLNSA_TUNE, default below).
 *
 *   select_mask_build/chunks/scan  block_indices -> mask, chunks of ~KVM_PASSES ROWS / G tokens
 *   attend_mma_fwd (MODE 3)        one group per chunk: partial o, lse per (row, slot)
 *   selected_merge                 partials -> o_slc, lse_slc
 *
 * Where all the partials would not fit the device's largest buffer beside the rest of the
 * workspace, the kernel and the merge run once per range of tokens (b TQ + t in [r0, r1),
 * as few ranges as fit, of equal size, at least WS_PASS_MIN tokens; else the
 * query-major kernel runs), and the scratch holds one range's partials. Each range pays
 * its chunks' setup again (H200, bf16, G = 4, T = 65536: forward 17.0 ms in one range,
 * 17.3 in two, 18.4 in five, 22.3 query-major; G = 1: 6.48 in one, 6.63 in two).
 *
 * Scratch (from the given offset, each region 256-byte aligned; NC = H B NB mask rows,
 * NCH = ceil(longest sequence / 32), SLOTS = select_mask_slots, NR = RT HQ rows of a range
 * of RT tokens):
 *   u32/i32: mask [NC, NCH]  counts [NC]  offsets [NC + 1]  slot_row, slot_word [SLOTS]
 *   f32: part_lse [NR, S]  part_o [NR, S, DV]
 */
#include "internal.h"

#define KVM_SCAN_WG 256

typedef struct kvm_config {
  int nw, mt, kt, rows, chunk_tokens, lcap;
  int res; /* KVM_RES: the block's K/V tiles kept staged over the passes (0: restaged) */
  bool emulate;
} kvm_config;

typedef struct kvm_layout {
  size_t mask, counts, offsets, slot_row, slot_word, part_lse, part_o, end;
  int nch;
} kvm_layout;

/* range_tokens: the tokens one launch covers (0: the layout without partials) */
static void kvm_layout_of(const nsa_dims *d, const kvm_config *c, size_t range_tokens,
                          kvm_layout *l) {
  const size_t nc = (size_t)d->H * d->B * d->NB, nr = range_tokens * d->HQ;
  const size_t len = (size_t)(d->seqs ? d->seqs->max_q : d->TQ);
  const size_t slots = select_mask_slots(d, c->chunk_tokens);
  l->nch = (int)((len + 31) / 32);
  size_t at = 0;
  l->mask = ws_reserve(&at, nc * (size_t)l->nch);
  l->counts = ws_reserve(&at, nc);
  l->offsets = ws_reserve(&at, nc + 1);
  l->slot_row = ws_reserve(&at, slots);
  l->slot_word = ws_reserve(&at, slots);
  l->part_lse = ws_reserve(&at, nr * d->S);
  l->part_o = ws_reserve(&at, nr * d->S * (size_t)d->DV);
  l->end = at;
}

/* Warps, m-tiles and keys per step as the compressed branch's (cl/attend_mma.cl MODE 0:
 * two m-tiles a warp share each staged fragment), and chunks of KVM_PASSES passes of
 * ROWS rows: the last pass of a chunk is partly idle, and a chunk's setup (its mask words,
 * each token's slot) is paid once for all its passes. Where local memory holds the whole
 * block's K/V (32 KiB at BS = 64, D = 128 in bf16), the first pass stages it and the
 * others reuse it (KVM_RES; CLNSA_TUNE KVM_RES=0 restages every tile of every pass). */
static bool kvm_configure(const clnsa_context *ctx, const nsa_dims *d, bool emulate,
                          kvm_config *c) {
  c->emulate = emulate;
  c->nw = emulate ? 1 : tuning_env_int("KVM_NW", 4, 1);
  c->mt = tuning_env_int("KVM_MT", 2, 1);
  c->kt = emulate ? 16 : tuning_env_int("KVM_KT", 32, 16);
  c->rows = 16 * c->nw * c->mt;
  const int passes = tuning_env_int("KVM_PASSES", 4, 1), per = passes * c->rows / d->G;
  c->chunk_tokens = per > 1 ? per : 1;
  /* a chunk closes at the word that reaches chunk_tokens: at most 31 more. The capacity
   * does not depend on G, so one build serves every G (the emulation's builds are slow) */
  c->lcap = passes * c->rows + 32;
  /* rtok, rhq, rlo, rhi; list and tslot; a mask word an item and msk */
  size_t bytes = 16 * (size_t)c->rows + 8 * (size_t)c->lcap + 4 * (32 * (size_t)c->nw + 1);
  if (emulate) bytes += 4 * 32 * 6;
  /* staged K and V (V rows padded by 16 bytes: cl/attend_mma.cl's VLDM) */
  const size_t tile = (size_t)c->kt * (2 * (size_t)(d->DK + d->DV) + 16);
  const int tiles = (d->BS + c->kt - 1) / c->kt;
  c->res = 0;
  if (tiles > 1 && tuning_env_int("KVM_RES", 1, 0) &&
      bytes + tiles * tile + 1024 <= (size_t)ctx->info.local_mem)
    c->res = tiles;
  bytes += (c->res ? (size_t)c->res : 1) * tile;
  return c->kt % 16 == 0 && (c->mt == 1 || c->mt == 2) && (size_t)(32 * c->nw) <= ctx->info.max_wg &&
         bytes + 1024 <= (size_t)ctx->info.local_mem;
}

clnsa_status selected_kvm_plan(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                               const clnsa_tensor *k, const clnsa_tensor *v, size_t room,
                               size_t *range_tokens, size_t *scratch_bytes) {
  *range_tokens = 0;
  *scratch_bytes = 0;
  /* H100, bf16, D = 128 (docs/PERFORMANCE.md): the forward gained 36 % at G = 1, 23 % at
   * G = 2 (T = 65536). Since the token lists fill across mask words (cl/kvm_rows.cl) it
   * gains at G = 4 too (H200: 4.32 -> 3.48 ms at 16k, 22.3 -> 17.0 at 64k) and still loses
   * at G = 8 (5.41 -> 6.37, 27.7 -> 30.5). */
  const int max_g = tuning_env_int("KVM_MAX_G", 4, 0);
  if (d->G > max_g || d->NB == 0 || d->S < 1 || !dims_full_sequences(d) ||
      k->dtype != q->dtype || v->dtype != q->dtype || !attend_mma_fits(d, q, k, v))
    return CLNSA_SUCCESS;
  int mma = MMA_OFF;
  CHECK_STATUS(mma_mode(ctx, &mma));
  kvm_config c;
  if (mma == MMA_OFF || !kvm_configure(ctx, d, mma == MMA_EMULATED, &c)) return CLNSA_SUCCESS;
  /* a range's partials, 4 HQ S (DV + 1) bytes a token, beside the rest (two regions
   * aligned to 256 bytes); CLNSA_TUNE KVM_PART_MB caps them, KVM_RANGE fixes the tokens */
  kvm_layout l;
  kvm_layout_of(d, &c, 0, &l);
  const size_t align = 512, budget = room > l.end + align ? room - l.end - align : 0;
  const size_t per_token = 4 * (size_t)d->HQ * d->S * ((size_t)d->DV + 1);
  const size_t rt =
      ws_pass_tokens((size_t)d->B * d->TQ, budget, per_token, "KVM_PART_MB", "KVM_RANGE");
  if (rt == 0) return CLNSA_SUCCESS;
  kvm_layout_of(d, &c, rt, &l);
  *range_tokens = rt;
  *scratch_bytes = l.end;
  return CLNSA_SUCCESS;
}

clnsa_status selected_kvm_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                                  const clnsa_tensor *k, const clnsa_tensor *v,
                                  const clnsa_tensor *block_indices, const clnsa_tensor *o,
                                  const clnsa_tensor *lse, cl_mem buf, size_t scratch,
                                  size_t range_tokens, enqueue_chain *c) {
  int mma = MMA_OFF;
  CHECK_STATUS(mma_mode(ctx, &mma));
  kvm_config cfg;
  if (mma == MMA_OFF || !kvm_configure(ctx, d, mma == MMA_EMULATED, &cfg) || range_tokens == 0)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED, "selected_kvm: no tensor-core layout fits");
  kvm_layout l;
  kvm_layout_of(d, &cfg, range_tokens, &l);
  const cl_long base = (cl_long)(scratch / 4);
#define AT(region) (base + (cl_long)(l.region / 4))
  /* one range's rows: MODE 3 numbers them from the range's first token */
  int64_t so[4] = {1, (int64_t)range_tokens, d->HQ, (int64_t)d->S * d->DV};
  int64_t sl[4] = {1, (int64_t)range_tokens, d->HQ, d->S};
  const clnsa_tensor part_o = clnsa_tensor_make(buf, (size_t)AT(part_o), CLNSA_F32, 4, so);
  const clnsa_tensor part_lse = clnsa_tensor_make(buf, (size_t)AT(part_lse), CLNSA_F32, 4, sl);

  /* every kernel built before the first launch */
  select_mask_kernels mk;
  int scan_wg = KVM_SCAN_WG;
  while ((size_t)scan_wg > ctx->info.max_wg && scan_wg > 1) scan_wg /= 2;
  CHECK_STATUS(select_mask_kernels_get(ctx, scan_wg, &mk));
  build_options opt = {{0}, 0};
  options_add(&opt, "-DMODE=3 -DDK=%d -DDV=%d -DROWS=%d -DKT=%d -DWG=%d -DNW=%d -DMT=%d", d->DK,
              d->DV, cfg.rows, cfg.kt, 32 * cfg.nw, cfg.nw, cfg.mt);
  options_add(&opt,
              " -DMMA_DT=%d -DWARP_EMULATE=%d -DHAS_LSE=1 -DVEARLY=0 -DBS=%d -DLCAP=%d -DKVM_RES=%d",
              (int)q->dtype, cfg.emulate, d->BS, cfg.lcap, cfg.res);
  options_add_dtype(&opt, "K", k);
  options_add_dtype(&opt, "V", v);
  options_add_dtype(&opt, "Q", q);
  options_add_dtype(&opt, "O", &part_o);
  tuning_env_override(&opt);
  cl_kernel attend, merge;
  CHECK_STATUS(program_kernel(ctx, "warp_ops.cl+kvm_rows.cl+attend_setup.cl+attend_mma.cl",
                              opt.text, "attend_mma_fwd", &attend));
  const int dv4 = d->DV / 4, rpg = dv4 >= 128 ? 1 : 128 / dv4;
  build_options om = {{0}, 0};
  options_add(&om, "-DWIDTH=%d -DRPG=%d -DBS=%d", d->DV, rpg, d->BS);
  CHECK_STATUS(program_kernel(ctx, "selected_merge.cl", om.text, "selected_merge", &merge));

  const select_mask_at at = {buf,          AT(mask),      AT(counts), AT(offsets),
                             AT(slot_row), AT(slot_word), l.nch,      cfg.chunk_tokens};
  CHECK_STATUS(select_mask_enqueue(ctx, d, &mk, block_indices, &at, c));

  /* per range of tokens: the attention over its rows, then their merge (the chain orders
   * each range after the previous one's merge, which last read the partials) */
  const cl_long tokens = (cl_long)d->B * d->TQ, rt = (cl_long)range_tokens;
  for (cl_long r0 = 0; r0 < tokens; r0 += rt) {
    const cl_long r1 = r0 + rt < tokens ? r0 + rt : tokens, rows = (r1 - r0) * d->HQ;
    kargs a = args_begin(attend);
    arg_tensor(&a, q);
    arg_tensor(&a, k);
    arg_tensor(&a, v);
    arg_tensor(&a, block_indices);
    arg_tensor(&a, &part_o);
    arg_tensor(&a, &part_lse);
    arg_seq(&a, d);
    arg_float(&a, d->scale);
    arg_int(&a, 0); /* W */
    arg_int(&a, d->S);
    arg_int(&a, 0); /* tiles */
    arg_mem(&a, buf);
    arg_long(&a, AT(mask));
    arg_int(&a, l.nch);
    arg_mem(&a, buf);
    arg_long(&a, AT(offsets));
    arg_long(&a, AT(slot_row));
    arg_long(&a, AT(slot_word));
    arg_long(&a, r0);
    arg_long(&a, r1);
    /* one group per chunk: the bound on their number (groups past the last, or without
     * the range's tokens, return at once) */
    size_t local = (size_t)(32 * cfg.nw);
    size_t global = select_mask_slots(d, cfg.chunk_tokens) * local;
    CHECK_STATUS(args_launch(ctx, c, &a, 1, &global, &local));

    a = args_begin(merge);
    arg_tensor(&a, block_indices);
    arg_mem(&a, buf);
    arg_long(&a, AT(part_o));
    arg_long(&a, AT(part_lse));
    arg_tensor(&a, o);
    arg_tensor(&a, lse);
    arg_int(&a, d->S);
    arg_long(&a, r0 * d->HQ);
    arg_long(&a, rows);
    arg_seq(&a, d);
    size_t ml[2] = {(size_t)dv4, (size_t)rpg};
    size_t mg[2] = {(size_t)dv4, ((size_t)rows + (size_t)rpg - 1) / (size_t)rpg * (size_t)rpg};
    CHECK_STATUS(args_launch(ctx, c, &a, 2, mg, ml));
  }
#undef AT
  return CLNSA_SUCCESS;
}
