/* Mean pooling on the device against the float64 reference. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

static clnsa_context *ctx;

typedef struct pool_case {
  int B, TK, H, DK, DV, BS;
  int nseq;
  int cu[6];
} pool_case;

static void run_case(const pool_case *pc, clnsa_dtype dt, bool padded, rng *r) {
  ref_shape s = {0};
  s.B = pc->B, s.TK = s.TQ = pc->TK, s.H = s.HQ = pc->H, s.DK = pc->DK, s.DV = pc->DV;
  s.BS = pc->BS, s.S = 1, s.nseq = pc->nseq, s.cu_q = s.cu_k = pc->cu;
  clnsa_params p = clnsa_params_default();
  p.block_size = pc->BS;
  clnsa_seqs *seqs = NULL;
  if (pc->nseq) assert_int_equal(clnsa_seqs_create(ctx, &p, pc->nseq, pc->cu, NULL, &seqs), 0);
  int nb = ref_num_cmp(&s);
  size_t nk = (size_t)s.B * s.TK * s.H * s.DK, nv = (size_t)s.B * s.TK * s.H * s.DV;
  double *k = malloc(sizeof(double) * (nk + 1)), *v = malloc(sizeof(double) * (nv + 1));
  rng_fill(r, k, nk, -1, 1);
  rng_fill(r, v, nv, -1, 1);
  int64_t shk[4] = {s.B, s.TK, s.H, s.DK}, shv[4] = {s.B, s.TK, s.H, s.DV};
  int64_t shkc[4] = {s.B, nb, s.H, s.DK}, shvc[4] = {s.B, nb, s.H, s.DV};
  dev_tensor dk = dev_upload(ctx, dt, 4, shk, k, padded), dv = dev_upload(ctx, dt, 4, shv, v, false);
  dev_tensor kc = dev_output(ctx, dt, 4, shkc, padded), vc = dev_output(ctx, CLNSA_F32, 4, shvc, false);
  size_t nkc = (size_t)s.B * nb * s.H * s.DK, nvc = (size_t)s.B * nb * s.H * s.DV;
  double *rk = malloc(sizeof(double) * (nkc + 1)), *rv = malloc(sizeof(double) * (nvc + 1));
  ref_pool(&s, k, v, rk, rv);
  cl_event ev;
  clnsa_status st = clnsa_pool(ctx, &p, seqs, &dk.t, &dv.t, &kc.t, &vc.t, 0, NULL, &ev);
  if (st) printf("%s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  clWaitForEvents(1, &ev);
  clReleaseEvent(ev);
  double ek = rel_error(dev_download(ctx, &kc), rk, nkc);
  double ev2 = rel_error(dev_download(ctx, &vc), rv, nvc);
  /* k_cmp stored in dt adds one rounding; v_cmp is f32 output. */
  printf("# pool B=%d TK=%d H=%d DK=%d DV=%d BS=%d nseq=%d %s: k %.2e v %.2e\n", s.B, s.TK, s.H,
         s.DK, s.DV, s.BS, s.nseq, dtype_label(dt), ek, ev2);
  assert_true(ek < dtype_tolerance(dt));
  assert_true(ev2 < 1e-6);
  dev_free(&dk), dev_free(&dv), dev_free(&kc), dev_free(&vc);
  free(k), free(v), free(rk), free(rv);
  clnsa_seqs_destroy(seqs);
}

static void test_pool_sweep(void **state) {
  (void)state;
  rng r = {harness_seed("pool")};
  const pool_case cases[] = {
      {1, 64, 1, 16, 16, 16, 0, {0}},   {2, 37, 3, 60, 24, 8, 0, {0}},
      {1, 7, 2, 32, 32, 8, 0, {0}},     {1, 15, 1, 100, 8, 16, 0, {0}},
      {1, 40, 2, 16, 12, 8, 4, {0, 17, 17, 18, 40}},
  };
  const clnsa_dtype dts[] = {CLNSA_F32, CLNSA_F16, CLNSA_BF16};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    for (int d = 0; d < 3; d++) run_case(&cases[i], dts[d], (i + d) % 2 == 1, &r);
}

int main(void) {
  ctx = harness_context();
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_pool_sweep)};
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  clnsa_context_destroy(ctx);
  return rc;
}
