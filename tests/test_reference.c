/* Tests of the float64 host reference itself: analytic gradients against
 * central finite differences, plus small hand-checkable cases of each
 * semantic rule in nsa-semantics.md. Seeds are printed so failures replay. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reference.h"

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state;

static void seed_rng(uint64_t seed, const char *what) {
  rng_state = seed;
  printf("[ seed     ] %s: 0x%016llx\n", what, (unsigned long long)seed);
}

static uint64_t splitmix64(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [-1, 1]. */
static double urand(void) {
  return (double)(splitmix64() >> 11) * 0x1.0p-53 * 2.0 - 1.0;
}

static int irand(int lo, int hi) { /* inclusive */
  return lo + (int)(splitmix64() % (uint64_t)(hi - lo + 1));
}

static void fill(double *p, size_t n, double amp) {
  for (size_t i = 0; i < n; i++) p[i] = amp * urand();
}

static double *dalloc(size_t n) { return test_calloc(n ? n : 1, sizeof(double)); }
static int *ialloc(size_t n) { return test_calloc(n ? n : 1, sizeof(int)); }

static size_t n_rows(const ref_shape *s) { return (size_t)s->B * s->TQ * s->HQ; }
static size_t n_kv(const ref_shape *s) { return (size_t)s->B * s->TK * s->H; }
static size_t n_bi(const ref_shape *s) { return (size_t)s->B * s->TQ * s->H * s->S; }
static size_t n_cmp(const ref_shape *s) { return (size_t)s->B * ref_num_cmp(s) * s->H; }

static double dot(const double *a, const double *b, int n) {
  double acc = 0.0;
  for (int d = 0; d < n; d++) acc += a[d] * b[d];
  return acc;
}

/* ||a - b|| / ||b||, or the absolute norm when b is zero. */
static double rel_err(const double *a, const double *b, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; i++) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static void assert_close(const double *a, const double *b, size_t n, double tol) {
  double e = rel_err(a, b, n);
  if (!(e < tol)) fail_msg("relative error %.3e >= %.1e", e, tol);
}

static ref_shape shape(int B, int TQ, int TK, int HQ, int H, int DK, int DV,
                       int BS, int S, int W) {
  ref_shape s;
  memset(&s, 0, sizeof s);
  s.B = B; s.TQ = TQ; s.TK = TK; s.HQ = HQ; s.H = H; s.DK = DK; s.DV = DV;
  s.BS = BS; s.S = S; s.W = W;
  s.scale = 1.0 / sqrt((double)DK);
  return s;
}

/* ---------------------------------------------------------------- problems */

enum { GATE_CMP = 1, GATE_SLC = 2, GATE_SWA = 4 };
enum { IDX_TOPK, IDX_RANDOM };

/* Owns one set of inputs; in points into the arrays so FD can perturb them. */
typedef struct problem {
  ref_shape s;
  double *q, *k, *v, *g_cmp, *g_slc, *g_swa;
  int *bi, *counts;
  ref_inputs in;
} problem;

static double *maybe_gate(const ref_shape *s, int present) {
  if (!present) return NULL;
  double *g = dalloc(n_rows(s));
  fill(g, n_rows(s), 1.0);
  return g;
}

static void problem_init(problem *pb, const ref_shape *s, int gates) {
  memset(pb, 0, sizeof *pb);
  pb->s = *s;
  pb->q = dalloc(n_rows(s) * s->DK);
  pb->k = dalloc(n_kv(s) * s->DK);
  pb->v = dalloc(n_kv(s) * s->DV);
  fill(pb->q, n_rows(s) * s->DK, 1.0);
  fill(pb->k, n_kv(s) * s->DK, 1.0);
  fill(pb->v, n_kv(s) * s->DV, 1.0);
  pb->g_cmp = maybe_gate(s, gates & GATE_CMP);
  pb->g_slc = maybe_gate(s, gates & GATE_SLC);
  pb->g_swa = maybe_gate(s, gates & GATE_SWA);
  pb->in = (ref_inputs){pb->q, pb->k, pb->v, pb->g_cmp, pb->g_slc, pb->g_swa, NULL};
}

static void problem_free(problem *pb) {
  test_free(pb->q);
  test_free(pb->k);
  test_free(pb->v);
  if (pb->g_cmp) test_free(pb->g_cmp);
  if (pb->g_slc) test_free(pb->g_slc);
  if (pb->g_swa) test_free(pb->g_swa);
  if (pb->bi) test_free(pb->bi);
  if (pb->counts) test_free(pb->counts);
}

/* Fixes the block indices so the forward is a smooth function for FD:
 * either the top-k choice at the unperturbed point, or random entries that
 * exercise -1, duplicates and blocks beyond IC. */
static void problem_fix_indices(problem *pb, int mode) {
  pb->bi = ialloc(n_bi(&pb->s));
  if (mode == IDX_RANDOM) {
    int nb = ref_num_cmp(&pb->s);
    for (size_t i = 0; i < n_bi(&pb->s); i++) pb->bi[i] = irand(-1, nb);
  } else {
    double *o = dalloc(n_rows(&pb->s) * pb->s.DV);
    ref_saved sv = {0};
    sv.block_indices = pb->bi;
    ref_forward(&pb->s, &pb->in, o, &sv);
    test_free(o);
  }
  pb->in.block_indices = pb->bi;
}

/* ---------------------------------------------------------------- FD check */

typedef struct fd_case {
  int B, TQ, TK, HQ, H, DK, DV, BS, S, W;
  int gates, idx_mode, counts;
  int nseq;
  const int *cu_q, *cu_k;
  uint64_t seed;
} fd_case;

static double loss(const problem *pb, const double *R, double *o) {
  ref_forward(&pb->s, &pb->in, o, NULL);
  return dot(o, R, (int)(n_rows(&pb->s) * pb->s.DV));
}

/* Central differences of the loss w.r.t. every element of x (in place). */
static double fd_error(const problem *pb, double *x, size_t n,
                       const double *grad, const double *R, double *o) {
  const double h = 1e-5;
  double *fd = dalloc(n);
  for (size_t i = 0; i < n; i++) {
    const double x0 = x[i];
    x[i] = x0 + h;
    double lp = loss(pb, R, o);
    x[i] = x0 - h;
    double lm = loss(pb, R, o);
    x[i] = x0;
    fd[i] = (lp - lm) / (2.0 * h);
  }
  double e = rel_err(grad, fd, n);
  test_free(fd);
  return e;
}

static void check_fd(const char *what, double err) {
  printf("[ fd       ]   %-6s rel err %.2e\n", what, err);
  if (!(err < 1e-6)) fail_msg("%s: FD relative error %.3e", what, err);
}

static void fd_test(void **state) {
  const fd_case *c = *state;
  ref_shape s = shape(c->B, c->TQ, c->TK, c->HQ, c->H, c->DK, c->DV, c->BS, c->S, c->W);
  s.nseq = c->nseq;
  s.cu_q = c->cu_q;
  s.cu_k = c->cu_k;
  seed_rng(c->seed, "fd case");
  problem pb;
  problem_init(&pb, &s, c->gates);
  if (c->counts) { /* per-token counts in [0, S] */
    pb.counts = ialloc((size_t)s.B * s.TQ * s.H);
    for (size_t i = 0; i < (size_t)s.B * s.TQ * s.H; i++) pb.counts[i] = irand(0, s.S);
    pb.s.block_counts = pb.counts;
  }
  const size_t nr = n_rows(&s), nkv = n_kv(&s);
  double *R = dalloc(nr * s.DV), *o = dalloc(nr * s.DV);
  fill(R, nr * s.DV, 1.0);

  /* Backward recomputing the top-k must equal backward with those indices. */
  ref_grads g0 = {dalloc(nr * s.DK), dalloc(nkv * s.DK), dalloc(nkv * s.DV), NULL, NULL, NULL};
  if (c->idx_mode == IDX_TOPK) ref_backward(&pb.s, &pb.in, R, &g0);
  problem_fix_indices(&pb, c->idx_mode);

  ref_grads g = {dalloc(nr * s.DK), dalloc(nkv * s.DK), dalloc(nkv * s.DV),
                 pb.g_cmp ? dalloc(nr) : NULL, pb.g_slc ? dalloc(nr) : NULL,
                 pb.g_swa ? dalloc(nr) : NULL};
  ref_backward(&pb.s, &pb.in, R, &g);
  if (c->idx_mode == IDX_TOPK) {
    assert_memory_equal(g0.dq, g.dq, nr * s.DK * sizeof(double));
    assert_memory_equal(g0.dk, g.dk, nkv * s.DK * sizeof(double));
  }

  check_fd("dq", fd_error(&pb, pb.q, nr * s.DK, g.dq, R, o));
  check_fd("dk", fd_error(&pb, pb.k, nkv * s.DK, g.dk, R, o));
  check_fd("dv", fd_error(&pb, pb.v, nkv * s.DV, g.dv, R, o));
  if (pb.g_cmp) check_fd("dg_cmp", fd_error(&pb, pb.g_cmp, nr, g.dg_cmp, R, o));
  if (pb.g_slc) check_fd("dg_slc", fd_error(&pb, pb.g_slc, nr, g.dg_slc, R, o));
  if (pb.g_swa) check_fd("dg_swa", fd_error(&pb, pb.g_swa, nr, g.dg_swa, R, o));

  double *all[] = {R, o, g0.dq, g0.dk, g0.dv, g.dq, g.dk, g.dv, g.dg_cmp, g.dg_slc, g.dg_swa};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++)
    if (all[i]) test_free(all[i]);
  problem_free(&pb);
}

static const int cu_a[] = {0, 5, 6, 13};          /* lengths 5, 1, 7 */
static const int cu_q_b[] = {0, 3, 4, 6};         /* query lengths 3, 1, 2 */
static const int cu_k_b[] = {0, 9, 10, 14};       /* key lengths 9, 1, 4 */

#define ALLG (GATE_CMP | GATE_SLC | GATE_SWA)
static const fd_case fd_cases[] = {
    /* B  TQ  TK  HQ H DK DV BS S  W   gates                idx        cnt nseq cu */
    {1, 9, 9, 2, 2, 5, 3, 4, 3, 0, GATE_CMP | GATE_SLC, IDX_TOPK, 0, 0, NULL, NULL, 0x1001},
    {2, 11, 11, 4, 2, 4, 6, 4, 2, 5, ALLG, IDX_TOPK, 0, 0, NULL, NULL, 0x1002},
    {1, 13, 13, 3, 1, 3, 5, 4, 3, 3, GATE_SWA, IDX_TOPK, 0, 0, NULL, NULL, 0x1003},
    {2, 5, 12, 4, 2, 6, 4, 4, 3, 4, GATE_CMP | GATE_SLC, IDX_TOPK, 0, 0, NULL, NULL, 0x1004},
    {1, 13, 13, 4, 2, 4, 3, 4, 3, 3, ALLG, IDX_TOPK, 0, 3, cu_a, cu_a, 0x1005},
    {1, 6, 14, 6, 2, 5, 4, 4, 2, 6, GATE_CMP | GATE_SWA, IDX_RANDOM, 0, 3, cu_q_b, cu_k_b, 0x1006},
    {1, 12, 12, 3, 1, 4, 2, 4, 4, 0, GATE_CMP | GATE_SLC, IDX_RANDOM, 0, 0, NULL, NULL, 0x1007},
    {1, 13, 13, 4, 2, 3, 5, 4, 4, 13, ALLG, IDX_TOPK, 1, 0, NULL, NULL, 0x1008},
    {1, 10, 10, 2, 1, 3, 3, 4, 2, 16, GATE_SLC | GATE_SWA, IDX_TOPK, 0, 0, NULL, NULL, 0x1009},
    {1, 10, 10, 3, 3, 2, 4, 4, 3, 2, 0, IDX_TOPK, 0, 0, NULL, NULL, 0x100a},
};

/* ---------------------------------------------------------------- units */

static void test_pool_mean(void **state) {
  (void)state;
  seed_rng(0x2001, "pool");
  ref_shape s = shape(1, 6, 6, 1, 1, 2, 3, 4, 1, 0);
  assert_int_equal(ref_num_cmp(&s), 2);
  double k[12], v[18], kc[4], vc[6];
  fill(k, 12, 1.0);
  fill(v, 18, 1.0);
  ref_pool(&s, k, v, kc, vc);
  for (int d = 0; d < 2; d++) {
    assert_float_equal(kc[d], (k[d] + k[2 + d] + k[4 + d] + k[6 + d]) / 4, 1e-15);
    assert_float_equal(kc[2 + d], (k[8 + d] + k[10 + d]) / 2, 1e-15); /* 2-token block */
  }
  for (int d = 0; d < 3; d++)
    assert_float_equal(vc[3 + d], (v[12 + d] + v[15 + d]) / 2, 1e-15);

  ref_shape sv = shape(1, 13, 13, 1, 1, 2, 3, 4, 1, 0);
  sv.nseq = 3;
  sv.cu_q = sv.cu_k = cu_a;
  assert_int_equal(ref_num_cmp(&sv), 2 + 1 + 2); /* ceil(5/4)+ceil(1/4)+ceil(7/4) */
}

/* Queries before the first complete block see nothing; at p = BS-1 only block 0. */
static void test_compressed_empty_rows(void **state) {
  (void)state;
  seed_rng(0x2002, "compressed empty rows");
  ref_shape s = shape(1, 9, 9, 2, 1, 3, 2, 4, 1, 0);
  double q[9 * 2 * 3], k[9 * 3], v[9 * 2], kc[3 * 3], vc[3 * 2], o[9 * 2 * 2], lse[9 * 2];
  fill(q, sizeof q / sizeof *q, 1.0);
  fill(k, sizeof k / sizeof *k, 1.0);
  fill(v, sizeof v / sizeof *v, 1.0);
  ref_pool(&s, k, v, kc, vc);
  ref_compressed(&s, q, kc, vc, o, lse);
  for (int r = 0; r < 3 * 2; r++) { /* p = 0, 1, 2 */
    assert_true(isinf(lse[r]) && lse[r] < 0);
    assert_true(o[r * 2] == 0.0 && o[r * 2 + 1] == 0.0);
  }
  for (int r = 3 * 2; r < 7 * 2; r++) { /* p = 3..6: block 0 only */
    assert_float_equal(lse[r], s.scale * dot(q + r * 3, kc, 3), 1e-14);
    assert_float_equal(o[r * 2], vc[0], 1e-14);
    assert_float_equal(o[r * 2 + 1], vc[1], 1e-14);
  }
  const int r = 8 * 2 + 1; /* p = 8: blocks 0 and 1 */
  double s0 = s.scale * dot(q + r * 3, kc, 3), s1 = s.scale * dot(q + r * 3, kc + 3, 3);
  double p0 = exp(s0) / (exp(s0) + exp(s1));
  assert_float_equal(lse[r], log(exp(s0) + exp(s1)), 1e-14);
  assert_float_equal(o[r * 2], p0 * vc[0] + (1 - p0) * vc[2], 1e-14);
}

/* Runs the compressed attention and top-k on given q and k_cmp (24 tokens,
 * BS 4, so 6 blocks, S 4), with k_cmp supplied directly rather than pooled. */
static void topk_on(ref_shape *s, const double *q, const double *kc, int *bi) {
  const size_t nr = n_rows(s);
  double *vc = dalloc(n_cmp(s) * s->DV), *o = dalloc(nr * s->DV), *lse = dalloc(nr);
  fill(vc, n_cmp(s) * s->DV, 1.0);
  ref_compressed(s, q, kc, vc, o, lse);
  ref_topk(s, q, kc, lse, bi);
  test_free(vc);
  test_free(o);
  test_free(lse);
}

static void expect_row(const int *bi, int t, const int e0, int e1, int e2, int e3) {
  const int *row = bi + t * 4;
  const int e[4] = {e0, e1, e2, e3};
  for (int j = 0; j < 4; j++)
    if (row[j] != e[j])
      fail_msg("query %d: got {%d,%d,%d,%d}, expected {%d,%d,%d,%d}", t, row[0],
               row[1], row[2], row[3], e[0], e[1], e[2], e[3]);
}

static void test_topk_obvious(void **state) {
  (void)state;
  seed_rng(0x2003, "topk obvious");
  ref_shape s = shape(1, 24, 24, 2, 1, 4, 2, 4, 4, 0);
  const double q0[4] = {1.0, 0.5, -0.5, 0.25}, q1[4] = {0.8, 0.6, -0.3, 0.1};
  double q[24 * 2 * 4], kc[6 * 4];
  int bi[24 * 4], counts[24];
  for (int t = 0; t < 24; t++) { /* every query the same, so block 2 wins */
    memcpy(q + t * 8, q0, sizeof q0);
    memcpy(q + t * 8 + 4, q1, sizeof q1);
  }
  fill(kc, 24, 0.1);
  for (int d = 0; d < 4; d++) kc[2 * 4 + d] = 5.0 * q0[d];
  topk_on(&s, q, kc, bi);
  expect_row(bi, 23, 0, 2, 4, 5); /* forced 5, 4, 0, then the favourite */
  expect_row(bi, 19, 0, 2, 3, 4); /* IC 4 */
  expect_row(bi, 9, 0, 1, 2, -1); /* IC 2: only 3 candidates */
  expect_row(bi, 5, 0, 1, -1, -1);
  expect_row(bi, 2, 0, -1, -1, -1);

  for (int t = 0; t < 24; t++) counts[t] = 4;
  counts[23] = 1;
  counts[22] = 2;
  counts[21] = 3;
  counts[20] = 0;
  s.block_counts = counts;
  topk_on(&s, q, kc, bi);
  expect_row(bi, 23, 5, -1, -1, -1); /* forced priority: IC first */
  expect_row(bi, 22, 4, 5, -1, -1);  /* then IC-1 */
  expect_row(bi, 21, 0, 4, 5, -1);   /* then 0 */
  expect_row(bi, 20, -1, -1, -1, -1);
  expect_row(bi, 19, 0, 2, 3, 4);
}

/* Equal importance: the lower block index wins. */
static void test_topk_ties(void **state) {
  (void)state;
  seed_rng(0x2004, "topk ties");
  ref_shape s = shape(1, 24, 24, 2, 1, 4, 2, 4, 4, 0);
  double q[24 * 2 * 4] = {0}, kc[6 * 4]; /* q = 0: all scores equal */
  int bi[24 * 4];
  fill(kc, 24, 1.0);
  topk_on(&s, q, kc, bi);
  expect_row(bi, 23, 0, 1, 4, 5);
}

/* Importance sums probabilities over the group: block 2 is second best for
 * each head alone, but best in sum. */
static void test_topk_group_sum(void **state) {
  (void)state;
  ref_shape s = shape(1, 24, 24, 2, 1, 4, 2, 4, 4, 0);
  s.scale = 1.0;
  double q[24 * 2 * 4] = {0}, kc[6 * 4] = {0};
  int bi[24 * 4];
  for (int t = 0; t < 24; t++) {
    q[t * 8 + 0] = 1.0; /* head 0 reads dim 0 */
    q[t * 8 + 5] = 1.0; /* head 1 reads dim 1 */
  }
  kc[1 * 4 + 0] = 3.0;                     /* head 0's favourite */
  kc[3 * 4 + 1] = 3.0;                     /* head 1's favourite */
  kc[2 * 4 + 0] = kc[2 * 4 + 1] = 2.8;     /* runner-up of both */
  topk_on(&s, q, kc, bi);
  expect_row(bi, 23, 0, 2, 4, 5);
}

static void test_selected_rules(void **state) {
  (void)state;
  seed_rng(0x2005, "selected rules");
  ref_shape s = shape(1, 12, 12, 1, 1, 3, 2, 4, 4, 0);
  double q[36], k[36], v[24], o[24], lse[12], o2[24], lse2[12];
  int bi[48];
  fill(q, 36, 1.0);
  fill(k, 36, 1.0);
  fill(v, 24, 1.0);
  for (int i = 0; i < 48; i++) bi[i] = -1;
  bi[9 * 4 + 0] = 1; /* p 9: duplicates, -1 and > IC are ignored */
  bi[9 * 4 + 1] = 1;
  bi[9 * 4 + 3] = 7;
  bi[8 * 4 + 0] = 2; /* p 8: own block, causal: token 8 only */
  bi[10 * 4 + 2] = 3; /* p 10: IC 2, block 3 ignored: empty */
  ref_selected(&s, q, k, v, bi, o, lse);
  bi[9 * 4 + 1] = bi[9 * 4 + 3] = -1;
  ref_selected(&s, q, k, v, bi, o2, lse2);
  assert_memory_equal(o + 18, o2 + 18, 2 * sizeof(double));
  assert_float_equal(lse[9], lse2[9], 0.0);
  double sc[4], m = 0.0, acc[2] = {0};
  for (int j = 0; j < 4; j++) {
    sc[j] = exp(s.scale * dot(q + 27, k + (4 + j) * 3, 3));
    m += sc[j];
  }
  for (int j = 0; j < 4; j++)
    for (int d = 0; d < 2; d++) acc[d] += sc[j] / m * v[(4 + j) * 2 + d];
  assert_close(o + 18, acc, 2, 1e-14);
  assert_float_equal(lse[9], log(m), 1e-14);
  assert_close(o + 16, v + 16, 2, 1e-14);
  assert_float_equal(lse[8], s.scale * dot(q + 24, k + 24, 3), 1e-14);
  assert_true(isinf(lse[10]) && lse[10] < 0 && o[20] == 0.0 && o[21] == 0.0);
}

/* Dense causal softmax over all j <= p, written out directly. */
static void dense_causal(const ref_shape *s, const double *q, const double *k,
                         const double *v, double *o) {
  const int G = s->HQ / s->H;
  for (int t = 0; t < s->TQ; t++)
    for (int hq = 0; hq < s->HQ; hq++) {
      const double *qr = q + (t * s->HQ + hq) * s->DK;
      double *orow = o + (t * s->HQ + hq) * s->DV, den = 0.0;
      memset(orow, 0, s->DV * sizeof *orow);
      for (int j = 0; j <= t; j++) {
        double e = exp(s->scale * dot(qr, k + (j * s->H + hq / G) * s->DK, s->DK));
        den += e;
        for (int d = 0; d < s->DV; d++) orow[d] += e * v[(j * s->H + hq / G) * s->DV + d];
      }
      for (int d = 0; d < s->DV; d++) orow[d] /= den;
    }
}

static void test_window(void **state) {
  (void)state;
  seed_rng(0x2006, "window");
  ref_shape s = shape(1, 10, 10, 4, 2, 3, 5, 4, 1, 10);
  double q[120], k[60], v[100], o[200], lse[40], want[200];
  fill(q, 120, 1.0);
  fill(k, 60, 1.0);
  fill(v, 100, 1.0);
  dense_causal(&s, q, k, v, want);
  ref_window(&s, q, k, v, o, lse);
  assert_close(o, want, 200, 1e-13);
  s.W = 50;
  ref_window(&s, q, k, v, o, lse);
  assert_close(o, want, 200, 1e-13);
  s.W = 1; /* each query sees only itself */
  ref_window(&s, q, k, v, o, lse);
  for (int t = 0; t < 10; t++)
    for (int hq = 0; hq < 4; hq++)
      assert_close(o + (t * 4 + hq) * 5, v + (t * 2 + hq / 2) * 5, 5, 1e-14);
}

/* o is the gated sum of the saved branch outputs; absent gates as specified. */
static void test_forward_combine(void **state) {
  (void)state;
  seed_rng(0x2007, "forward combine");
  ref_shape s = shape(1, 11, 11, 4, 2, 3, 4, 4, 3, 5);
  problem pb;
  problem_init(&pb, &s, ALLG);
  const size_t nr = n_rows(&s), no = nr * s.DV;
  double *o = dalloc(no), *want = dalloc(no);
  ref_saved sv = {dalloc(n_cmp(&s) * s.DK), dalloc(n_cmp(&s) * s.DV), dalloc(no),
                  dalloc(nr), dalloc(no), dalloc(nr), dalloc(no), dalloc(nr), ialloc(n_bi(&s))};
  ref_forward(&s, &pb.in, o, &sv);
  for (size_t r = 0; r < nr; r++)
    for (int d = 0; d < s.DV; d++) {
      size_t i = r * s.DV + d;
      want[i] = pb.g_slc[r] * sv.o_slc[i] + pb.g_cmp[r] * sv.o_cmp[i] + pb.g_swa[r] * sv.o_swa[i];
    }
  assert_close(o, want, no, 1e-15);

  pb.in.g_slc = pb.in.g_cmp = NULL; /* slc weight 1, no compressed term */
  ref_forward(&s, &pb.in, o, NULL);
  for (size_t i = 0; i < no; i++) want[i] = sv.o_slc[i] + pb.g_swa[i / s.DV] * sv.o_swa[i];
  assert_close(o, want, no, 1e-15);

  s.W = 0; /* window off even though g_swa is given */
  ref_forward(&s, &pb.in, o, NULL);
  assert_close(o, sv.o_slc, no, 1e-15);

  double *bufs[] = {o, want, sv.k_cmp, sv.v_cmp, sv.o_cmp, sv.lse_cmp, sv.o_slc, sv.lse_slc, sv.o_swa, sv.lse_swa};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) test_free(bufs[i]);
  test_free(sv.block_indices);
  problem_free(&pb);
}

/* A packed varlen batch equals running each sequence on its own, forward
 * (output, indices) and backward. */
static void test_varlen_independent(void **state) {
  (void)state;
  seed_rng(0x2008, "varlen independent");
  ref_shape s = shape(1, 6, 14, 4, 2, 3, 2, 4, 2, 3);
  s.nseq = 3;
  s.cu_q = cu_q_b;
  s.cu_k = cu_k_b;
  problem pb;
  problem_init(&pb, &s, ALLG);
  const size_t nr = n_rows(&s), nkv = n_kv(&s);
  double *o = dalloc(nr * s.DV), *R = dalloc(nr * s.DV), *o1 = dalloc(nr * s.DV);
  int *bi = ialloc(n_bi(&s)), *bi1 = ialloc(n_bi(&s));
  fill(R, nr * s.DV, 1.0);
  ref_grads g = {dalloc(nr * s.DK), dalloc(nkv * s.DK), dalloc(nkv * s.DV), NULL, NULL, NULL};
  ref_grads g1 = {dalloc(nr * s.DK), dalloc(nkv * s.DK), dalloc(nkv * s.DV), NULL, NULL, NULL};
  ref_saved sv = {0};
  sv.block_indices = bi;
  ref_forward(&s, &pb.in, o, &sv);
  ref_backward(&s, &pb.in, R, &g);
  for (int n = 0; n < 3; n++) {
    const int q0 = cu_q_b[n], k0 = cu_k_b[n];
    ref_shape one = shape(1, cu_q_b[n + 1] - q0, cu_k_b[n + 1] - k0, 4, 2, 3, 2, 4, 2, 3);
    const size_t rq = (size_t)q0 * 4, rk = (size_t)k0 * 2;
    ref_inputs in = {pb.q + rq * 3, pb.k + rk * 3, pb.v + rk * 2,
                     pb.g_cmp + rq, pb.g_slc + rq, pb.g_swa + rq, NULL};
    ref_saved s1 = {0};
    s1.block_indices = bi1 + (size_t)q0 * 2 * 2;
    ref_forward(&one, &in, o1 + rq * 2, &s1);
    ref_grads gs = {g1.dq + rq * 3, g1.dk + rk * 3, g1.dv + rk * 2, NULL, NULL, NULL};
    ref_backward(&one, &in, R + rq * 2, &gs);
  }
  assert_memory_equal(bi, bi1, n_bi(&s) * sizeof(int));
  assert_close(o, o1, nr * s.DV, 1e-15);
  assert_close(g.dq, g1.dq, nr * s.DK, 1e-15);
  assert_close(g.dk, g1.dk, nkv * s.DK, 1e-15);
  assert_close(g.dv, g1.dv, nkv * s.DV, 1e-15);
  double *bufs[] = {o, R, o1, g.dq, g.dk, g.dv, g1.dq, g1.dk, g1.dv};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) test_free(bufs[i]);
  test_free(bi);
  test_free(bi1);
  problem_free(&pb);
}

#define FD(i, name) {"fd: " name, fd_test, NULL, NULL, (void *)&fd_cases[i]}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pool_mean),
      cmocka_unit_test(test_compressed_empty_rows),
      cmocka_unit_test(test_topk_obvious),
      cmocka_unit_test(test_topk_ties),
      cmocka_unit_test(test_topk_group_sum),
      cmocka_unit_test(test_selected_rules),
      cmocka_unit_test(test_window),
      cmocka_unit_test(test_forward_combine),
      cmocka_unit_test(test_varlen_independent),
      FD(0, "G1 DK5 DV3 W0, cmp+slc gates"),
      FD(1, "G2 B2 W5, all gates"),
      FD(2, "G3 W3, swa gate only (slc weight 1, no cmp)"),
      FD(3, "G2 B2 TQ<TK, cmp+slc gates, W4 without gate"),
      FD(4, "varlen 5/1/7, G2 W3, all gates"),
      FD(5, "varlen TQ<TK, G3, random indices, cmp+swa"),
      FD(6, "G3 random indices (-1, dups, > IC), W0"),
      FD(7, "G2 per-token block_counts, W=TK, all gates"),
      FD(8, "G2 W16 >= TK dense, slc+swa"),
      FD(9, "G1 H3 W2, no gates"),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
