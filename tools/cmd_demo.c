/* `clnsa demo`: the library's main job on one device. Random inputs of a realistic
 * shape, the full NSA forward timed against dense causal attention on the same device,
 * and a check of a slice of the output against the float64 host forward (host_check.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define PROG "clnsa demo"
#define DEMO_HQ 16
#define DEMO_H 1
#define DEMO_D 64
#define DEMO_BS 64
#define DEMO_S 16
#define SEED 20250218u
#define CHECK_ROWS 64 /* the last CHECK_ROWS queries are checked, all heads */

void usage_demo(FILE *f) {
  fprintf(f,
          "usage: clnsa demo [--device SPEC] [--seq N] [--dtype f32|f16|bf16]\n\n"
          "Runs the NSA forward on random inputs (B=1, HQ=%d, H=%d, D=%d, block size %d,\n"
          "%d selected blocks, no window, sigmoid gates), times it against dense causal\n"
          "attention on the same device (median of several runs, OpenCL event profiling),\n"
          "and checks the last %d queries against a float64 host implementation.\n\n"
          "  --device SPEC  device index or name part (see `clnsa devices`)\n"
          "  --seq N        tokens T (default 4096 on a GPU, 2048 elsewhere)\n"
          "  --dtype D      storage type of q, k, v, gates and o (f32)\n\n"
          "Exit status 1 when the check fails (tolerance: f32 1e-5, f16 5e-3, bf16 2e-2).\n",
          DEMO_HQ, DEMO_H, DEMO_D, DEMO_BS, DEMO_S, CHECK_ROWS);
}

/* ------------------------------------------------------------------------- */
/* Inputs                                                                      */
/* ------------------------------------------------------------------------- */
static double uniform(uint64_t *s, double lo, double hi) { /* splitmix64 */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return lo + (hi - lo) * (double)(z >> 11) * 0x1p-53;
}

typedef struct demo_data {
  int T;
  float *q, *k, *v, *g_cmp, *g_slc; /* host copies, rounded to the storage type */
} demo_data;

/* Keys get a per-block offset, as real keys have locality: pooled keys then differ and
 * the top-k has a clear answer instead of near-ties among nearly equal means. */
static bool make_inputs(demo_data *x, int T, clnsa_dtype dt) {
  size_t nq = (size_t)T * DEMO_HQ * DEMO_D, nk = (size_t)T * DEMO_H * DEMO_D,
         ng = (size_t)T * DEMO_HQ;
  x->T = T;
  x->q = malloc(nq * sizeof(float));
  x->k = malloc(nk * sizeof(float));
  x->v = malloc(nk * sizeof(float));
  x->g_cmp = malloc(ng * sizeof(float));
  x->g_slc = malloc(ng * sizeof(float));
  if (!x->q || !x->k || !x->v || !x->g_cmp || !x->g_slc) return false;
  uint64_t s = SEED;
  float bias[DEMO_H * DEMO_D];
  for (size_t i = 0; i < nq; i++) x->q[i] = cli_round_to(dt, (float)uniform(&s, -1, 1));
  for (size_t i = 0; i < nk; i++) {
    if (i % ((size_t)DEMO_BS * DEMO_H * DEMO_D) == 0)
      for (int j = 0; j < DEMO_H * DEMO_D; j++) bias[j] = (float)uniform(&s, -1, 1);
    x->k[i] = cli_round_to(dt, (float)(0.5 * uniform(&s, -1, 1)) + bias[i % (DEMO_H * DEMO_D)]);
    x->v[i] = cli_round_to(dt, (float)uniform(&s, -1, 1));
  }
  for (size_t i = 0; i < ng; i++) {
    x->g_cmp[i] = cli_round_to(dt, (float)(1 / (1 + exp(-uniform(&s, -3, 3)))));
    x->g_slc[i] = cli_round_to(dt, (float)(1 / (1 + exp(-uniform(&s, -3, 3)))));
  }
  return true;
}

static void free_inputs(demo_data *x) {
  free(x->q);
  free(x->k);
  free(x->v);
  free(x->g_cmp);
  free(x->g_slc);
}

/* ------------------------------------------------------------------------- */
/* Timing                                                                      */
/* ------------------------------------------------------------------------- */
typedef struct pass {
  const char *what;
  clnsa_context *ctx;
  const clnsa_params *params;
  const clnsa_inputs *in;
  const clnsa_tensor *o;
  clnsa_workspace *ws; /* NULL: the dense pass (window attention) */
  cl_mem stamp;        /* a small buffer whose fill marks the start of a run */
} pass;

static clnsa_status enqueue(const pass *p, cl_event *ev) {
  if (p->ws) return clnsa_forward(p->ctx, p->params, p->in, p->o, p->ws, 0, NULL, ev);
  return clnsa_window_attention(p->ctx, p->params, p->in->seqs, p->in->q, p->in->k, p->in->v, p->o,
                                NULL, 0, NULL, ev);
}

static double wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Device time of one pass: from the end of a tiny buffer fill enqueued just before it to
 * the end of its last command (the queue is in order). A fill rather than a marker: some
 * drivers stamp markers on the host clock. Falls back to the host clock if profiling fails. */
static clnsa_status time_once(const pass *p, double *ms, bool *profiled) {
  cl_command_queue queue = clnsa_context_queue(p->ctx);
  cl_event start = NULL, end = NULL;
  const cl_uint zero = 0;
  double t0 = wall_ms();
  cl_int err =
      clEnqueueFillBuffer(queue, p->stamp, &zero, sizeof zero, 0, sizeof zero, 0, NULL, &start);
  clnsa_status st = enqueue(p, &end);
  if (st == CLNSA_SUCCESS) err = clWaitForEvents(1, &end);
  double t1 = wall_ms();
  cl_ulong a = 0, b = 0;
  *profiled =
      err == CL_SUCCESS && st == CLNSA_SUCCESS && start &&
      clGetEventProfilingInfo(start, CL_PROFILING_COMMAND_END, sizeof a, &a, NULL) == CL_SUCCESS &&
      clGetEventProfilingInfo(end, CL_PROFILING_COMMAND_END, sizeof b, &b, NULL) == CL_SUCCESS &&
      b > a;
  *ms = *profiled ? (double)(b - a) * 1e-6 : t1 - t0;
  if (start) clReleaseEvent(start);
  if (end) clReleaseEvent(end);
  if (st == CLNSA_SUCCESS && err != CL_SUCCESS) {
    fprintf(stderr, PROG ": %s: %s: the device returned %d\n", p->what,
            clnsa_status_string(CLNSA_ERR_OPENCL), (int)err);
    return CLNSA_ERR_OPENCL;
  }
  return st;
}

typedef struct timing {
  double first_ms; /* the first call, kernel builds (or cache loads) included */
  double median_ms;
  int runs;
  bool profiled;
} timing;

static bool time_pass(const pass *p, int runs, timing *t) {
  double ms[32], t0 = wall_ms();
  bool profiled = true, one;
  clnsa_status st = time_once(p, &ms[0], &one); /* warm-up */
  t->first_ms = wall_ms() - t0;
  for (int r = 0; r < runs && st == CLNSA_SUCCESS; r++) {
    st = time_once(p, &ms[r], &one);
    profiled &= one;
  }
  if (st != CLNSA_SUCCESS) {
    cli_report(p->ws ? PROG " (NSA forward)" : PROG " (dense attention)", p->ctx, st);
    return false;
  }
  qsort(ms, (size_t)runs, sizeof ms[0], cmp_double);
  t->median_ms = runs % 2 ? ms[runs / 2] : 0.5 * (ms[runs / 2 - 1] + ms[runs / 2]);
  t->runs = runs;
  t->profiled = profiled;
  return true;
}

/* ------------------------------------------------------------------------- */
/* Check                                                                       */
/* ------------------------------------------------------------------------- */
typedef struct check {
  int rows, selections, same, near_ties, wrong;
  double rel_err;
} check;

/* Compares the device's o and block indices on the last rows against the host forward.
 * o is recomputed on the device's own selection so that a near tie resolved the other
 * way (possible in f16/bf16) shows up as such, not as an output error. */
static bool check_slice(const demo_data *x, clnsa_dtype dt, const float *o, const int32_t *idx,
                        check *c) {
  host_problem P = {.T = x->T,
                    .HQ = DEMO_HQ,
                    .H = DEMO_H,
                    .D = DEMO_D,
                    .BS = DEMO_BS,
                    .S = DEMO_S,
                    .scale = 1 / sqrt((double)DEMO_D),
                    .q = x->q,
                    .k = x->k,
                    .v = x->v,
                    .g_cmp = x->g_cmp,
                    .g_slc = x->g_slc};
  host_nsa h;
  double *imp = malloc(((size_t)x->T / DEMO_BS + 1) * sizeof(double));
  if (!imp || !host_nsa_init(&h, &P)) {
    free(imp);
    return false;
  }
  memset(c, 0, sizeof *c);
  c->rows = x->T < CHECK_ROWS ? x->T : CHECK_ROWS;
  double err2 = 0, ref2 = 0, ref[DEMO_D];
  int sel[DEMO_S];
  for (int p = x->T - c->rows; p < x->T; p++)
    for (int kh = 0; kh < DEMO_H; kh++) {
      const int32_t *dev = idx + ((size_t)p * DEMO_H + kh) * DEMO_S;
      host_select(&h, p, kh, sel, imp);
      int verdict = host_compare_selection(&h, p, dev, sel, imp, cli_dtype_tolerance(dt));
      c->selections++;
      c->same += verdict == 0;
      c->near_ties += verdict == 1;
      c->wrong += verdict < 0;
      for (int g = 0; g < DEMO_HQ / DEMO_H; g++) {
        int hq = kh * (DEMO_HQ / DEMO_H) + g;
        host_output(&h, p, hq, verdict < 0 ? sel : dev, ref);
        for (int d = 0; d < DEMO_D; d++) {
          double e = o[((size_t)p * DEMO_HQ + hq) * DEMO_D + d] - ref[d];
          err2 += e * e;
          ref2 += ref[d] * ref[d];
        }
      }
    }
  c->rel_err = isnan(err2) ? INFINITY : sqrt(err2) / sqrt(ref2);
  host_nsa_free(&h);
  free(imp);
  return true;
}

/* ------------------------------------------------------------------------- */
/* The demo                                                                    */
/* ------------------------------------------------------------------------- */
typedef struct demo_options {
  const char *device;
  int seq;
  clnsa_dtype dtype;
} demo_options;

static int parse_options(int argc, char **argv, demo_options *o) {
  *o = (demo_options){NULL, 0, CLNSA_F32};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage_demo(stdout);
      return 0;
    }
    bool ok = v != NULL;
    if (strcmp(a, "--device") == 0)
      o->device = v;
    else if (strcmp(a, "--seq") == 0)
      ok = ok && cli_parse_int(v, 1, 1 << 24, &o->seq);
    else if (strcmp(a, "--dtype") == 0)
      ok = ok && cli_parse_dtype(v, &o->dtype);
    else {
      fprintf(stderr, PROG ": unknown option '%s'\n\n", a);
      usage_demo(stderr);
      return CLI_EXIT_USAGE;
    }
    if (!ok) {
      if (v)
        fprintf(stderr, PROG ": %s: invalid value '%s'\n\n", a, v);
      else
        fprintf(stderr, PROG ": %s needs a value\n\n", a);
      usage_demo(stderr);
      return CLI_EXIT_USAGE;
    }
    i++;
  }
  return -1;
}

typedef struct demo_state {
  clnsa_context *ctx;
  demo_data x;
  cl_mem buf[10]; /* released at the end */
  int nbuf;
  clnsa_workspace *ws;
  float *o;
  int32_t *idx;
} demo_state;

static cl_mem keep(demo_state *s, cl_mem m) {
  if (m && s->nbuf == (int)(sizeof s->buf / sizeof s->buf[0])) abort(); /* a bug here */
  if (m) s->buf[s->nbuf++] = m;
  return m;
}

static void print_report(const demo_state *s, clnsa_dtype dt, const timing *nsa,
                         const timing *dense, const check *c, bool pass) {
  cl_device_id dev = clnsa_context_device(s->ctx);
  char name[256] = "?", driver[128] = "?", pname[256] = "?";
  cl_platform_id plat = NULL;
  cl_device_type type = 0;
  clGetDeviceInfo(dev, CL_DEVICE_NAME, sizeof name - 1, name, NULL);
  clGetDeviceInfo(dev, CL_DRIVER_VERSION, sizeof driver - 1, driver, NULL);
  clGetDeviceInfo(dev, CL_DEVICE_TYPE, sizeof type, &type, NULL);
  if (clGetDeviceInfo(dev, CL_DEVICE_PLATFORM, sizeof plat, &plat, NULL) == CL_SUCCESS)
    clGetPlatformInfo(plat, CL_PLATFORM_NAME, sizeof pname - 1, pname, NULL);
  const char *how = nsa->profiled && dense->profiled ? "OpenCL event profiling" : "host clock";
  int T = s->x.T;
  printf("clnsa %s demo: Native Sparse Attention forward\n", CLNSA_VERSION_STRING);
  const char *kind = type & CL_DEVICE_TYPE_GPU   ? "GPU"
                     : type & CL_DEVICE_TYPE_CPU ? "CPU"
                                                 : "other";
  printf("  device     %s / %s (%s, driver %s)\n", pname, name, kind, driver);
  printf("  shape      B=1 T=%d HQ=%d H=%d (G=%d) D=%d; block size %d, %d blocks, window 0\n", T,
         DEMO_HQ, DEMO_H, DEMO_HQ / DEMO_H, DEMO_D, DEMO_BS, DEMO_S);
  printf("  inputs     %s storage, uniform random (seed %u), sigmoid gates g_cmp g_slc\n",
         cli_dtype_name(dt), SEED);
  printf("  NSA        %10.3f ms  forward: pool, compressed, top-k, selected, gates\n",
         nsa->median_ms);
  printf("  dense      %10.3f ms  causal attention (clnsa_window_attention, W = T)\n",
         dense->median_ms);
  printf("  speedup    %10.2fx   median of %d runs each, %s\n", dense->median_ms / nsa->median_ms,
         nsa->runs, how);
  printf("  first call %6.1f s, %.1f s  NSA, dense; kernel builds or cache loads included\n",
         nsa->first_ms * 1e-3, dense->first_ms * 1e-3);
  if (T <= DEMO_S * DEMO_BS)
    printf(
        "  note       T <= %d: the selected blocks cover every past token, so NSA does\n"
        "             no less work than dense attention; its gain grows with T\n",
        DEMO_S * DEMO_BS);
  printf("  check      last %d queries x %d heads against a float64 host NSA forward\n", c->rows,
         DEMO_HQ);
  printf("  selection  %d of %d block sets identical, %d near ties, %d wrong\n", c->same,
         c->selections, c->near_ties, c->wrong);
  printf("  rel error  %.3e  (tolerance %.0e)\n", c->rel_err, cli_dtype_tolerance(dt));
  printf("  result     %s\n", pass ? "PASS" : "FAIL");
}

static int demo(const demo_options *o, demo_state *s) {
  if (!(s->ctx = cli_open_context(PROG, o->device))) return CLI_EXIT_FAIL;
  cl_device_type type = 0;
  clGetDeviceInfo(clnsa_context_device(s->ctx), CL_DEVICE_TYPE, sizeof type, &type, NULL);
  bool gpu = (type & CL_DEVICE_TYPE_GPU) != 0;
  int T = o->seq ? o->seq : gpu ? 4096 : 2048, runs = gpu ? 10 : 3;
  clnsa_dtype dt = o->dtype;
  if (!make_inputs(&s->x, T, dt)) {
    fprintf(stderr, PROG ": %s\n", clnsa_status_string(CLNSA_ERR_OUT_OF_HOST_MEMORY));
    return CLI_EXIT_FAIL;
  }
  size_t nq = (size_t)T * DEMO_HQ * DEMO_D, nk = (size_t)T * DEMO_H * DEMO_D,
         ng = (size_t)T * DEMO_HQ;
  int64_t sq[4] = {1, T, DEMO_HQ, DEMO_D}, sk[4] = {1, T, DEMO_H, DEMO_D}, sg[3] = {1, T, DEMO_HQ};
  size_t esize = clnsa_dtype_size(dt);
  cl_mem bq = keep(s, cli_upload_floats(PROG, s->ctx, dt, s->x.q, nq));
  cl_mem bk = keep(s, cli_upload_floats(PROG, s->ctx, dt, s->x.k, nk));
  cl_mem bv = keep(s, cli_upload_floats(PROG, s->ctx, dt, s->x.v, nk));
  cl_mem bgc = keep(s, cli_upload_floats(PROG, s->ctx, dt, s->x.g_cmp, ng));
  cl_mem bgs = keep(s, cli_upload_floats(PROG, s->ctx, dt, s->x.g_slc, ng));
  cl_mem bo = keep(s, cli_alloc(PROG, s->ctx, nq * esize));
  cl_mem bd = keep(s, cli_alloc(PROG, s->ctx, nq * esize));
  if (s->nbuf != 7) return CLI_EXIT_FAIL;
  clnsa_tensor q = clnsa_tensor_make(bq, 0, dt, 4, sq), k = clnsa_tensor_make(bk, 0, dt, 4, sk),
               v = clnsa_tensor_make(bv, 0, dt, 4, sk),
               g_cmp = clnsa_tensor_make(bgc, 0, dt, 3, sg),
               g_slc = clnsa_tensor_make(bgs, 0, dt, 3, sg),
               out = clnsa_tensor_make(bo, 0, dt, 4, sq),
               out_dense = clnsa_tensor_make(bd, 0, dt, 4, sq), idx;
  clnsa_inputs in = {.q = &q, .k = &k, .v = &v, .g_cmp = &g_cmp, .g_slc = &g_slc};
  clnsa_params params = clnsa_params_default(), dense_params = clnsa_params_default();
  params.block_size = DEMO_BS;
  params.block_count = DEMO_S;
  dense_params.window = T;

  size_t ws_bytes = 0;
  clnsa_status st = clnsa_forward_workspace_size(s->ctx, &params, &in, &ws_bytes);
  if (st == CLNSA_SUCCESS) {
    cl_mem bw = keep(s, cli_alloc(PROG, s->ctx, ws_bytes));
    if (!bw) return CLI_EXIT_FAIL;
    st = clnsa_workspace_create(s->ctx, bw, 0, ws_bytes, &s->ws);
  }
  if (st != CLNSA_SUCCESS) {
    cli_report(PROG, s->ctx, st);
    return CLI_EXIT_FAIL;
  }
  cl_mem stamp = keep(s, cli_alloc(PROG, s->ctx, 64));
  if (!stamp) return CLI_EXIT_FAIL;
  pass nsa_pass = {"NSA forward", s->ctx, &params, &in, &out, s->ws, stamp};
  pass dense_pass = {"dense attention", s->ctx, &dense_params, &in, &out_dense, NULL, stamp};
  timing t_nsa, t_dense;
  if (!time_pass(&nsa_pass, runs, &t_nsa) || !time_pass(&dense_pass, runs, &t_dense))
    return CLI_EXIT_FAIL;

  if ((st = clnsa_forward_block_indices(s->ws, &idx)) != CLNSA_SUCCESS) {
    cli_report(PROG, s->ctx, st);
    return CLI_EXIT_FAIL;
  }
  s->o = malloc(nq * sizeof(float));
  s->idx = malloc(cli_tensor_count(&idx) * sizeof(int32_t));
  if (!s->o || !s->idx || !cli_download(PROG, s->ctx, &out, s->o) ||
      !cli_download(PROG, s->ctx, &idx, s->idx))
    return CLI_EXIT_FAIL;
  check c;
  if (!check_slice(&s->x, dt, s->o, s->idx, &c)) {
    fprintf(stderr, PROG ": %s\n", clnsa_status_string(CLNSA_ERR_OUT_OF_HOST_MEMORY));
    return CLI_EXIT_FAIL;
  }
  bool ok = c.wrong == 0 && c.rel_err < cli_dtype_tolerance(dt);
  print_report(s, dt, &t_nsa, &t_dense, &c, ok);
  return ok ? 0 : CLI_EXIT_FAIL;
}

int cmd_demo(int argc, char **argv) {
  demo_options o;
  int rc = parse_options(argc, argv, &o);
  if (rc >= 0) return rc;
  demo_state s;
  memset(&s, 0, sizeof s);
  rc = demo(&o, &s);
  free(s.o);
  free(s.idx);
  clnsa_workspace_destroy(s.ws);
  for (int i = 0; i < s.nbuf; i++) clReleaseMemObject(s.buf[i]);
  free_inputs(&s.x);
  clnsa_context_destroy(s.ctx);
  return rc;
}
