/* `clnsa run`: one NSA forward pass on .npy inputs. Reads the arrays, uploads them in
 * the chosen storage type, runs clnsa_forward with a workspace of the size the library
 * asks for, and writes o (and optionally the block indices used) as .npy. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "npy.h"

#define PROG "clnsa run"
#define MAX_NPY_BYTES ((size_t)1 << 40) /* no practical cap: device memory limits first */

void usage_run(FILE *f) {
  fprintf(f,
          "usage: clnsa run --q F --k F --v F --out F [options]\n\n"
          "Runs the NSA forward o = g_slc*o_slc + g_cmp*o_cmp + g_swa*o_swa on .npy inputs\n"
          "(float32/float64/float16; indices int32/int64) and writes o as float32 .npy.\n\n"
          "  --q F                  queries [B,TQ,HQ,DK]\n"
          "  --k F                  keys    [B,TK,H,DK]\n"
          "  --v F                  values  [B,TK,H,DV]\n"
          "  --out F                output o [B,TQ,HQ,DV] (float32)\n"
          "  --g-cmp F              gate of the compressed branch [B,TQ,HQ] (absent: off)\n"
          "  --g-slc F              gate of the selected branch   [B,TQ,HQ] (absent: 1)\n"
          "  --g-swa F              gate of the window branch     [B,TQ,HQ] (absent: off)\n"
          "  --block-indices F      selected blocks [B,TQ,H,S], -1 = empty (absent: top-k);\n"
          "                         S, the last dimension, sets the block count\n"
          "  --block-counts F       blocks kept per query [B,TQ,H], each in [0, S]\n"
          "  --block-size N         selection (and compression) block size (64)\n"
          "  --block-count N        S, blocks selected per query (16)\n"
          "  --window N             sliding window, 0 = off (0)\n"
          "  --scale X              softmax scale (1/sqrt(DK))\n"
          "  --cu-seqlens F         packed sequences: offsets [N+1] of the queries (B = 1)\n"
          "  --cu-seqlens-k F       offsets [N+1] of the keys when they differ from queries'\n"
          "  --dtype f32|f16|bf16   storage type on the device (f32)\n"
          "  --device SPEC          device index or name part (default: CLNSA_DEVICE, then\n"
          "                         the first GPU, then the first device; see `clnsa devices`)\n"
          "  --out-block-indices F  write the block indices used [B,TQ,H,S] as int32 .npy\n");
}

/* ------------------------------------------------------------------------- */
/* Options                                                                     */
/* ------------------------------------------------------------------------- */
typedef struct run_options {
  const char *q, *k, *v, *out, *g_cmp, *g_slc, *g_swa, *block_indices, *block_counts;
  const char *cu_q, *cu_k, *device, *out_block_indices;
  int block_size, block_count, window;
  bool block_count_given;
  float scale;
  clnsa_dtype dtype;
} run_options;

typedef enum opt_kind { OPT_PATH, OPT_INT, OPT_FLOAT, OPT_DTYPE } opt_kind;

typedef struct opt_spec {
  const char *name;
  opt_kind kind;
  void *dest;
  bool *given; /* may be NULL */
} opt_spec;

static bool set_option(const opt_spec *s, const char *value) {
  switch (s->kind) {
    case OPT_PATH:
      *(const char **)s->dest = value;
      break;
    case OPT_INT:
      if (!cli_parse_int(value, 0, 1L << 30, s->dest)) {
        fprintf(stderr, PROG ": --%s: expected a non-negative integer, got '%s'\n", s->name, value);
        return false;
      }
      break;
    case OPT_FLOAT:
      if (!cli_parse_float(value, s->dest)) {
        fprintf(stderr, PROG ": --%s: expected a finite number, got '%s'\n", s->name, value);
        return false;
      }
      break;
    case OPT_DTYPE:
      if (!cli_parse_dtype(value, s->dest)) {
        fprintf(stderr, PROG ": --%s: expected f32, f16 or bf16, got '%s'\n", s->name, value);
        return false;
      }
      break;
  }
  if (s->given) *s->given = true;
  return true;
}

/* Returns -1 to go on, else the exit status. */
static int parse_options(int argc, char **argv, run_options *o) {
  clnsa_params def = clnsa_params_default();
  *o = (run_options){.block_size = def.block_size,
                     .block_count = def.block_count,
                     .window = def.window,
                     .dtype = CLNSA_F32};
  const opt_spec specs[] = {
      {"q", OPT_PATH, &o->q, NULL},
      {"k", OPT_PATH, &o->k, NULL},
      {"v", OPT_PATH, &o->v, NULL},
      {"out", OPT_PATH, &o->out, NULL},
      {"g-cmp", OPT_PATH, &o->g_cmp, NULL},
      {"g-slc", OPT_PATH, &o->g_slc, NULL},
      {"g-swa", OPT_PATH, &o->g_swa, NULL},
      {"block-indices", OPT_PATH, &o->block_indices, NULL},
      {"block-counts", OPT_PATH, &o->block_counts, NULL},
      {"block-size", OPT_INT, &o->block_size, NULL},
      {"block-count", OPT_INT, &o->block_count, &o->block_count_given},
      {"window", OPT_INT, &o->window, NULL},
      {"scale", OPT_FLOAT, &o->scale, NULL},
      {"cu-seqlens", OPT_PATH, &o->cu_q, NULL},
      {"cu-seqlens-k", OPT_PATH, &o->cu_k, NULL},
      {"dtype", OPT_DTYPE, &o->dtype, NULL},
      {"device", OPT_PATH, &o->device, NULL},
      {"out-block-indices", OPT_PATH, &o->out_block_indices, NULL},
  };
  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i];
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      usage_run(stdout);
      return 0;
    }
    const opt_spec *s = NULL;
    const char *value = NULL;
    for (size_t j = 0; arg[0] == '-' && arg[1] == '-' && j < sizeof specs / sizeof *specs; j++) {
      size_t n = strlen(specs[j].name);
      if (strncmp(arg + 2, specs[j].name, n) != 0) continue;
      if (arg[2 + n] == '=') value = arg + 3 + n; /* --name=value */
      if (arg[2 + n] == '=' || arg[2 + n] == '\0') {
        s = &specs[j];
        break;
      }
    }
    if (!s) {
      fprintf(stderr, PROG ": unknown option '%s'\n\n", arg);
      usage_run(stderr);
      return CLI_EXIT_USAGE;
    }
    if (!value) {
      if (i + 1 >= argc) {
        fprintf(stderr, PROG ": option --%s needs a value\n\n", s->name);
        usage_run(stderr);
        return CLI_EXIT_USAGE;
      }
      value = argv[++i];
    }
    if (!set_option(s, value)) return CLI_EXIT_USAGE;
  }
  const char *required[] = {o->q, o->k, o->v, o->out};
  const char *names[] = {"--q", "--k", "--v", "--out"};
  for (int i = 0; i < 4; i++)
    if (!required[i]) {
      fprintf(stderr, PROG ": missing %s\n\n", names[i]);
      usage_run(stderr);
      return CLI_EXIT_USAGE;
    }
  if (o->cu_k && !o->cu_q) {
    fprintf(stderr, PROG ": --cu-seqlens-k needs --cu-seqlens\n\n");
    usage_run(stderr);
    return CLI_EXIT_USAGE;
  }
  return -1;
}

/* ------------------------------------------------------------------------- */
/* Inputs                                                                      */
/* ------------------------------------------------------------------------- */
/* One array from a file: the host values (floats or int32) and the device tensor. */
typedef struct input {
  int ndim;
  int64_t shape[CLNSA_MAX_DIMS];
  float *f;
  int32_t *i;
  size_t count;
  clnsa_tensor t;
} input;

/* Reads `path` as floats (is_int false) or int32 and checks its rank. */
static bool load(const char *path, const char *option, const char *layout, int ndim, bool is_int,
                 input *in) {
  char err[512];
  npy_array a;
  if (npy_read_file(path, MAX_NPY_BYTES, &a, err, sizeof err) != 0) {
    fprintf(stderr, PROG ": %s: %s\n", option, err); /* the reader names the file */
    return false;
  }
  if (a.ndim != ndim) {
    fprintf(stderr, PROG ": %s %s: the array has %d dimension%s, expected %d: %s\n", option, path,
            a.ndim, a.ndim == 1 ? "" : "s", ndim, layout);
    npy_free(&a);
    return false;
  }
  if (is_int)
    in->i = npy_to_i32(&a, err, sizeof err);
  else
    in->f = npy_to_f32(&a, err, sizeof err);
  in->ndim = a.ndim;
  memcpy(in->shape, a.shape, sizeof(int64_t) * (size_t)a.ndim);
  in->count = a.count;
  npy_free(&a);
  if (!in->i && !in->f) {
    fprintf(stderr, PROG ": %s %s: %s\n", option, path, err);
    return false;
  }
  return true;
}

static bool upload(clnsa_context *ctx, clnsa_dtype dtype, input *in) {
  cl_mem m = in->i ? cli_upload_ints(PROG, ctx, in->i, in->count)
                   : cli_upload_floats(PROG, ctx, dtype, in->f, in->count);
  if (!m) return false;
  in->t = clnsa_tensor_make(m, 0, in->i ? CLNSA_I32 : dtype, in->ndim, in->shape);
  return true;
}

static void input_free(input *in) {
  free(in->f);
  free(in->i);
  if (in->t.buffer) clReleaseMemObject(in->t.buffer);
  memset(in, 0, sizeof *in);
}

/* ------------------------------------------------------------------------- */
/* The pass                                                                    */
/* ------------------------------------------------------------------------- */
enum { IN_Q, IN_K, IN_V, IN_GCMP, IN_GSLC, IN_GSWA, IN_IDX, IN_CNT, IN_CUQ, IN_CUK, NIN };

typedef struct run_state {
  input in[NIN];
  bool present[NIN];
  clnsa_context *ctx;
  clnsa_seqs *seqs;
  cl_mem o_buf, ws_buf;
  clnsa_workspace *ws;
  float *o_host;
  int32_t *idx_host;
} run_state;

static void state_free(run_state *s) {
  free(s->o_host);
  free(s->idx_host);
  clnsa_workspace_destroy(s->ws);
  if (s->ws_buf) clReleaseMemObject(s->ws_buf);
  if (s->o_buf) clReleaseMemObject(s->o_buf);
  clnsa_seqs_destroy(s->seqs);
  for (int i = 0; i < NIN; i++) input_free(&s->in[i]);
  clnsa_context_destroy(s->ctx);
}

static bool load_all(const run_options *o, run_state *s) {
  const struct {
    const char *path, *option, *layout;
    int ndim;
    bool is_int;
  } files[NIN] = {
      [IN_Q] = {o->q, "--q", "[B,TQ,HQ,DK]", 4, false},
      [IN_K] = {o->k, "--k", "[B,TK,H,DK]", 4, false},
      [IN_V] = {o->v, "--v", "[B,TK,H,DV]", 4, false},
      [IN_GCMP] = {o->g_cmp, "--g-cmp", "[B,TQ,HQ]", 3, false},
      [IN_GSLC] = {o->g_slc, "--g-slc", "[B,TQ,HQ]", 3, false},
      [IN_GSWA] = {o->g_swa, "--g-swa", "[B,TQ,HQ]", 3, false},
      [IN_IDX] = {o->block_indices, "--block-indices", "[B,TQ,H,S]", 4, true},
      [IN_CNT] = {o->block_counts, "--block-counts", "[B,TQ,H]", 3, true},
      [IN_CUQ] = {o->cu_q, "--cu-seqlens", "[N+1]", 1, true},
      [IN_CUK] = {o->cu_k, "--cu-seqlens-k", "[N+1]", 1, true},
  };
  for (int i = 0; i < NIN; i++) {
    if (!files[i].path) continue;
    if (!load(files[i].path, files[i].option, files[i].layout, files[i].ndim, files[i].is_int,
              &s->in[i]))
      return false;
    s->present[i] = true;
  }
  if (s->present[IN_CUQ]) {
    int64_t n = s->in[IN_CUQ].shape[0];
    if (n < 2) {
      fprintf(stderr, PROG ": --cu-seqlens: %lld offsets; packing N sequences needs N+1 >= 2\n",
              (long long)n);
      return false;
    }
    if (s->present[IN_CUK] && s->in[IN_CUK].shape[0] != n) {
      fprintf(stderr, PROG ": --cu-seqlens-k has %lld offsets, --cu-seqlens has %lld\n",
              (long long)s->in[IN_CUK].shape[0], (long long)n);
      return false;
    }
    if (s->in[IN_Q].shape[0] != 1) {
      fprintf(stderr, PROG ": with --cu-seqlens, B must be 1 (packed sequences); q has B = %lld\n",
              (long long)s->in[IN_Q].shape[0]);
      return false;
    }
  }
  return true;
}

/* S comes from the block_indices file when there is one. */
static bool block_count(const run_options *o, const run_state *s, int *S) {
  *S = o->block_count;
  if (!s->present[IN_IDX]) return true;
  int64_t width = s->in[IN_IDX].shape[3];
  if (o->block_count_given && width != o->block_count) {
    fprintf(stderr, PROG ": --block-count %d, but --block-indices has S = %lld (last dim)\n",
            o->block_count, (long long)width);
    return false;
  }
  *S = width > 1 << 30 ? 1 << 30 : (int)width; /* the library checks the range */
  return true;
}

static int finish(const run_options *o, run_state *s, const clnsa_tensor *o_t) {
  size_t n = cli_tensor_count(o_t);
  char err[512];
  if (!(s->o_host = malloc(n ? n * sizeof(float) : 1)) ||
      !cli_download(PROG, s->ctx, o_t, s->o_host))
    return CLI_EXIT_FAIL;
  if (npy_write_file(o->out, NPY_F32, 4, o_t->shape, s->o_host, err, sizeof err) != 0) {
    fprintf(stderr, PROG ": --out %s: %s\n", o->out, err);
    return CLI_EXIT_FAIL;
  }
  if (!o->out_block_indices) return 0;
  /* Given indices are used as given (the workspace keeps no copy); else top-k's. */
  const input *given = s->present[IN_IDX] ? &s->in[IN_IDX] : NULL;
  clnsa_tensor idx = given ? given->t : (clnsa_tensor){0};
  if (!given) {
    clnsa_status st = clnsa_forward_block_indices(s->ws, &idx);
    if (st != CLNSA_SUCCESS) {
      cli_report(PROG, s->ctx, st);
      return CLI_EXIT_FAIL;
    }
    n = cli_tensor_count(&idx);
    if (!(s->idx_host = malloc(n ? n * sizeof(int32_t) : 1)) ||
        !cli_download(PROG, s->ctx, &idx, s->idx_host))
      return CLI_EXIT_FAIL;
  }
  if (npy_write_file(o->out_block_indices, NPY_I32, idx.ndim, idx.shape,
                     given ? given->i : s->idx_host, err, sizeof err) != 0) {
    fprintf(stderr, PROG ": --out-block-indices %s: %s\n", o->out_block_indices, err);
    return CLI_EXIT_FAIL;
  }
  return 0;
}

static int run(const run_options *o, run_state *s) {
  if (!load_all(o, s)) return CLI_EXIT_FAIL;
  clnsa_params params = clnsa_params_default();
  params.block_size = o->block_size;
  params.window = o->window;
  params.scale = o->scale;
  if (!block_count(o, s, &params.block_count)) return CLI_EXIT_FAIL;

  if (!(s->ctx = cli_open_context(PROG, o->device))) return CLI_EXIT_FAIL;
  for (int i = 0; i < NIN; i++)
    if (s->present[i] && i != IN_CUQ && i != IN_CUK && !upload(s->ctx, o->dtype, &s->in[i]))
      return CLI_EXIT_FAIL;
  clnsa_status st = CLNSA_SUCCESS;
  if (s->present[IN_CUQ]) {
    const input *cu = &s->in[IN_CUQ];
    st = clnsa_seqs_create(s->ctx, &params, (int)(cu->shape[0] - 1), cu->i,
                           s->present[IN_CUK] ? s->in[IN_CUK].i : NULL, &s->seqs);
    if (st != CLNSA_SUCCESS) {
      cli_report(PROG, s->ctx, st);
      return CLI_EXIT_FAIL;
    }
  }
  const clnsa_tensor *t[NIN];
  for (int i = 0; i < NIN; i++) t[i] = s->present[i] ? &s->in[i].t : NULL;
  clnsa_inputs in = {.q = t[IN_Q],
                     .k = t[IN_K],
                     .v = t[IN_V],
                     .g_cmp = t[IN_GCMP],
                     .g_slc = t[IN_GSLC],
                     .g_swa = t[IN_GSWA],
                     .block_indices = t[IN_IDX],
                     .block_counts = t[IN_CNT],
                     .seqs = s->seqs};

  /* o [B,TQ,HQ,DV] in the storage type of the inputs. */
  const int64_t *qs = s->in[IN_Q].shape, *vs = s->in[IN_V].shape;
  int64_t o_shape[4] = {qs[0], qs[1], qs[2], vs[3]};
  size_t o_count = (size_t)(o_shape[0] * o_shape[1] * o_shape[2] * o_shape[3]);
  if (!(s->o_buf = cli_alloc(PROG, s->ctx, o_count * clnsa_dtype_size(o->dtype))))
    return CLI_EXIT_FAIL;
  clnsa_tensor o_t = clnsa_tensor_make(s->o_buf, 0, o->dtype, 4, o_shape);

  size_t ws_bytes = 0;
  st = clnsa_forward_workspace_size(s->ctx, &params, &in, &ws_bytes);
  if (st == CLNSA_SUCCESS) {
    if (!(s->ws_buf = cli_alloc(PROG, s->ctx, ws_bytes))) return CLI_EXIT_FAIL;
    st = clnsa_workspace_create(s->ctx, s->ws_buf, 0, ws_bytes, &s->ws);
  }
  if (st == CLNSA_SUCCESS) st = clnsa_forward(s->ctx, &params, &in, &o_t, s->ws, 0, NULL, NULL);
  if (st != CLNSA_SUCCESS) {
    cli_report(PROG, s->ctx, st);
    return CLI_EXIT_FAIL;
  }
  cl_int err = clFinish(clnsa_context_queue(s->ctx));
  if (err != CL_SUCCESS) {
    fprintf(stderr, PROG ": %s: clFinish returned %d\n", clnsa_status_string(CLNSA_ERR_OPENCL),
            (int)err);
    return CLI_EXIT_FAIL;
  }
  return finish(o, s, &o_t);
}

int cmd_run(int argc, char **argv) {
  run_options o;
  int rc = parse_options(argc, argv, &o);
  if (rc >= 0) return rc;
  run_state s;
  memset(&s, 0, sizeof s);
  rc = run(&o, &s);
  state_free(&s);
  return rc;
}
