/* Compressed, window and selected attention on the device against the float64
 * reference. Kernel builds dominate the run time (one per MODE, head dims, block size,
 * dtypes, and row count of the selected branch), so most cases share DK=32, DV=24,
 * BS=8 and only the shapes vary. */
/* cmocka.h needs stdarg.h, stddef.h and setjmp.h first. */
/* clang-format off */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
/* clang-format on */

#include "harness.h"
#include "reference.h"

static clnsa_context *ctx;

#define MAX_W 3

enum { KV_SAME = 0, KV_OTHERS = 1, KV_F32 = 2 };

typedef struct attend_case {
  const char *name;
  int B, TQ, TK, H, G, DK, DV, BS, S;
  int W[MAX_W]; /* windows to run; 0 ends the list (W = 0 is tested separately) */
  int nseq;     /* varlen: B = 1, TQ/TK are cu_q[nseq]/cu_k[nseq] */
  int cu_q[8], cu_k[8];
  clnsa_dtype dt; /* q, k, v, o storage */
  int mixed;      /* KV_SAME, KV_OTHERS (k and v in the two other dtypes) or KV_F32 */
  double amp;     /* inputs in [-amp, amp] (0 means 1) */
  float scale;    /* 0: default 1/sqrt(DK) */
  bool aligned;   /* unpadded 16-byte rows (inputs): what the tensor-core path needs */
} attend_case;

/* Host data of one case: inputs (rounded to their dtypes by the upload) and shapes. */
typedef struct problem {
  const attend_case *c;
  ref_shape s;
  clnsa_params p;   /* flags: CLNSA_FLAG_TF32 in test_attend_tf32 */
  clnsa_seqs *seqs; /* varlen, or n = 1 for the compressed branch when TQ < TK */
  clnsa_dtype qdt, kdt, vdt;
  double *q, *k, *v;
  int64_t shq[4], shk[4], shv[4], sho[4], shl[3];
  size_t nq, nk, nv, no, nl;
  dev_tensor dq, dk, dv;
} problem;

/* Whether a case runs cl/attend_tf32.cl: the flag, f32 inputs, a tensor-core path on the
 * context and the shapes it takes (src/attend.c, attend_tf32_fits). Anywhere else the
 * flag must leave the exact f32 path in charge. */
static bool runs_tf32(const problem *pb) {
  const attend_case *c = pb->c;
  return (pb->p.flags & CLNSA_FLAG_TF32) && c->dt == CLNSA_F32 && c->mixed == KV_SAME &&
         c->aligned && c->DK % 16 == 0 && c->DV % 32 == 0 && c->DK <= 128 && c->DV <= 128 &&
         clnsa_context_tensor_cores(ctx) != CLNSA_MMA_NONE;
}

/* The dtypes' bound; 1e-2 at most where the tensor cores multiply 16-bit q, and 1e-2 for
 * TF32 (the semantics' bound for tf32 or half-precision matrix units). */
static double tolerance(const problem *pb) {
  if (runs_tf32(pb)) return 1e-2;
  double t = dtype_tolerance(pb->c->dt);
  clnsa_dtype all[3] = {pb->qdt, pb->kdt, pb->vdt};
  for (int i = 0; i < 3; i++) t = fmax(t, dtype_tolerance(all[i]));
  if (pb->qdt != CLNSA_F32 && clnsa_context_tensor_cores(ctx) != CLNSA_MMA_NONE) t = fmin(t, 1e-2);
  return t;
}

static double *random_array(rng *r, size_t n, double amp) {
  double *x = malloc(sizeof(double) * (n + 1));
  rng_fill(r, x, n, -amp, amp);
  return x;
}

static void problem_init(problem *pb, const attend_case *c, unsigned flags, rng *r) {
  memset(pb, 0, sizeof *pb);
  pb->c = c;
  ref_shape *s = &pb->s;
  s->B = c->B, s->TQ = c->TQ, s->TK = c->TK, s->H = c->H, s->HQ = c->H * c->G;
  s->DK = c->DK, s->DV = c->DV, s->BS = c->BS, s->S = c->S;
  s->nseq = c->nseq, s->cu_q = c->cu_q, s->cu_k = c->cu_k;
  if (c->nseq) s->B = 1, s->TQ = c->cu_q[c->nseq], s->TK = c->cu_k[c->nseq];
  s->scale = c->scale ? c->scale : 1.0 / sqrt((double)c->DK);
  pb->p = clnsa_params_default();
  pb->p.block_size = c->BS, pb->p.block_count = c->S, pb->p.scale = c->scale;
  pb->p.flags = flags;
  if (c->nseq)
    assert_int_equal(clnsa_seqs_create(ctx, &pb->p, c->nseq, c->cu_q, c->cu_k, &pb->seqs), 0);
  pb->qdt = c->dt;
  pb->kdt = c->mixed == KV_OTHERS ? (clnsa_dtype)((c->dt + 1) % 3)
            : c->mixed == KV_F32  ? CLNSA_F32
                                  : c->dt;
  pb->vdt = c->mixed == KV_OTHERS ? (clnsa_dtype)((c->dt + 2) % 3)
            : c->mixed == KV_F32  ? CLNSA_F32
                                  : c->dt;
  int64_t B = s->B, TQ = s->TQ, TK = s->TK, H = s->H, HQ = s->HQ;
  int64_t q[4] = {B, TQ, HQ, c->DK}, k[4] = {B, TK, H, c->DK}, v[4] = {B, TK, H, c->DV};
  int64_t o[4] = {B, TQ, HQ, c->DV}, l[3] = {B, TQ, HQ};
  memcpy(pb->shq, q, sizeof q), memcpy(pb->shk, k, sizeof k), memcpy(pb->shv, v, sizeof v);
  memcpy(pb->sho, o, sizeof o), memcpy(pb->shl, l, sizeof l);
  pb->nq = (size_t)(B * TQ * HQ * c->DK), pb->nk = (size_t)(B * TK * H * c->DK);
  pb->nv = (size_t)(B * TK * H * c->DV), pb->no = (size_t)(B * TQ * HQ * c->DV);
  pb->nl = (size_t)(B * TQ * HQ);
  double amp = c->amp ? c->amp : 1.0;
  pb->q = random_array(r, pb->nq, amp);
  pb->k = random_array(r, pb->nk, amp);
  pb->v = random_array(r, pb->nv, amp);
  pb->dq = dev_upload(ctx, pb->qdt, 4, pb->shq, pb->q, !c->aligned && c->TQ % 2 == 1);
  pb->dk = dev_upload(ctx, pb->kdt, 4, pb->shk, pb->k, !c->aligned && c->H % 2 == 0);
  pb->dv = dev_upload(ctx, pb->vdt, 4, pb->shv, pb->v, !c->aligned && c->G % 2 == 1);
}

static void problem_free(problem *pb) {
  dev_free(&pb->dq), dev_free(&pb->dk), dev_free(&pb->dv);
  free(pb->q), free(pb->k), free(pb->v);
  clnsa_seqs_destroy(pb->seqs);
}

/* Outputs of one branch and their check against the reference. */
typedef struct outputs {
  dev_tensor o, lse;
  double *ro, *rl;
} outputs;

static outputs outputs_new(const problem *pb, bool padded) {
  outputs out;
  out.o = dev_output(ctx, pb->c->dt, 4, pb->sho, padded);
  out.lse = dev_output(ctx, CLNSA_F32, 3, pb->shl, !padded);
  out.ro = malloc(sizeof(double) * (pb->no + 1));
  out.rl = malloc(sizeof(double) * (pb->nl + 1));
  return out;
}

static void outputs_check(const problem *pb, outputs *out, clnsa_status st, cl_event ev,
                          const char *branch, int W) {
  if (st) printf("# %s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  clWaitForEvents(1, &ev);
  clReleaseEvent(ev);
  double eo = rel_error(dev_download(ctx, &out->o), out->ro, pb->no);
  double el = rel_error(dev_download(ctx, &out->lse), out->rl, pb->nl);
  const attend_case *c = pb->c;
  printf(
      "# %-10s %-14s B=%d TQ=%d TK=%d H=%d G=%d DK=%d DV=%d BS=%d S=%d W=%d nseq=%d "
      "%s%s%s: o %.2e lse %.2e\n",
      branch, c->name, pb->s.B, pb->s.TQ, pb->s.TK, c->H, c->G, c->DK, c->DV, c->BS, c->S, W,
      c->nseq, dtype_label(c->dt),
      c->mixed == KV_F32 ? "+kv f32"
      : c->mixed         ? "+mixed"
                         : "",
      runs_tf32(pb)                   ? " tf32"
      : pb->p.flags & CLNSA_FLAG_TF32 ? " tf32-flag exact"
                                      : "",
      eo, el);
  assert_true(eo < tolerance(pb));
  if (runs_tf32(pb)) {
    /* lse carries the scores' tf32 rounding too (the semantics' bound); and an o error
     * above the exact path's 1e-5 (v alone is rounded by ~1e-4) shows the TF32 kernel ran */
    assert_true(el < 1e-2);
    assert_true(eo > 1e-5);
  } else {
    assert_true(el < 1e-5);
  }
  dev_free(&out->o), dev_free(&out->lse);
  free(out->ro), free(out->rl);
}

static void run_compressed(problem *pb) {
  const attend_case *c = pb->c;
  const ref_shape *s = &pb->s;
  /* Without seqs TK = TQ; a single sequence with TQ < TK goes through seqs with n = 1. */
  clnsa_seqs *seqs = pb->seqs;
  if (!seqs && s->TQ < s->TK) {
    if (s->B != 1) return;
    int cq[2] = {0, s->TQ}, ck[2] = {0, s->TK};
    assert_int_equal(clnsa_seqs_create(ctx, &pb->p, 1, cq, ck, &seqs), 0);
  }
  int nb = ref_num_cmp(s);
  size_t nkc = (size_t)s->B * nb * s->H * c->DK, nvc = (size_t)s->B * nb * s->H * c->DV;
  double *kc = malloc(sizeof(double) * (nkc + 1)), *vc = malloc(sizeof(double) * (nvc + 1));
  ref_pool(s, pb->k, pb->v, kc, vc);
  int64_t shkc[4] = {s->B, nb, s->H, c->DK}, shvc[4] = {s->B, nb, s->H, c->DV};
  dev_tensor dkc = dev_upload(ctx, pb->kdt, 4, shkc, kc, !c->aligned);
  dev_tensor dvc = dev_upload(ctx, pb->vdt, 4, shvc, vc, false);
  outputs out = outputs_new(pb, true);
  ref_compressed(s, pb->q, kc, vc, out.ro, out.rl);
  cl_event ev = NULL;
  clnsa_status st = clnsa_compressed_attention(ctx, &pb->p, seqs, &pb->dq.t, &dkc.t, &dvc.t,
                                               &out.o.t, &out.lse.t, 0, NULL, &ev);
  outputs_check(pb, &out, st, ev, "compressed", 0);
  dev_free(&dkc), dev_free(&dvc);
  free(kc), free(vc);
  if (seqs != pb->seqs) clnsa_seqs_destroy(seqs);
}

static void run_window(problem *pb, int W) {
  pb->s.W = W;
  pb->p.window = W;
  outputs out = outputs_new(pb, W % 2 == 1);
  ref_window(&pb->s, pb->q, pb->k, pb->v, out.ro, out.rl);
  cl_event ev = NULL;
  clnsa_status st = clnsa_window_attention(ctx, &pb->p, pb->seqs, &pb->dq.t, &pb->dk.t, &pb->dv.t,
                                           &out.o.t, &out.lse.t, 0, NULL, &ev);
  outputs_check(pb, &out, st, ev, "window", W);
}

/* Random lists: -1 slots, blocks past the query's own block, duplicates, any order. */
static int *random_indices(const problem *pb, rng *r) {
  const ref_shape *s = &pb->s;
  size_t n = (size_t)s->B * s->TQ * s->H * s->S;
  int *bi = malloc(sizeof(int) * (n + 1));
  for (size_t i = 0; i < n; i++) {
    int t = (int)(i / ((size_t)s->H * s->S) % (size_t)s->TQ);
    int ic = (t + s->TK - s->TQ) / s->BS; /* approximate with varlen: only picks ranges */
    int u = rng_int(r, 0, 9);
    bi[i] = u == 0   ? -1
            : u == 1 ? ic + rng_int(r, 1, 3)
            : u == 2 ? rng_int(r, -5, -2)
                     : rng_int(r, 0, ic < 0 ? 0 : ic);
  }
  return bi;
}

static void run_selected(problem *pb, rng *r) {
  const ref_shape *s = &pb->s;
  int *bi = random_indices(pb, r);
  int64_t shi[4] = {s->B, s->TQ, s->H, s->S};
  dev_tensor dbi = dev_upload_int(ctx, 4, shi, bi);
  outputs out = outputs_new(pb, pb->c->S % 2 == 0);
  ref_selected(s, pb->q, pb->k, pb->v, bi, out.ro, out.rl);
  cl_event ev = NULL;
  clnsa_status st = clnsa_selected_attention(ctx, &pb->p, pb->seqs, &pb->dq.t, &pb->dk.t, &pb->dv.t,
                                             &dbi.t, &out.o.t, &out.lse.t, 0, NULL, &ev);
  outputs_check(pb, &out, st, ev, "selected", 0);
  dev_free(&dbi);
  free(bi);
}

static void run_case_flags(const attend_case *c, unsigned flags, rng *r) {
  problem pb;
  problem_init(&pb, c, flags, r);
  run_compressed(&pb);
  for (int i = 0; i < MAX_W && c->W[i] > 0; i++) run_window(&pb, c->W[i]);
  run_selected(&pb, r);
  problem_free(&pb);
}

static void run_case(const attend_case *c, rng *r) {
  run_case_flags(c, 0, r);
}

/* Shapes around the block size, odd lengths, every group size class, TQ < TK, varlen
 * with an empty and a length-1 sequence, long rows (several key tiles), peaked scores. */
static void test_attend_shapes(void **state) {
  (void)state;
  rng r = {harness_seed("attend shapes")};
  static const attend_case cases[] = {
      {"basic", 2, 37, 37, 2, 1, 32, 24, 8, 4, {1, 7, 40}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"T<BS", 1, 5, 5, 1, 2, 32, 24, 8, 2, {3}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"T=BS-1", 3, 7, 7, 2, 3, 32, 24, 8, 3, {2, 100}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"G5", 1, 45, 45, 1, 5, 32, 24, 8, 5, {16}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"G16", 1, 33, 33, 2, 16, 32, 24, 8, 8, {9}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"G32", 1, 20, 20, 1, 32, 32, 24, 8, 3, {64}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"TQ<TK", 1, 9, 70, 2, 2, 32, 24, 8, 6, {5, 70, 1000}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"decode B2", 2, 1, 29, 1, 3, 32, 24, 8, 4, {10}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"varlen",
       1,
       0,
       0,
       2,
       2,
       32,
       24,
       8,
       4,
       {6, 50},
       4,
       {0, 5, 5, 6, 23},
       {0, 9, 12, 13, 40},
       CLNSA_F32,
       0,
       0,
       0,
       0},
      {"varlen same",
       1,
       0,
       0,
       1,
       3,
       32,
       24,
       8,
       5,
       {4},
       4,
       {0, 1, 1, 30, 47},
       {0, 1, 1, 30, 47},
       CLNSA_F32,
       0,
       0,
       0,
       0},
      {"long", 1, 300, 300, 1, 1, 32, 24, 8, 16, {33, 77, 400}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"peaked", 1, 64, 64, 2, 2, 32, 24, 8, 8, {20}, 0, {0}, {0}, CLNSA_F32, 0, 3.0, 0.7f, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r);
}

/* Head dims 60/100/192/256 with every storage type: mixed cases put q and o in `dt` and
 * k, v in the two others, so each dtype is read as q, k and v somewhere; an odd block. */
static void test_attend_dtypes_dims(void **state) {
  (void)state;
  rng r = {harness_seed("attend dtypes and head dims")};
  static const attend_case cases[] = {
      {"dk60 dv100", 1, 23, 23, 1, 2, 60, 100, 8, 4, {9}, 0, {0}, {0}, CLNSA_BF16, 1, 0, 0, 0},
      {"dk100 dv60", 2, 19, 19, 2, 1, 100, 60, 8, 3, {6}, 0, {0}, {0}, CLNSA_F16, 1, 0, 0, 0},
      {"dk192 bs5", 1, 40, 40, 1, 4, 192, 128, 5, 3, {20}, 0, {0}, {0}, CLNSA_F32, 1, 0, 0, 0},
      {"f16 subnormal", 1, 24, 24, 1, 2, 32, 24, 8, 3, {5}, 0, {0}, {0}, CLNSA_F16, 0, 1e-4, 0, 0},
      {"dk256 bf16", 1, 18, 18, 1, 2, 256, 256, 8, 2, {7}, 0, {0}, {0}, CLNSA_BF16, 0, 0, 0, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r);
}

/* Small tiles chosen through CLNSA_TUNE: many tiles per row, idle row groups, and the
 * register prefetch GPUs use (CPUs build without it). */
static void test_attend_small_tiles(void **state) {
  (void)state;
  rng r = {harness_seed("attend small tiles")};
  static const attend_case c = {"tune", 1, 50,  50,  2,         3, 32, 24, 8, 6,
                                {19},   0, {0}, {0}, CLNSA_F32, 0, 0,  0,  0};
  setenv("CLNSA_TUNE", "ROWS=4,KT=8,PREFETCH=1", 1);
  run_case(&c, &r);
  unsetenv("CLNSA_TUNE");
}

/* Selected attention with G < ROWS packs consecutive tokens into one group (the union of
 * their lists, a per-token mask): G = 1 and 2 with random per-token lists (-1, duplicates,
 * blocks past the own one), varlen so that token tiles straddle sequence ends, several
 * tiles per sequence (ROWS=8), and the union's scratch outside the K/V tile (KT=8). */
static void test_attend_selected_packed(void **state) {
  (void)state;
  rng r = {harness_seed("attend selected packed")};
  static const attend_case cases[] = {
      {"pack G1", 2, 75, 75, 2, 1, 32, 24, 8, 6, {0}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"pack G2", 1, 70, 83, 1, 2, 32, 24, 8, 5, {0}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 0},
      {"pack G1 varlen",
       1,
       0,
       0,
       2,
       1,
       32,
       24,
       8,
       7,
       {0},
       5,
       {0, 3, 40, 40, 41, 97},
       {0, 10, 47, 47, 60, 160},
       CLNSA_F32,
       0,
       0,
       0,
       0},
      {"pack G2 varlen",
       1,
       0,
       0,
       1,
       2,
       32,
       24,
       8,
       4,
       {0},
       4,
       {0, 17, 18, 51, 86},
       {0, 17, 30, 70, 110},
       CLNSA_F32,
       0,
       0,
       0,
       0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r);
  setenv("CLNSA_TUNE", "ROWS=8", 1);
  run_case(&cases[1], &r);
  run_case(&cases[3], &r);
  setenv("CLNSA_TUNE", "KT=8", 1);
  run_case(&cases[0], &r);
  run_case(&cases[2], &r);
  unsetenv("CLNSA_TUNE");
}

/* No lse (HAS_LSE=0): o still matches. */
static void test_attend_without_lse(void **state) {
  (void)state;
  rng r = {harness_seed("attend without lse")};
  static const attend_case c = {"no lse", 1, 21,  21,  1,         2, 32, 24, 8, 4,
                                {5},      0, {0}, {0}, CLNSA_F32, 0, 0,  0,  0};
  problem pb;
  problem_init(&pb, &c, 0, &r);
  pb.s.W = pb.p.window = 5;
  dev_tensor o = dev_output(ctx, CLNSA_F32, 4, pb.sho, false);
  double *ro = malloc(sizeof(double) * pb.no), *rl = malloc(sizeof(double) * pb.nl);
  ref_window(&pb.s, pb.q, pb.k, pb.v, ro, rl);
  cl_event ev;
  assert_int_equal(clnsa_window_attention(ctx, &pb.p, NULL, &pb.dq.t, &pb.dk.t, &pb.dv.t, &o.t,
                                          NULL, 0, NULL, &ev),
                   CLNSA_SUCCESS);
  clWaitForEvents(1, &ev);
  clReleaseEvent(ev);
  double e = rel_error(dev_download(ctx, &o), ro, pb.no);
  printf("# window without lse: o %.2e\n", e);
  assert_true(e < 1e-5);
  dev_free(&o);
  free(ro), free(rl);
  problem_free(&pb);
}

static void expect_empty(dev_tensor *o, dev_tensor *lse, const char *what) {
  double *x = dev_download(ctx, o), *l = dev_download(ctx, lse);
  for (size_t i = 0; i < o->count; i++) assert_true(x[i] == 0.0 && !signbit(x[i]));
  for (size_t i = 0; i < lse->count; i++) assert_true(isinf(l[i]) && l[i] < 0);
  printf("# empty key sets (%s): o exactly 0, lse -inf\n", what);
}

/* Empty key sets give exactly o = 0 and lse = -inf: compressed rows before the first
 * complete block, selected lists of nothing valid, and a window of 0. */
static void test_attend_empty(void **state) {
  (void)state;
  rng r = {harness_seed("attend empty")};
  static const attend_case c = {"empty", 1, 7,   7,   2,         2, 32, 24, 8, 3,
                                {0},     0, {0}, {0}, CLNSA_F32, 0, 0,  0,  0};
  problem pb;
  problem_init(&pb, &c, 0, &r);
  cl_event ev;
  /* compressed: 7 tokens < BS, no complete block */
  int64_t shc[4] = {1, 1, 2, 32}, shvc[4] = {1, 1, 2, 24};
  double kc[64], vc[48];
  rng_fill(&r, kc, 64, -1, 1), rng_fill(&r, vc, 48, -1, 1);
  dev_tensor dkc = dev_upload(ctx, CLNSA_F32, 4, shc, kc, false);
  dev_tensor dvc = dev_upload(ctx, CLNSA_F32, 4, shvc, vc, false);
  dev_tensor o = dev_output(ctx, CLNSA_F32, 4, pb.sho, false);
  dev_tensor lse = dev_output(ctx, CLNSA_F32, 3, pb.shl, false);
  assert_int_equal(clnsa_compressed_attention(ctx, &pb.p, NULL, &pb.dq.t, &dkc.t, &dvc.t, &o.t,
                                              &lse.t, 0, NULL, &ev),
                   CLNSA_SUCCESS);
  clWaitForEvents(1, &ev), clReleaseEvent(ev);
  expect_empty(&o, &lse, "compressed, T < BS");
  dev_free(&o), dev_free(&lse);
  /* selected: every slot -1, negative or past the own block */
  int bi[7 * 2 * 3];
  for (int i = 0; i < 42; i++) bi[i] = i % 3 == 0 ? -1 : i % 3 == 1 ? 1 + i : -7;
  int64_t shi[4] = {1, 7, 2, 3};
  dev_tensor dbi = dev_upload_int(ctx, 4, shi, bi);
  o = dev_output(ctx, CLNSA_F32, 4, pb.sho, true);
  lse = dev_output(ctx, CLNSA_F32, 3, pb.shl, true);
  assert_int_equal(clnsa_selected_attention(ctx, &pb.p, NULL, &pb.dq.t, &pb.dk.t, &pb.dv.t, &dbi.t,
                                            &o.t, &lse.t, 0, NULL, &ev),
                   CLNSA_SUCCESS);
  clWaitForEvents(1, &ev), clReleaseEvent(ev);
  expect_empty(&o, &lse, "selected, no valid block");
  dev_free(&o), dev_free(&lse);
  /* window 0 */
  pb.p.window = 0;
  o = dev_output(ctx, CLNSA_F32, 4, pb.sho, false);
  lse = dev_output(ctx, CLNSA_F32, 3, pb.shl, false);
  assert_int_equal(clnsa_window_attention(ctx, &pb.p, NULL, &pb.dq.t, &pb.dk.t, &pb.dv.t, &o.t,
                                          &lse.t, 0, NULL, &ev),
                   CLNSA_SUCCESS);
  clWaitForEvents(1, &ev), clReleaseEvent(ev);
  expect_empty(&o, &lse, "window 0");
  dev_free(&o), dev_free(&lse), dev_free(&dbi), dev_free(&dkc), dev_free(&dvc);
  problem_free(&pb);
}

/* Shapes the tensor-core kernels (cl/attend_mma.cl) take: q, k, v of one 16-bit type,
 * head dims in 32-wide chunks, aligned rows. Every group size class (packed tokens, a
 * partial 16-row tile, several tiles per token), several key tiles per warp, varlen with
 * an empty sequence, TQ < TK, a block size that does not divide the key tile. Wherever
 * the context has a tensor-core path (NVIDIA, or CLNSA_TUNE=MMA=2) these run on it; run
 * as `test_attend tensor-cores` the test requires that path. */
static void test_attend_tensor_cores(void **state) {
  (void)state;
  rng r = {harness_seed("attend tensor cores")};
  printf("# tensor-core path: %d\n", (int)clnsa_context_tensor_cores(ctx));
  static const attend_case cases[] = {
      {"tc G16", 1, 70, 70, 2, 16, 64, 32, 16, 4, {9, 200}, 0, {0}, {0}, CLNSA_BF16, 0, 0, 0, 1},
      {"tc G1", 2, 90, 90, 1, 1, 32, 64, 8, 6, {30}, 0, {0}, {0}, CLNSA_F16, 0, 0, 0, 1},
      {"tc G3 bs5", 1, 61, 61, 2, 3, 32, 32, 5, 7, {4}, 0, {0}, {0}, CLNSA_BF16, 0, 0, 0, 1},
      {"tc G20", 1, 23, 23, 1, 20, 128, 128, 8, 3, {16}, 0, {0}, {0}, CLNSA_BF16, 0, 0, 0, 1},
      {"tc TQ<TK", 1, 9, 77, 1, 8, 96, 32, 16, 5, {40}, 0, {0}, {0}, CLNSA_F16, 0, 0, 0, 1},
      {"tc varlen",
       1,
       0,
       0,
       2,
       2,
       32,
       32,
       8,
       4,
       {7},
       4,
       {0, 5, 5, 46, 47},
       {0, 5, 5, 46, 47},
       CLNSA_BF16,
       0,
       0,
       0,
       1},
      {"tc peaked", 1, 48, 48, 1, 4, 64, 64, 8, 5, {48}, 0, {0}, {0}, CLNSA_F16, 0, 3.0, 0.7f, 1},
      {"tc kv f32", 1, 75, 75, 1, 16, 64, 96, 8, 4, {20}, 0, {0}, {0}, CLNSA_BF16, KV_F32, 0, 0, 1},
      /* 50 compressed keys: 4 key tiles through the two raw stages of the f32 path */
      {"tc kv f32 tiles", 1, 200, 200, 1, 4, 128, 32, 4, 4, {0}, 0, {0}, {0}, CLNSA_BF16, KV_F32,
       0, 0, 1},
      {"tc kv f32 G2",
       1,
       40,
       40,
       2,
       2,
       32,
       32,
       8,
       3,
       {40},
       0,
       {0},
       {0},
       CLNSA_BF16,
       KV_F32,
       2.0,
       0,
       1},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r);
}

/* The compressed and window branches on Hopper's wgmma (cl/wgmma_ops.cl, opt-in through
 * CLNSA_TUNE WGMMA=1): in the emulation (CPUs) the same tile layouts through emulated mma,
 * on an H100 the instructions themselves; on other NVIDIA GPUs the mma.sync kernels.
 * Several 64-row warpgroup tiles and key tiles per row (long windows, 75 compressed keys),
 * a partial last tile, G 2 / 3 / 8 / 16, f16 and bf16, f32 k_cmp/v_cmp (the split), DV = 96
 * and 32 (32-dim P V instructions), varlen with an empty sequence, TQ < TK, and 64 keys a
 * step (WG_KT=64). Few cases: each shape is an emulated build that PoCL compiles slowly. */
static void test_attend_wgmma(void **state) {
  (void)state;
  rng r = {harness_seed("attend wgmma")};
  assert_int_equal(clnsa_context_wgmma(ctx), 0); /* opt-in: off unless asked */
  assert_int_equal(clnsa_context_wgmma(NULL), 0);
  harness_tune_extend("WGMMA=1");
  const int wg = clnsa_context_wgmma(ctx);
  printf("# wgmma path: %d\n", wg);
  /* the emulation takes it whenever asked (NVIDIA: Hopper only, after its probe) */
  if (clnsa_context_tensor_cores(ctx) == CLNSA_MMA_EMULATED) assert_int_equal(wg, 1);
  /* clang-format off */
  static const attend_case cases[] = {
      /* name, B, TQ, TK, H, G, DK, DV, BS, S, W, nseq, cu_q, cu_k, dt, mixed, amp, scale, aligned */
      {"wg G16", 1, 90, 90, 2, 16, 64, 64, 4, 4, {9, 200}, 0, {0}, {0}, CLNSA_BF16, 0, 0, 0, 1},
      {"wg kv f32 dv96", 1, 150, 150, 1, 3, 128, 96, 2, 4, {0}, 0, {0}, {0}, CLNSA_BF16, KV_F32, 0, 0, 1},
      {"wg TQ<TK", 1, 9, 77, 1, 8, 96, 32, 16, 5, {40}, 0, {0}, {0}, CLNSA_F16, 0, 0, 0, 1},
      {"wg varlen", 1, 0, 0, 2, 2, 32, 32, 8, 4, {7}, 4, {0, 5, 5, 46, 47}, {0, 5, 5, 46, 47}, CLNSA_BF16, 0, 0, 0, 1},
  };
  /* clang-format on */
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    problem pb;
    problem_init(&pb, &cases[i], 0, &r);
    run_compressed(&pb);
    for (int w = 0; w < MAX_W && cases[i].W[w] > 0; w++) run_window(&pb, cases[i].W[w]);
    problem_free(&pb);
  }
  harness_tune_extend("WG_KT=64");
  problem pb;
  problem_init(&pb, &cases[0], 0, &r);
  run_compressed(&pb);
  run_window(&pb, 200);
  problem_free(&pb);
  harness_tune_teardown(NULL);
}

/* CLNSA_FLAG_TF32 with f32 q, k, v: on a tensor-core path (NVIDIA, or CLNSA_TUNE=MMA=2)
 * cl/attend_tf32.cl within the semantics' 1e-2 for tf32 matrix units, elsewhere, and for
 * shapes it does not take (DV = 24 here), the exact path within 1e-5. D = 128; G not a
 * multiple of 16 (packed tokens G = 1, 3; a partial 16-row tile; G = 20: two tiles per
 * token); DK = 48 (the K tile's other padding); varlen with an empty sequence; TQ < TK;
 * several key tiles per warp; peaked scores; a block size that does not divide the tile. */
static void test_attend_tf32(void **state) {
  (void)state;
  rng r = {harness_seed("attend tf32")};
  printf("# tensor-core path: %d\n", (int)clnsa_context_tensor_cores(ctx));
  /* clang-format off */
  static const attend_case cases[] = {
      /* name, B, TQ, TK, H, G, DK, DV, BS, S, W, nseq, cu_q, cu_k, dt, mixed, amp, scale, aligned */
      {"tf32 G16 d128", 1, 40, 40, 1, 16, 128, 128, 16, 3, {9, 100}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 1},
      {"tf32 G3 varlen", 1, 0, 0, 2, 3, 64, 32, 8, 5, {7}, 4, {0, 6, 6, 40, 41}, {0, 6, 6, 40, 41},
       CLNSA_F32, 0, 0, 0, 1},
      {"tf32 G20 dk48", 1, 21, 21, 1, 20, 48, 64, 5, 3, {16}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 1},
      {"tf32 G1 TQ<TK", 2, 9, 77, 1, 1, 64, 32, 8, 6, {40}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 1},
      {"tf32 peaked", 1, 48, 48, 1, 4, 64, 32, 8, 5, {48}, 0, {0}, {0}, CLNSA_F32, 0, 2.0, 0.7f, 1},
      {"tf32 dv24", 1, 30, 30, 1, 2, 32, 24, 8, 3, {9}, 0, {0}, {0}, CLNSA_F32, 0, 0, 0, 1},
  };
  /* clang-format on */
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    run_case_flags(&cases[i], CLNSA_FLAG_TF32, &r);
}

/* The compressed entry's own shape rules: k_cmp rows must be ceil(TK/BS) with TK = TQ
 * (or seqs' total); lse must be f32. Nothing is written on failure. */
static void test_attend_rejects(void **state) {
  (void)state;
  rng r = {harness_seed("attend rejects")};
  static const attend_case c = {"rejects", 1, 17,  17,  1,         2, 32, 24, 8, 3,
                                {0},       0, {0}, {0}, CLNSA_F32, 0, 0,  0,  0};
  problem pb;
  problem_init(&pb, &c, 0, &r);
  int64_t shc[4] = {1, 2, 1, 32}, shvc[4] = {1, 2, 1, 24}; /* ceil(17/8) = 3, not 2 */
  double kc[64], vc[48];
  rng_fill(&r, kc, 64, -1, 1), rng_fill(&r, vc, 48, -1, 1);
  dev_tensor dkc = dev_upload(ctx, CLNSA_F32, 4, shc, kc, false);
  dev_tensor dvc = dev_upload(ctx, CLNSA_F32, 4, shvc, vc, false);
  dev_tensor o = dev_output(ctx, CLNSA_F32, 4, pb.sho, false);
  dev_tensor lse = dev_output(ctx, CLNSA_F16, 3, pb.shl, false);
  size_t n0, n1;
  unsigned char *before = dev_raw(ctx, &o, &n0);
  assert_int_equal(clnsa_compressed_attention(ctx, &pb.p, NULL, &pb.dq.t, &dkc.t, &dvc.t, &o.t,
                                              NULL, 0, NULL, NULL),
                   CLNSA_ERR_SHAPE_MISMATCH);
  printf("# rejected: %s\n", clnsa_last_message(ctx));
  assert_int_equal(clnsa_window_attention(ctx, &pb.p, NULL, &pb.dq.t, &pb.dk.t, &pb.dv.t, &o.t,
                                          &lse.t, 0, NULL, NULL),
                   CLNSA_ERR_DTYPE);
  printf("# rejected: %s\n", clnsa_last_message(ctx));
  clFinish(clnsa_context_queue(ctx));
  unsigned char *after = dev_raw(ctx, &o, &n1);
  assert_true(n0 == n1 && memcmp(before, after, n0) == 0);
  free(before), free(after);
  dev_free(&o), dev_free(&lse), dev_free(&dkc), dev_free(&dvc);
  problem_free(&pb);
}

int main(int argc, char **argv) {
  ctx = harness_context();
  if (harness_tensor_cores_mode(ctx, argc, argv)) {
    const struct CMUnitTest only[] = {
        cmocka_unit_test(test_attend_tensor_cores),
        cmocka_unit_test_teardown(test_attend_wgmma, harness_tune_teardown),
        cmocka_unit_test(test_attend_tf32)};
    int rc = cmocka_run_group_tests(only, NULL, NULL);
    clnsa_context_destroy(ctx);
    return rc;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_attend_tensor_cores),
      cmocka_unit_test(test_attend_shapes),
      cmocka_unit_test(test_attend_dtypes_dims),
      cmocka_unit_test(test_attend_small_tiles),
      cmocka_unit_test(test_attend_selected_packed),
      cmocka_unit_test(test_attend_without_lse),
      cmocka_unit_test(test_attend_empty),
      cmocka_unit_test(test_attend_rejects),
      cmocka_unit_test(test_attend_tf32),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  clnsa_context_destroy(ctx);
  return rc;
}
