/* Every kernel once at tiny shapes, for Oclgrind (tests/oclgrind_check.sh runs this under
 * `oclgrind --data-races --uninitialized` and fails on any report). It also checks the
 * forward and backward against the float64 reference, so it is a test on any device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

static clnsa_context *ctx;

typedef struct tiny_case {
  int TQ, TK, HQ, H, DK, DV, BS, S, W;
  clnsa_dtype dt;
  bool varlen;
  size_t ws_off; /* bytes from the workspace buffer's start to the workspace */
} tiny_case;

static double *randn(rng *r, size_t n) {
  double *x = malloc(sizeof(double) * n);
  rng_fill(r, x, n, -1, 1);
  return x;
}

static void run_tiny(const tiny_case *tc, rng *r) {
  static const int cu[3] = {0, 4, 11};
  ref_shape s = {0};
  s.B = 1, s.TQ = tc->TQ, s.TK = tc->TK, s.HQ = tc->HQ, s.H = tc->H, s.DK = tc->DK;
  s.DV = tc->DV, s.BS = tc->BS, s.S = tc->S, s.W = tc->W, s.scale = 1.0 / sqrt((double)tc->DK);
  if (tc->varlen) s.nseq = 2, s.cu_q = s.cu_k = cu;
  clnsa_params p = clnsa_params_default();
  p.block_size = tc->BS, p.block_count = tc->S, p.window = tc->W;
  clnsa_seqs *seqs = NULL;
  if (tc->varlen) assert_int_equal(clnsa_seqs_create(ctx, &p, 2, cu, NULL, &seqs), 0);

  size_t nq = (size_t)s.TQ * s.HQ * s.DK, nk = (size_t)s.TK * s.H * s.DK;
  size_t nv = (size_t)s.TK * s.H * s.DV, no = (size_t)s.TQ * s.HQ * s.DV, ng = (size_t)s.TQ * s.HQ;
  double *q = randn(r, nq), *k = randn(r, nk), *v = randn(r, nv), *gc = randn(r, ng);
  double *gs = randn(r, ng), *gw = randn(r, ng), *dout = randn(r, no);
  int64_t sq[4] = {1, s.TQ, s.HQ, s.DK}, sk[4] = {1, s.TK, s.H, s.DK};
  int64_t sv[4] = {1, s.TK, s.H, s.DV}, so[4] = {1, s.TQ, s.HQ, s.DV}, sg[3] = {1, s.TQ, s.HQ};
  dev_tensor dq_in = dev_upload(ctx, tc->dt, 4, sq, q, false);
  dev_tensor dk_in = dev_upload(ctx, tc->dt, 4, sk, k, false);
  dev_tensor dv_in = dev_upload(ctx, tc->dt, 4, sv, v, false);
  dev_tensor dgc = dev_upload(ctx, tc->dt, 3, sg, gc, false);
  dev_tensor dgs = dev_upload(ctx, tc->dt, 3, sg, gs, false);
  dev_tensor dgw = dev_upload(ctx, tc->dt, 3, sg, gw, false);
  dev_tensor ddo = dev_upload(ctx, tc->dt, 4, so, dout, false);
  dev_tensor o = dev_output(ctx, tc->dt, 4, so, false);
  dev_tensor gq = dev_output(ctx, tc->dt, 4, sq, false), gk = dev_output(ctx, tc->dt, 4, sk, false);
  dev_tensor gv = dev_output(ctx, tc->dt, 4, sv, false);
  dev_tensor ggc = dev_output(ctx, tc->dt, 3, sg, false), ggs = dev_output(ctx, tc->dt, 3, sg, false);
  dev_tensor ggw = dev_output(ctx, tc->dt, 3, sg, false);

  clnsa_inputs in = {.q = &dq_in.t, .k = &dk_in.t, .v = &dv_in.t, .g_cmp = &dgc.t,
                     .g_slc = &dgs.t, .g_swa = &dgw.t, .seqs = seqs};
  size_t bytes;
  assert_int_equal(clnsa_backward_workspace_size(ctx, &p, &in, &bytes), 0);
  cl_int err;
  const size_t wbytes = bytes + tc->ws_off;
  cl_mem wbuf = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE, wbytes, NULL, &err);
  assert_int_equal(err, CL_SUCCESS);
  const cl_uint poison = 0x7fc00001u; /* a NaN: nothing may read what nothing wrote */
  assert_int_equal(clEnqueueFillBuffer(clnsa_context_queue(ctx), wbuf, &poison, sizeof poison, 0,
                                       wbytes, 0, NULL, NULL),
                   CL_SUCCESS);
  clnsa_workspace *ws;
  assert_int_equal(clnsa_workspace_create(ctx, wbuf, tc->ws_off, bytes, &ws), 0);
  clnsa_status st = clnsa_forward(ctx, &p, &in, &o.t, ws, 0, NULL, NULL);
  if (st) printf("# %s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  clnsa_grads g = {&gq.t, &gk.t, &gv.t, &ggc.t, &ggs.t, &ggw.t};
  st = clnsa_backward(ctx, &p, &in, &ddo.t, &g, ws, 0, NULL, NULL);
  if (st) printf("# %s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);

  double *ro = malloc(sizeof(double) * no), *rq = malloc(sizeof(double) * nq);
  double *rk = malloc(sizeof(double) * nk), *rv = malloc(sizeof(double) * nv);
  double *rgc = malloc(sizeof(double) * ng), *rgs = malloc(sizeof(double) * ng);
  double *rgw = malloc(sizeof(double) * ng);
  ref_inputs ri = {q, k, v, gc, gs, gw, NULL};
  ref_forward(&s, &ri, ro, &(ref_saved){0});
  ref_grads rg = {rq, rk, rv, rgc, rgs, rgw};
  ref_backward(&s, &ri, dout, &rg);
  double tol = dtype_tolerance(tc->dt);
  double e[7] = {rel_error(dev_download(ctx, &o), ro, no), rel_error(dev_download(ctx, &gq), rq, nq),
                 rel_error(dev_download(ctx, &gk), rk, nk), rel_error(dev_download(ctx, &gv), rv, nv),
                 rel_error(dev_download(ctx, &ggc), rgc, ng), rel_error(dev_download(ctx, &ggs), rgs, ng),
                 rel_error(dev_download(ctx, &ggw), rgw, ng)};
  printf(
      "# tiny %s TQ=%d G=%d DK=%d DV=%d varlen=%d ws+%zu: o %.1e dq %.1e dk %.1e dv %.1e "
      "dg %.1e %.1e %.1e\n",
      dtype_label(tc->dt), s.TQ, s.HQ / s.H, s.DK, s.DV, tc->varlen, tc->ws_off, e[0], e[1], e[2],
      e[3], e[4], e[5], e[6]);
  for (int i = 0; i < 7; i++) assert_true(e[i] < tol);

  clnsa_workspace_destroy(ws);
  clReleaseMemObject(wbuf);
  dev_tensor *all[] = {&dq_in, &dk_in, &dv_in, &dgc, &dgs, &dgw, &ddo, &o, &gq, &gk, &gv, &ggc, &ggs, &ggw};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dev_free(all[i]);
  free(q), free(k), free(v), free(gc), free(gs), free(gw), free(dout);
  free(ro), free(rq), free(rk), free(rv), free(rgc), free(rgs), free(rgw);
  clnsa_seqs_destroy(seqs);
}

/* Each stage alone on host-written inputs (what Oclgrind's uninitialized-value check can
 * follow: it does not carry initialization from one kernel to the next). */
static void test_stages(void **state) {
  (void)state;
  rng r = {harness_seed("tiny-stages")};
  ref_shape s = {0};
  s.B = 1, s.TQ = s.TK = 13, s.HQ = 6, s.H = 2, s.DK = 8, s.DV = 4, s.BS = 4, s.S = 3, s.W = 5;
  s.scale = 1.0 / sqrt(8.0);
  const int NB = 4;
  size_t nq = 13 * 6 * 8, nk = 13 * 2 * 8, nv = 13 * 2 * 4, no = 13 * 6 * 4, nr = 13 * 6;
  size_t nkc = NB * 2 * 8, nvc = NB * 2 * 4, ni = 13 * 2 * 3;
  double *q = randn(&r, nq), *k = randn(&r, nk), *v = randn(&r, nv);
  for (size_t i = 0; i < nq; i++) q[i] *= 3; /* well separated importances */
  double *kc = malloc(sizeof(double) * nkc), *vc = malloc(sizeof(double) * nvc);
  double *ro = malloc(sizeof(double) * no), *rl = malloc(sizeof(double) * nr);
  int *idx = malloc(sizeof(int) * ni);
  int64_t sq[4] = {1, 13, 6, 8}, sk[4] = {1, 13, 2, 8}, sv[4] = {1, 13, 2, 4};
  int64_t skc[4] = {1, NB, 2, 8}, svc[4] = {1, NB, 2, 4}, so[4] = {1, 13, 6, 4};
  int64_t sl[3] = {1, 13, 6}, si[4] = {1, 13, 2, 3};
  clnsa_params p = clnsa_params_default();
  p.block_size = 4, p.block_count = 3, p.window = 5;
  dev_tensor dq = dev_upload(ctx, CLNSA_F32, 4, sq, q, false);
  dev_tensor dk = dev_upload(ctx, CLNSA_BF16, 4, sk, k, false);
  dev_tensor dv = dev_upload(ctx, CLNSA_F16, 4, sv, v, false);
  ref_pool(&s, k, v, kc, vc);
  dev_tensor dkc = dev_upload(ctx, CLNSA_F32, 4, skc, kc, false);
  dev_tensor dvc = dev_upload(ctx, CLNSA_F32, 4, svc, vc, false);
  dev_tensor okc = dev_output(ctx, CLNSA_F32, 4, skc, false), ovc = dev_output(ctx, CLNSA_F32, 4, svc, false);
  assert_int_equal(clnsa_pool(ctx, &p, NULL, &dk.t, &dv.t, &okc.t, &ovc.t, 0, NULL, NULL), 0);
  assert_true(rel_error(dev_download(ctx, &okc), kc, nkc) < 1e-6);

  dev_tensor o = dev_output(ctx, CLNSA_F32, 4, so, false), lse = dev_output(ctx, CLNSA_F32, 3, sl, false);
  assert_int_equal(clnsa_compressed_attention(ctx, &p, NULL, &dq.t, &dkc.t, &dvc.t, &o.t, &lse.t,
                                              0, NULL, NULL), 0);
  ref_compressed(&s, q, kc, vc, ro, rl);
  assert_true(rel_error(dev_download(ctx, &o), ro, no) < 1e-5);
  dev_tensor dl = dev_upload(ctx, CLNSA_F32, 3, sl, rl, false);
  dev_tensor di = dev_output(ctx, CLNSA_I32, 4, si, false);
  assert_int_equal(clnsa_topk(ctx, &p, NULL, &dq.t, &dkc.t, &dl.t, NULL, &di.t, 0, NULL, NULL), 0);
  int *got = dev_download_int(ctx, &di);
  ref_topk(&s, q, kc, rl, idx);
  for (size_t i = 0; i < ni; i++) assert_int_equal(got[i], idx[i]);

  dev_tensor gi = dev_upload_int(ctx, 4, si, idx);
  assert_int_equal(clnsa_selected_attention(ctx, &p, NULL, &dq.t, &dk.t, &dv.t, &gi.t, &o.t,
                                            &lse.t, 0, NULL, NULL), 0);
  ref_selected(&s, q, k, v, idx, ro, rl);
  assert_true(rel_error(dev_download(ctx, &o), ro, no) < 1e-5);
  assert_int_equal(clnsa_window_attention(ctx, &p, NULL, &dq.t, &dk.t, &dv.t, &o.t, &lse.t, 0,
                                          NULL, NULL), 0);
  ref_window(&s, q, k, v, ro, rl);
  assert_true(rel_error(dev_download(ctx, &o), ro, no) < 1e-5);
  printf("# tiny stages: pool, compressed, top-k, selected, window match the reference\n");

  dev_tensor *all[] = {&dq, &dk, &dv, &dkc, &dvc, &okc, &ovc, &o, &lse, &dl, &di, &gi};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dev_free(all[i]);
  free(q), free(k), free(v), free(kc), free(vc), free(ro), free(rl), free(idx), free(got);
}

static void test_tiny(void **state) {
  (void)state;
  rng r = {harness_seed("tiny")};
  const tiny_case cases[] = {
      {11, 11, 4, 2, 8, 4, 4, 2, 3, CLNSA_F32, false, 0},
      {11, 11, 3, 1, 8, 8, 4, 3, 5, CLNSA_BF16, true, 0},
      {9, 9, 2, 2, 4, 8, 4, 2, 2, CLNSA_F16, false, 0},
      /* the scalar walks of the row kernels (combine, gate grads, finalize): head dims
       * that are no multiple of 4, and a workspace 4 bytes past an aligned start */
      {9, 9, 2, 1, 6, 10, 4, 2, 3, CLNSA_BF16, false, 0},
      {11, 11, 4, 2, 8, 8, 4, 2, 3, CLNSA_F16, true, 4},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_tiny(&cases[i], &r);
}

/* argv[1]: "stages" (each stage alone), "chain" (forward + backward), or both when absent. */
int main(int argc, char **argv) {
  ctx = harness_context();
  const char *only = argc > 1 ? argv[1] : "";
  const struct CMUnitTest stages[] = {cmocka_unit_test(test_stages)};
  const struct CMUnitTest chain[] = {cmocka_unit_test(test_tiny)};
  int rc = 0;
  if (strcmp(only, "chain") != 0) rc |= cmocka_run_group_tests(stages, NULL, NULL);
  if (strcmp(only, "stages") != 0) rc |= cmocka_run_group_tests(chain, NULL, NULL);
  clnsa_context_destroy(ctx);
  return rc;
}
