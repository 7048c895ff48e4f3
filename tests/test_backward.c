/* The backward pass (clnsa_backward after clnsa_forward) against the float64 reference
 * (ref_backward), over a sweep of shapes, group sizes, gates, windows, packings, given
 * indices and dtypes. Each case also runs the backward twice and demands bit-identical
 * gradients. Then: a block nobody selects gets exactly zero gradients, a block everybody
 * selects (many mask words), and the error paths leave every output untouched.
 *
 * The reference treats block indices as constants: it is given the indices the device's
 * forward chose, so a near-tie in top-k cannot make the comparison fail. Kernel builds are
 * cached per option string, so the cases share the (DK, DV, BS) classes of test_forward. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

enum { G_CMP = 1, G_SLC = 2, G_SWA = 4, G_ALL = 7 };

typedef struct shape_class {
  int DK, DV, BS;
} shape_class;
static const shape_class classes[] = {{16, 24, 8}, {32, 16, 4}, {48, 32, 16},
                                      /* head dims the tensor-core kernels take */
                                      {32, 64, 8}, {64, 32, 16}, {128, 128, 64}};
/* The two classes each dtype is tried with: 6 of the 9 pairs keep the builds few. */
static const int dtype_classes[3][2] = {{0, 1}, {0, 2}, {1, 2}};

typedef struct bcase {
  int B, T, H, G, cls, S, W;
  int nseq;
  int cu[8];
  unsigned gates; /* G_* bits */
  bool caller_idx, padded;
  clnsa_dtype dt; /* every floating tensor */
  int tq;         /* > 0: only the last tq tokens are queries (no backward) */
  bool cmp16;     /* CLNSA_FLAG_CMP_16BIT: the forward keeps k_cmp, v_cmp in dt */
} bcase;

static clnsa_context *ctx;
/* The tolerance of check_gradients: the dtype's, or this where lower (the tensor-core
 * cases: the semantics' bound for half-precision matrix units, 1e-2). */
static double tolerance_cap = 1.0;

static double *rand_array(rng *r, size_t n, double lo, double hi) {
  double *x = malloc(sizeof(double) * (n ? n : 1));
  rng_fill(r, x, n, lo, hi);
  return x;
}

static double *zeros(size_t n) { return calloc(n ? n : 1, sizeof(double)); }

/* Everything one case needs on the device and on the host. */
typedef struct problem {
  ref_shape s;
  clnsa_params p;
  clnsa_seqs *seqs;
  double *q, *k, *v, *g[3], *d_o;
  int *idx; /* caller-given indices, or NULL */
  dev_tensor tq, tk, tv, tg[3], ti, to, tdo;
  dev_tensor dq, dk, dv, dg[3];
  clnsa_inputs in;
  clnsa_grads grads;
  cl_mem wsbuf;
  clnsa_workspace *ws;
} problem;

static ref_shape shape_of(const bcase *bc) {
  const shape_class *sc = &classes[bc->cls];
  ref_shape s;
  memset(&s, 0, sizeof s);
  s.B = bc->B, s.TQ = bc->tq ? bc->tq : bc->T, s.TK = bc->T, s.H = bc->H, s.HQ = bc->H * bc->G;
  s.DK = sc->DK, s.DV = sc->DV, s.BS = sc->BS, s.S = bc->S, s.W = bc->W;
  s.nseq = bc->nseq;
  if (bc->nseq) {
    s.cu_q = s.cu_k = bc->cu;
    s.TQ = s.TK = bc->cu[bc->nseq];
  }
  s.scale = 1.0 / sqrt((double)s.DK);
  return s;
}

/* Caller-given indices: random blocks (some beyond the query's own block, which must be
 * ignored), -1 holes and duplicates. */
static int *random_indices(const ref_shape *s, rng *r) {
  const size_t n = (size_t)s->B * s->TQ * s->H * s->S;
  int *x = malloc(sizeof(int) * (n ? n : 1));
  const int nbmax = (s->TK + s->BS - 1) / s->BS;
  for (size_t i = 0; i < n; i++) {
    int u = rng_int(r, 0, 9);
    x[i] = u < 2 ? -1 : u < 4 && i % (size_t)s->S ? x[i - 1] : rng_int(r, 0, nbmax + 1);
  }
  return x;
}

/* Uploads inputs and poisoned gradient outputs. idx: the caller-given indices (owned by
 * pb from now on); NULL draws random ones when bc->caller_idx. */
static void make_problem(problem *pb, const bcase *bc, int *idx, rng *r) {
  memset(pb, 0, sizeof *pb);
  pb->s = shape_of(bc);
  const ref_shape *s = &pb->s;
  pb->p = clnsa_params_default();
  pb->p.block_size = s->BS, pb->p.block_count = s->S, pb->p.window = s->W;
  if (bc->cmp16) { /* the reference pools into the same rounded values */
    pb->p.flags |= CLNSA_FLAG_CMP_16BIT;
    pb->s.round_k_cmp = pb->s.round_v_cmp = dtype_rounder(bc->dt);
  }
  if (!idx && bc->caller_idx) idx = random_indices(s, r);
  const clnsa_dtype dt = bc->dt;
  const size_t nq = (size_t)s->B * s->TQ * s->HQ, nk = (size_t)s->B * s->TK * s->H;
  pb->q = rand_array(r, nq * s->DK, -2, 2);
  pb->k = rand_array(r, nk * s->DK, -1, 1);
  pb->v = rand_array(r, nk * s->DV, -1, 1);
  pb->d_o = rand_array(r, nq * s->DV, -1, 1);
  for (int i = 0; i < 3; i++)
    if (bc->gates & (1u << i)) pb->g[i] = rand_array(r, nq, -1.5, 1.5);
  pb->idx = idx;
  const int64_t shq[4] = {s->B, s->TQ, s->HQ, s->DK}, shk[4] = {s->B, s->TK, s->H, s->DK};
  const int64_t shv[4] = {s->B, s->TK, s->H, s->DV}, sho[4] = {s->B, s->TQ, s->HQ, s->DV};
  const int64_t shg[3] = {s->B, s->TQ, s->HQ}, shi[4] = {s->B, s->TQ, s->H, s->S};
  pb->tq = dev_upload(ctx, dt, 4, shq, pb->q, bc->padded);
  pb->tk = dev_upload(ctx, dt, 4, shk, pb->k, false);
  pb->tv = dev_upload(ctx, dt, 4, shv, pb->v, bc->padded);
  pb->tdo = dev_upload(ctx, dt, 4, sho, pb->d_o, bc->padded);
  pb->to = dev_output(ctx, dt, 4, sho, false);
  for (int i = 0; i < 3; i++) {
    if (!pb->g[i]) continue;
    pb->tg[i] = dev_upload(ctx, dt, 3, shg, pb->g[i], bc->padded && i == 1);
    pb->dg[i] = dev_output(ctx, dt, 3, shg, bc->padded && i == 0);
  }
  if (idx) pb->ti = dev_upload_int(ctx, 4, shi, idx);
  pb->dq = dev_output(ctx, dt, 4, shq, bc->padded);
  pb->dk = dev_output(ctx, dt, 4, shk, bc->padded);
  pb->dv = dev_output(ctx, dt, 4, shv, false);
  if (s->nseq)
    assert_int_equal(clnsa_seqs_create(ctx, &pb->p, s->nseq, s->cu_q, NULL, &pb->seqs),
                     CLNSA_SUCCESS);
  clnsa_inputs in = {&pb->tq.t, &pb->tk.t, &pb->tv.t,
                     pb->g[0] ? &pb->tg[0].t : NULL, pb->g[1] ? &pb->tg[1].t : NULL,
                     pb->g[2] ? &pb->tg[2].t : NULL, idx ? &pb->ti.t : NULL, NULL, pb->seqs};
  pb->in = in;
  clnsa_grads gr = {&pb->dq.t, &pb->dk.t, &pb->dv.t,
                    pb->g[0] ? &pb->dg[0].t : NULL, pb->g[1] ? &pb->dg[1].t : NULL,
                    pb->g[2] ? &pb->dg[2].t : NULL};
  pb->grads = gr;
}

static void free_problem(problem *pb) {
  clnsa_workspace_destroy(pb->ws);
  if (pb->wsbuf) clReleaseMemObject(pb->wsbuf);
  clnsa_seqs_destroy(pb->seqs);
  dev_free(&pb->tq), dev_free(&pb->tk), dev_free(&pb->tv), dev_free(&pb->to);
  dev_free(&pb->tdo), dev_free(&pb->dq), dev_free(&pb->dk), dev_free(&pb->dv);
  for (int i = 0; i < 3; i++) {
    if (pb->g[i]) dev_free(&pb->tg[i]), dev_free(&pb->dg[i]);
    free(pb->g[i]);
  }
  if (pb->idx) dev_free(&pb->ti);
  free(pb->q), free(pb->k), free(pb->v), free(pb->d_o), free(pb->idx);
}

/* A workspace sized for forward and backward, then the forward into it. */
static void run_forward(problem *pb) {
  size_t need = 0;
  assert_int_equal(clnsa_backward_workspace_size(ctx, &pb->p, &pb->in, &need), CLNSA_SUCCESS);
  cl_int err;
  pb->wsbuf = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE, need + 64, NULL, &err);
  assert_int_equal(err, CL_SUCCESS);
  assert_int_equal(clnsa_workspace_create(ctx, pb->wsbuf, 64, need, &pb->ws), CLNSA_SUCCESS);
  clnsa_status st = clnsa_forward(ctx, &pb->p, &pb->in, &pb->to.t, pb->ws, 0, NULL, NULL);
  if (st != CLNSA_SUCCESS) print_error("%s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
}

static clnsa_status run_backward(problem *pb) {
  cl_event done = NULL;
  clnsa_status st =
      clnsa_backward(ctx, &pb->p, &pb->in, &pb->tdo.t, &pb->grads, pb->ws, 0, NULL, &done);
  if (st != CLNSA_SUCCESS) return st;
  assert_non_null(done);
  assert_int_equal(clWaitForEvents(1, &done), CL_SUCCESS);
  clReleaseEvent(done);
  return st;
}

/* The indices the forward used: the caller's, or the workspace's. */
static int *forward_indices(const problem *pb) {
  const ref_shape *s = &pb->s;
  const size_t n = (size_t)s->B * s->TQ * s->H * s->S;
  int *out = malloc(sizeof(int) * (n ? n : 1));
  if (pb->idx) {
    memcpy(out, pb->idx, sizeof(int) * n);
    return out;
  }
  dev_tensor view = {0};
  assert_int_equal(clnsa_forward_block_indices(pb->ws, &view.t), CLNSA_SUCCESS);
  view.count = n;
  int *dev = dev_download_int(ctx, &view);
  memcpy(out, dev, sizeof(int) * n);
  free(dev);
  return out;
}

/* Compares every gradient with the reference; returns the largest error / tolerance. */
static double check_gradients(problem *pb) {
  const ref_shape *s = &pb->s;
  const size_t nq = (size_t)s->B * s->TQ * s->HQ, nk = (size_t)s->B * s->TK * s->H;
  ref_grads rg = {zeros(nq * s->DK), zeros(nk * s->DK), zeros(nk * s->DV), NULL, NULL, NULL};
  double **rdg[3] = {&rg.dg_cmp, &rg.dg_slc, &rg.dg_swa};
  for (int i = 0; i < 3; i++)
    if (pb->g[i]) *rdg[i] = zeros(nq);
  int *idx = forward_indices(pb);
  ref_inputs rin = {pb->q, pb->k, pb->v, pb->g[0], pb->g[1], pb->g[2], idx};
  ref_backward(s, &rin, pb->d_o, &rg);
  const double tol = fmin(dtype_tolerance(pb->dq.t.dtype), tolerance_cap);
  double e[6] = {rel_error(dev_download(ctx, &pb->dq), rg.dq, nq * s->DK),
                 rel_error(dev_download(ctx, &pb->dk), rg.dk, nk * s->DK),
                 rel_error(dev_download(ctx, &pb->dv), rg.dv, nk * s->DV), 0, 0, 0};
  for (int i = 0; i < 3; i++)
    if (pb->g[i]) e[3 + i] = rel_error(dev_download(ctx, &pb->dg[i]), *rdg[i], nq);
  printf("#   dq %.2e dk %.2e dv %.2e dg_cmp %.2e dg_slc %.2e dg_swa %.2e\n", e[0], e[1], e[2],
         e[3], e[4], e[5]);
  double worst = 0;
  for (int i = 0; i < 6; i++) worst = fmax(worst, e[i] / tol);
  free(rg.dq), free(rg.dk), free(rg.dv), free(rg.dg_cmp), free(rg.dg_slc), free(rg.dg_swa);
  free(idx);
  return worst;
}

/* Raw bytes of every gradient output, back to back. */
static unsigned char *gradient_bytes(problem *pb, size_t *n) {
  dev_tensor *outs[6] = {&pb->dq, &pb->dk, &pb->dv, &pb->dg[0], &pb->dg[1], &pb->dg[2]};
  unsigned char *all = NULL;
  *n = 0;
  for (int i = 0; i < 6; i++) {
    if (!outs[i]->t.buffer) continue;
    size_t m;
    unsigned char *b = dev_raw(ctx, outs[i], &m);
    all = realloc(all, *n + m);
    memcpy(all + *n, b, m);
    *n += m;
    free(b);
  }
  return all;
}

static void print_case(const problem *pb, const bcase *bc) {
  const ref_shape *s = &pb->s;
  printf("# B=%d T=%d H=%d G=%d DK=%d DV=%d BS=%d S=%d W=%d nseq=%d gates=%c%c%c%s %s%s%s\n",
         s->B, s->TQ, s->H, bc->G, s->DK, s->DV, s->BS, s->S, s->W, s->nseq,
         bc->gates & G_CMP ? 'c' : '-', bc->gates & G_SLC ? 's' : '-',
         bc->gates & G_SWA ? 'w' : '-', pb->idx ? " caller-indices" : "", dtype_label(bc->dt),
         bc->padded ? " padded" : "", bc->cmp16 ? " cmp16" : "");
}

static void run_case(const bcase *bc, rng *r) {
  problem pb;
  make_problem(&pb, bc, NULL, r);
  print_case(&pb, bc);
  run_forward(&pb);
  clnsa_status st = run_backward(&pb);
  if (st != CLNSA_SUCCESS) print_error("%s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  size_t n1, n2;
  unsigned char *first = gradient_bytes(&pb, &n1);
  assert_true(check_gradients(&pb) < 1.0);
  assert_int_equal(run_backward(&pb), CLNSA_SUCCESS);
  unsigned char *second = gradient_bytes(&pb, &n2);
  assert_true(n1 == n2 && memcmp(first, second, n1) == 0); /* bit-identical reruns */
  free(first), free(second);
  free_problem(&pb);
}

/* Cases every run covers (data random, structure fixed). */
static const bcase fixed_cases[] = {
    /* B  T  H  G cls S  W  nseq cu           gates   idx    padded dtype */
    {2, 37, 2, 1, 0, 3, 0, 0, {0}, G_SLC, false, true, CLNSA_F32, 0, false},
    {1, 5, 1, 2, 0, 2, 4, 0, {0}, G_ALL, false, false, CLNSA_F16, 0, false}, /* T < BS */
    {1, 15, 2, 3, 2, 4, 0, 0, {0}, 0, false, false, CLNSA_BF16, 0, false},   /* T = BS - 1 */
    {2, 61, 1, 5, 1, 5, 9, 0, {0}, G_CMP | G_SWA, false, false, CLNSA_F32, 0, false},
    {1, 50, 2, 16, 1, 6, 16, 0, {0}, G_ALL, false, true, CLNSA_BF16, 0, false},
    {1, 33, 1, 16, 2, 2, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_F16, 0, false},
    /* varlen with an empty and a length-1 sequence */
    {1, 0, 1, 3, 0, 3, 6, 5, {0, 13, 13, 14, 40, 57}, G_ALL, false, false, CLNSA_F32, 0, false},
    {1, 0, 2, 2, 1, 4, 5, 4, {0, 5, 5, 6, 35}, G_SLC | G_SWA, false, true, CLNSA_BF16, 0, false},
    /* caller-given indices, with and without the compressed branch */
    {2, 40, 2, 2, 0, 5, 0, 0, {0}, G_SLC | G_CMP, true, true, CLNSA_F32, 0, false},
    {1, 29, 3, 1, 0, 4, 7, 0, {0}, G_SWA, true, false, CLNSA_F16, 0, false},
    {1, 0, 1, 5, 2, 3, 0, 3, {0, 1, 17, 30}, 0, true, false, CLNSA_BF16, 0, false},
    /* g_swa without a window: dg_swa = 0 */
    {1, 20, 1, 2, 0, 2, 0, 0, {0}, G_SWA | G_CMP, false, false, CLNSA_F32, 0, false},
    /* dense causal attention through the window */
    {1, 24, 2, 2, 1, 3, 100, 0, {0}, G_ALL, false, false, CLNSA_F32, 0, false},
};

static void test_backward_fixed(void **state) {
  (void)state;
  rng r = {harness_seed("backward fixed")};
  for (size_t i = 0; i < sizeof fixed_cases / sizeof fixed_cases[0]; i++)
    run_case(&fixed_cases[i], &r);
}

/* Random structure on top, within the shape classes. */
static void test_backward_random(void **state) {
  (void)state;
  rng r = {harness_seed("backward random")};
  const int groups[] = {1, 2, 3, 5, 16};
  const clnsa_dtype dts[] = {CLNSA_F32, CLNSA_F16, CLNSA_BF16};
  for (int n = 0; n < 6; n++) { /* few: each new (dtype, shape, gates) costs kernel builds */
    bcase bc;
    memset(&bc, 0, sizeof bc);
    bc.G = groups[rng_int(&r, 0, 4)];
    bc.H = bc.G >= 16 ? 1 : rng_int(&r, 1, 3);
    bc.S = rng_int(&r, 1, 6);
    bc.W = rng_int(&r, 0, 2) ? rng_int(&r, 1, 40) : 0;
    bc.gates = (unsigned)rng_int(&r, 0, 7);
    bc.caller_idx = rng_int(&r, 0, 3) == 0;
    bc.padded = rng_int(&r, 0, 1);
    bc.dt = dts[rng_int(&r, 0, 2)];
    bc.cls = dtype_classes[bc.dt][rng_int(&r, 0, 1)];
    if (rng_int(&r, 0, 2) == 0) { /* packed sequences, some empty or of length 1 */
      bc.B = 1;
      bc.nseq = rng_int(&r, 1, 6);
      for (int i = 0; i < bc.nseq; i++) {
        int u = rng_int(&r, 0, 5);
        bc.cu[i + 1] = bc.cu[i] + (u == 0 ? 0 : u == 1 ? 1 : rng_int(&r, 2, 60));
      }
    } else {
      bc.B = rng_int(&r, 1, 3);
      bc.T = rng_int(&r, 1, 80);
    }
    run_case(&bc, &r);
  }
}

/* Given indices that avoid block 2 everywhere, no compressed branch, no window: the keys
 * of block 2 get exactly zero gradients. */
static void test_unselected_block(void **state) {
  (void)state;
  rng r = {harness_seed("unselected block")};
  const bcase bc = {1, 40, 2, 2, 0, 2, 0, 0, {0}, G_SLC, true, false, CLNSA_F32, 0, false};
  const ref_shape shape = shape_of(&bc), *s = &shape;
  const size_t rows = (size_t)s->TQ * s->H;
  int *idx = malloc(sizeof(int) * rows * s->S);
  for (size_t i = 0; i < rows; i++) {
    const int ic = (int)(i / s->H) / s->BS;
    idx[i * s->S] = 0;
    idx[i * s->S + 1] = ic == 2 ? 1 : ic;
  }
  problem pb;
  make_problem(&pb, &bc, idx, &r);
  run_forward(&pb);
  assert_int_equal(run_backward(&pb), CLNSA_SUCCESS);
  assert_true(check_gradients(&pb) < 1.0);
  for (int j = 2 * s->BS; j < 3 * s->BS; j++)
    for (int h = 0; h < s->H; h++) {
      for (int d = 0; d < s->DK; d++)
        assert_true(pb.dk.host[((size_t)j * s->H + h) * s->DK + d] == 0.0);
      for (int d = 0; d < s->DV; d++)
        assert_true(pb.dv.host[((size_t)j * s->H + h) * s->DV + d] == 0.0);
    }
  free_problem(&pb);
}

/* Every query selects block 0 (and its own): block 0's 2100 tokens are more than one
 * chunk of the selected dk/dv work (1024 tokens), its mask row spans many expansions,
 * and the compressed dk/dv work is split into several token chunks. */
static void test_block_selected_by_all(void **state) {
  (void)state;
  rng r = {harness_seed("block selected by all")};
  const bcase bc = {1, 2100, 1, 2, 0, 2, 0, 0, {0}, G_SLC | G_CMP, true, false, CLNSA_F32, 0,
                    false};
  const ref_shape shape = shape_of(&bc), *s = &shape;
  int *idx = malloc(sizeof(int) * (size_t)s->TQ * s->H * s->S);
  for (int i = 0; i < s->TQ * s->H; i++) {
    idx[i * s->S] = 0;
    idx[i * s->S + 1] = (i / s->H) / s->BS;
  }
  problem pb;
  make_problem(&pb, &bc, idx, &r);
  print_case(&pb, &bc);
  run_forward(&pb);
  assert_int_equal(run_backward(&pb), CLNSA_SUCCESS);
  assert_true(check_gradients(&pb) < 1.0);
  free_problem(&pb);
}

/* Shapes the tensor-core kernels (cl/attend_bwd_mma.cl) take: q, k, v, do of one 16-bit
 * type, unpadded (16-byte rows), head dims in 32-wide chunks. Group sizes below, at and
 * above one 16-row tile (1, 3, 16, 20), several blocks per sequence, all branches, varlen
 * with an empty sequence, caller indices with holes and duplicates, and the production
 * head dims (128, BS 64). Wherever the context has a tensor-core path (NVIDIA, or
 * CLNSA_TUNE=MMA=2) these run on it; run as `test_backward tensor-cores` the test
 * requires that path. The compressed branch (g_cmp) runs on the tensor cores too with
 * bf16 (cl/attend_bwd_cmp_mma.cl) and portable with f16, the window branch portable, so
 * the cases mix them (G 1, 2, 3, 16; several blocks; the varlen case; D = 128 with two
 * blocks). With G <= 8 the selected dq runs kv-block-major (bwd_dq_selected_kvm_mma:
 * G 1, 2, 3, 4, 8 here, varlen, caller indices with duplicates), and the tensor-cores run
 * also takes the forward's kv-block-major kernels for G 3 and 4. Errors are held to 1e-2 (the
 * matrix-unit bound of the semantics) rather than bf16's 2e-2, which a dq off by 10%
 * still met. */
static void test_backward_tensor_cores(void **state) {
  (void)state;
  rng r = {harness_seed("backward tensor cores")};
  printf("# tensor-core path: %d\n", (int)clnsa_context_tensor_cores(ctx));
  static const bcase cases[] = {
      /* B  T  H  G cls S  W  nseq cu  gates   idx    padded dtype */
      {1, 70, 2, 16, 3, 3, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_BF16, 0, false},
      {2, 45, 2, 1, 3, 4, 7, 0, {0}, G_ALL, false, false, CLNSA_BF16, 0, false},
      {1, 50, 1, 3, 4, 3, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_F16, 0, false},
      {1, 61, 1, 3, 3, 3, 0, 0, {0}, G_CMP, false, false, CLNSA_BF16, 0, false},
      {1, 30, 1, 20, 4, 2, 0, 0, {0}, 0, false, false, CLNSA_F16, 0, false},
      {1, 0, 2, 2, 3, 3, 5, 4, {0, 5, 5, 46, 47}, G_ALL, false, false, CLNSA_BF16, 0, false},
      {1, 40, 2, 4, 4, 5, 0, 0, {0}, G_SLC, true, false, CLNSA_F16, 0, false},
      {1, 48, 1, 8, 3, 3, 0, 0, {0}, G_SLC, true, false, CLNSA_BF16, 0, false},
      {1, 130, 1, 16, 5, 2, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_BF16, 0, false},
      /* CLNSA_FLAG_CMP_16BIT: k_cmp, v_cmp in q's dtype, taken as they are by the
       * compressed dq and dk/dv (no hi/lo split; f16 reaches those kernels only this way) */
      {1, 70, 2, 16, 3, 3, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_BF16, 0, true},
      {1, 50, 1, 3, 4, 3, 0, 0, {0}, G_SLC | G_CMP, false, false, CLNSA_F16, 0, true},
  };
  tolerance_cap = 1e-2;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r);
  /* the kv-block-major dq in passes of 13 tokens (b TQ + t): pass ends inside mask words,
   * inside sequences, across the batch's and the varlen sequences' boundaries */
  problem pb;
  make_problem(&pb, &cases[1], NULL, &r);
  size_t whole = 0, part = 0;
  assert_int_equal(clnsa_backward_workspace_size(ctx, &pb.p, &pb.in, &whole), CLNSA_SUCCESS);
  harness_tune_extend("KVQ_PASS=13");
  assert_int_equal(clnsa_backward_workspace_size(ctx, &pb.p, &pb.in, &part), CLNSA_SUCCESS);
  printf("# backward workspace: %zu bytes, %zu with passes of 13 tokens\n", whole, part);
  /* on a tensor-core path the partials are reserved, for a pass at a time */
  if (clnsa_context_tensor_cores(ctx) != CLNSA_MMA_NONE)
    assert_true(part < whole);
  else
    assert_true(part == whole);
  free_problem(&pb);
  const size_t passes[] = {1, 5, 6, 7}; /* G = 1 with B = 2, varlen G = 2, G = 4, G = 8 */
  for (size_t i = 0; i < sizeof passes / sizeof passes[0]; i++) run_case(&cases[passes[i]], &r);
  harness_tune_teardown(NULL);
  tolerance_cap = 1.0;
}

/* ---- error paths: the status, and not one byte of any output changed ---- */
static void expect_refused(problem *pb, const clnsa_tensor *d_o, const clnsa_grads *g,
                           clnsa_status want) {
  size_t n1, n2;
  unsigned char *before = gradient_bytes(pb, &n1);
  cl_event ev = NULL;
  clnsa_status st = clnsa_backward(ctx, &pb->p, &pb->in, d_o, g, pb->ws, 0, NULL, &ev);
  printf("#   refused with %d: %s\n", (int)st, clnsa_last_message(ctx));
  assert_int_equal(st, want);
  assert_null(ev);
  clFinish(clnsa_context_queue(ctx));
  unsigned char *after = gradient_bytes(pb, &n2);
  assert_true(n1 == n2 && memcmp(before, after, n1) == 0);
  free(before), free(after);
}

static void test_errors(void **state) {
  (void)state;
  rng r = {harness_seed("backward errors")};
  const bcase bc = {1, 20, 1, 2, 0, 2, 4, 0, {0}, G_SLC | G_SWA, false, false, CLNSA_F32, 0, false};
  problem pb;
  make_problem(&pb, &bc, NULL, &r);
  run_forward(&pb);
  const ref_shape *s = &pb.s;

  /* d_o of the wrong shape */
  clnsa_tensor bad = pb.tdo.t;
  bad.shape[3] = s->DV - 1;
  expect_refused(&pb, &bad, &pb.grads, CLNSA_ERR_SHAPE_MISMATCH);
  /* dq of the wrong shape */
  clnsa_grads g = pb.grads;
  clnsa_tensor bad_dq = pb.dq.t;
  bad_dq.shape[2] = s->HQ + 1;
  g.dq = &bad_dq;
  expect_refused(&pb, &pb.tdo.t, &g, CLNSA_ERR_SHAPE_MISMATCH);
  /* a gate gradient for a gate that was not given */
  g = pb.grads;
  g.dg_cmp = &pb.dg[1].t;
  expect_refused(&pb, &pb.tdo.t, &g, CLNSA_ERR_INVALID_ARGUMENT);
  /* a workspace that holds a forward of another shape: longer tensors, or another window */
  bcase longer = bc;
  longer.T = 24;
  problem other;
  make_problem(&other, &longer, NULL, &r);
  other.ws = pb.ws;
  expect_refused(&other, &other.tdo.t, &other.grads, CLNSA_ERR_WORKSPACE);
  other.ws = NULL; /* pb's */
  free_problem(&other);
  pb.p.window = 3;
  expect_refused(&pb, &pb.tdo.t, &pb.grads, CLNSA_ERR_WORKSPACE);
  pb.p.window = s->W;
  /* a workspace with no forward in it */
  clnsa_workspace *fresh = NULL, *kept = pb.ws;
  size_t bytes = 0;
  clGetMemObjectInfo(pb.wsbuf, CL_MEM_SIZE, sizeof bytes, &bytes, NULL);
  assert_int_equal(clnsa_workspace_create(ctx, pb.wsbuf, 0, bytes, &fresh), CLNSA_SUCCESS);
  pb.ws = fresh;
  expect_refused(&pb, &pb.tdo.t, &pb.grads, CLNSA_ERR_WORKSPACE);
  pb.ws = kept;
  clnsa_workspace_destroy(fresh);
  /* the same arguments still work */
  assert_int_equal(run_backward(&pb), CLNSA_SUCCESS);
  free_problem(&pb);

  /* a workspace big enough for the forward only */
  make_problem(&pb, &bc, NULL, &r);
  size_t fwd = 0;
  assert_int_equal(clnsa_forward_workspace_size(ctx, &pb.p, &pb.in, &fwd), CLNSA_SUCCESS);
  cl_int err;
  pb.wsbuf = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE, fwd, NULL, &err);
  assert_int_equal(clnsa_workspace_create(ctx, pb.wsbuf, 0, fwd, &pb.ws), CLNSA_SUCCESS);
  assert_int_equal(clnsa_forward(ctx, &pb.p, &pb.in, &pb.to.t, pb.ws, 0, NULL, NULL),
                   CLNSA_SUCCESS);
  expect_refused(&pb, &pb.tdo.t, &pb.grads, CLNSA_ERR_WORKSPACE);
  free_problem(&pb);
}

/* A forward whose queries are only the last tokens (TQ < TK) has no backward. */
/* A forward with CLNSA_FLAG_CMP_16BIT keeps 16-bit k_cmp, v_cmp in the workspace: a
 * backward asked without the flag must refuse it (and one with it succeed). */
static void test_cmp16_mismatch(void **state) {
  (void)state;
  rng r = {harness_seed("backward cmp16 mismatch")};
  const bcase bc = {1, 20, 1, 2, 0, 2, 0, 0, {0}, G_CMP, false, false, CLNSA_BF16, 0, true};
  problem pb;
  make_problem(&pb, &bc, NULL, &r);
  run_forward(&pb);
  pb.p.flags = 0;
  expect_refused(&pb, &pb.tdo.t, &pb.grads, CLNSA_ERR_WORKSPACE);
  pb.p.flags = CLNSA_FLAG_CMP_16BIT;
  assert_int_equal(run_backward(&pb), CLNSA_SUCCESS);
  free_problem(&pb);
}

static void test_no_backward(void **state) {
  (void)state;
  rng r = {harness_seed("no backward")};
  const bcase bc = {1, 12, 1, 2, 0, 2, 3, 0, {0}, G_SLC | G_SWA, false, false, CLNSA_F32, 5, false};
  problem pb;
  make_problem(&pb, &bc, NULL, &r);
  run_forward(&pb);
  expect_refused(&pb, &pb.tdo.t, &pb.grads, CLNSA_ERR_NO_BACKWARD);
  free_problem(&pb);
}

int main(int argc, char **argv) {
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ctx = harness_context();
  if (harness_tensor_cores_mode(ctx, argc, argv)) {
    /* the forward kv-block-major for G = 3 and 4 (the default; kept so they stay covered) */
    harness_tune_append("KVM_MAX_G=4");
    const struct CMUnitTest only[] = {
        cmocka_unit_test_teardown(test_backward_tensor_cores, harness_tune_teardown)};
    int rc = cmocka_run_group_tests(only, NULL, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("# backward tensor cores: %.1f s\n",
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    clnsa_context_destroy(ctx);
    return rc;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_backward_fixed),   cmocka_unit_test(test_backward_random),
      cmocka_unit_test(test_unselected_block), cmocka_unit_test(test_block_selected_by_all),
      cmocka_unit_test(test_errors),           cmocka_unit_test(test_no_backward),
      cmocka_unit_test(test_cmp16_mismatch),
      cmocka_unit_test_teardown(test_backward_tensor_cores, harness_tune_teardown),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("# backward: %.1f s\n",
         (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
  clnsa_context_destroy(ctx);
  return rc;
}
