/* No global mutable state: two contexts (own OpenCL context and queue each) driven from
 * two threads at once, each running the whole forward on its own inputs, must both match
 * the reference. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

typedef struct job {
  uint64_t seed;
  int G;
  double error;
  clnsa_status status;
} job;

static void *run_job(void *arg) {
  job *j = arg;
  clnsa_context *ctx = harness_context();
  rng r = {j->seed};
  ref_shape s = {0};
  s.B = 1, s.TQ = s.TK = 47, s.H = 2, s.HQ = 2 * j->G, s.DK = 16, s.DV = 8, s.BS = 8, s.S = 3;
  s.scale = 0.25;
  size_t nq = (size_t)47 * s.HQ * 16, nk = 47 * 2 * 16, nv = 47 * 2 * 8, no = (size_t)47 * s.HQ * 8;
  double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nk);
  double *v = malloc(sizeof(double) * nv), *ro = malloc(sizeof(double) * no);
  rng_fill(&r, q, nq, -3, 3);
  rng_fill(&r, k, nk, -1, 1);
  rng_fill(&r, v, nv, -1, 1);
  int64_t sq[4] = {1, 47, s.HQ, 16}, sk[4] = {1, 47, 2, 16}, sv[4] = {1, 47, 2, 8};
  int64_t so[4] = {1, 47, s.HQ, 8};
  dev_tensor dq = dev_upload(ctx, CLNSA_F32, 4, sq, q, false);
  dev_tensor dk = dev_upload(ctx, CLNSA_F32, 4, sk, k, false);
  dev_tensor dv = dev_upload(ctx, CLNSA_F32, 4, sv, v, false);
  dev_tensor o = dev_output(ctx, CLNSA_F32, 4, so, false);
  clnsa_params p = clnsa_params_default();
  p.block_size = 8, p.block_count = 3, p.scale = 0.25f;
  clnsa_inputs in = {.q = &dq.t, .k = &dk.t, .v = &dv.t};
  size_t bytes = 0;
  clnsa_workspace *ws = NULL;
  cl_mem buf = NULL;
  j->status = clnsa_forward_workspace_size(ctx, &p, &in, &bytes);
  if (j->status == CLNSA_SUCCESS) {
    buf = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE, bytes, NULL, NULL);
    j->status = clnsa_workspace_create(ctx, buf, 0, bytes, &ws);
  }
  if (j->status == CLNSA_SUCCESS) j->status = clnsa_forward(ctx, &p, &in, &o.t, ws, 0, NULL, NULL);
  if (j->status == CLNSA_SUCCESS) {
    ref_inputs ri = {q, k, v, NULL, NULL, NULL, NULL};
    ref_forward(&s, &ri, ro, &(ref_saved){0});
    j->error = rel_error(dev_download(ctx, &o), ro, no);
  }
  clnsa_workspace_destroy(ws);
  if (buf) clReleaseMemObject(buf);
  dev_free(&dq), dev_free(&dk), dev_free(&dv), dev_free(&o);
  free(q), free(k), free(v), free(ro);
  clnsa_context_destroy(ctx);
  return NULL;
}

static void test_two_threads(void **state) {
  (void)state;
  uint64_t seed = harness_seed("threads");
  job jobs[2] = {{seed, 1, INFINITY, CLNSA_SUCCESS}, {seed + 1, 3, INFINITY, CLNSA_SUCCESS}};
  pthread_t t[2];
  for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&t[i], NULL, run_job, &jobs[i]), 0);
  for (int i = 0; i < 2; i++) assert_int_equal(pthread_join(t[i], NULL), 0);
  for (int i = 0; i < 2; i++) {
    printf("# thread %d (G=%d): %s, error %.2e\n", i, jobs[i].G,
           clnsa_status_string(jobs[i].status), jobs[i].error);
    assert_int_equal(jobs[i].status, CLNSA_SUCCESS);
    assert_true(jobs[i].error < 1e-5);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_two_threads)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
