/* `clnsa run`: one NSA forward pass on .npy inputs, and optionally its backward. Reads
 * the arrays, uploads them in the chosen storage type, runs clnsa_forward (then, given
 * --do, clnsa_backward) with a workspace of the size the library asks for, and writes o,
 * the gradients and optionally the block indices used as .npy. */
#include <stdarg.h>
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
          "  --out-block-indices F  write the block indices used [B,TQ,H,S] as int32 .npy\n\n"
          "Backward (given --do, the forward is followed by clnsa_backward; needs TQ = TK):\n"
          "  --do F                 dL/do [B,TQ,HQ,DV]; needs --dq, --dk and --dv\n"
          "  --dq F, --dk F, --dv F write dL/dq, dL/dk, dL/dv (shapes of q, k, v; float32)\n"
          "  --dg-cmp F             write dL/dg_cmp [B,TQ,HQ] (float32; needs --g-cmp)\n"
          "  --dg-slc F             write dL/dg_slc [B,TQ,HQ] (float32; needs --g-slc)\n"
          "  --dg-swa F             write dL/dg_swa [B,TQ,HQ] (float32; needs --g-swa)\n"
          "Gradients are stored in the --dtype storage type; block indices are constants.\n");
}

/* ------------------------------------------------------------------------- */
/* Options                                                                     */
/* ------------------------------------------------------------------------- */
typedef struct run_options {
  const char *q, *k, *v, *out, *g_cmp, *g_slc, *g_swa, *block_indices, *block_counts;
  const char *cu_q, *cu_k, *device, *out_block_indices;
  const char *d_o, *dq, *dk, *dv, *dg_cmp, *dg_slc, *dg_swa; /* backward */
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

/* Prints "clnsa run: <message>" and the usage to stderr; returns the usage exit status. */
static int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs(PROG ": ", stderr);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputs("\n\n", stderr);
  usage_run(stderr);
  return CLI_EXIT_USAGE;
}

/* The backward's options: --do with --dq, --dk, --dv, and a --dg-* only for a gate given. */
static int check_backward_options(const run_options *o) {
  const char *grads[] = {o->dq, o->dk, o->dv, o->dg_cmp, o->dg_slc, o->dg_swa};
  const char *gates[] = {NULL, NULL, NULL, o->g_cmp, o->g_slc, o->g_swa};
  const char *names[] = {"--dq", "--dk", "--dv", "--dg-cmp", "--dg-slc", "--dg-swa"};
  for (int i = 0; i < 6; i++) {
    if (grads[i] && !o->d_o) return usage_error("%s needs --do (the backward's input)", names[i]);
    if (o->d_o && i < 3 && !grads[i])
      return usage_error("--do needs --dq, --dk and --dv; %s is missing", names[i]);
    if (grads[i] && i >= 3 && !gates[i])
      return usage_error("%s needs --%s: only a gate that is given has a gradient", names[i],
                         names[i] + 3);
  }
  return -1;
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
      {"do", OPT_PATH, &o->d_o, NULL},
      {"dq", OPT_PATH, &o->dq, NULL},
      {"dk", OPT_PATH, &o->dk, NULL},
      {"dv", OPT_PATH, &o->dv, NULL},
      {"dg-cmp", OPT_PATH, &o->dg_cmp, NULL},
      {"dg-slc", OPT_PATH, &o->dg_slc, NULL},
      {"dg-swa", OPT_PATH, &o->dg_swa, NULL},
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
    if (!s) return usage_error("unknown option '%s'", arg);
    if (!value) {
      if (i + 1 >= argc) return usage_error("option --%s needs a value", s->name);
      value = argv[++i];
    }
    if (!set_option(s, value)) return CLI_EXIT_USAGE;
  }
  const char *required[] = {o->q, o->k, o->v, o->out};
  const char *names[] = {"--q", "--k", "--v", "--out"};
  for (int i = 0; i < 4; i++)
    if (!required[i]) return usage_error("missing %s", names[i]);
  if (o->cu_k && !o->cu_q) return usage_error("--cu-seqlens-k needs --cu-seqlens");
  return check_backward_options(o);
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
enum { IN_Q, IN_K, IN_V, IN_GCMP, IN_GSLC, IN_GSWA, IN_IDX, IN_CNT, IN_CUQ, IN_CUK, IN_DO, NIN };

/* Floating outputs, allocated in the storage type and written as float32 .npy. */
enum { OUT_O, OUT_DQ, OUT_DK, OUT_DV, OUT_DGCMP, OUT_DGSLC, OUT_DGSWA, NOUT };

typedef struct output {
  const char *path, *option;
  clnsa_tensor t; /* t.buffer is NULL when the output was not asked for */
} output;

typedef struct run_state {
  input in[NIN];
  bool present[NIN];
  output out[NOUT];
  clnsa_context *ctx;
  clnsa_seqs *seqs;
  cl_mem ws_buf;
  clnsa_workspace *ws;
  int32_t *idx_host;
} run_state;

static void state_free(run_state *s) {
  if (s->ctx) clFinish(clnsa_context_queue(s->ctx)); /* a failed pass may leave work queued */
  free(s->idx_host);
  clnsa_workspace_destroy(s->ws);
  if (s->ws_buf) clReleaseMemObject(s->ws_buf);
  for (int i = 0; i < NOUT; i++)
    if (s->out[i].t.buffer) clReleaseMemObject(s->out[i].t.buffer);
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
      [IN_DO] = {o->d_o, "--do", "[B,TQ,HQ,DV]", 4, false},
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

static bool make_params(const run_options *o, const run_state *s, clnsa_params *params) {
  *params = clnsa_params_default();
  params->block_size = o->block_size;
  params->window = o->window;
  params->scale = o->scale;
  return block_count(o, s, &params->block_count);
}

/* Uploads every array but the offsets, which clnsa_seqs_create takes from the host. */
static bool upload_all(const run_options *o, const clnsa_params *params, run_state *s) {
  for (int i = 0; i < NIN; i++)
    if (s->present[i] && i != IN_CUQ && i != IN_CUK && !upload(s->ctx, o->dtype, &s->in[i]))
      return false;
  if (!s->present[IN_CUQ]) return true;
  const input *cu = &s->in[IN_CUQ];
  clnsa_status st = clnsa_seqs_create(s->ctx, params, (int)(cu->shape[0] - 1), cu->i,
                                      s->present[IN_CUK] ? s->in[IN_CUK].i : NULL, &s->seqs);
  if (st != CLNSA_SUCCESS) cli_report(PROG, s->ctx, st);
  return st == CLNSA_SUCCESS;
}

/* o [B,TQ,HQ,DV]; each gradient has the shape of what it differentiates. */
static bool alloc_outputs(const run_options *o, run_state *s) {
  const int64_t *qs = s->in[IN_Q].shape, *vs = s->in[IN_V].shape;
  const int64_t o_shape[4] = {qs[0], qs[1], qs[2], vs[3]};
  const struct {
    const char *path, *option;
    int like; /* the input whose shape it has; -1 for o */
  } spec[NOUT] = {
      [OUT_O] = {o->out, "--out", -1},
      [OUT_DQ] = {o->dq, "--dq", IN_Q},
      [OUT_DK] = {o->dk, "--dk", IN_K},
      [OUT_DV] = {o->dv, "--dv", IN_V},
      [OUT_DGCMP] = {o->dg_cmp, "--dg-cmp", IN_GCMP},
      [OUT_DGSLC] = {o->dg_slc, "--dg-slc", IN_GSLC},
      [OUT_DGSWA] = {o->dg_swa, "--dg-swa", IN_GSWA},
  };
  for (int i = 0; i < NOUT; i++) {
    if (!spec[i].path) continue;
    const input *like = spec[i].like >= 0 ? &s->in[spec[i].like] : NULL;
    clnsa_tensor t =
        clnsa_tensor_make(NULL, 0, o->dtype, like ? like->ndim : 4, like ? like->shape : o_shape);
    if (!(t.buffer = cli_alloc(PROG, s->ctx, cli_tensor_count(&t) * clnsa_dtype_size(o->dtype))))
      return false;
    s->out[i] = (output){spec[i].path, spec[i].option, t};
  }
  return true;
}

static clnsa_inputs inputs_of(const run_state *s) {
  const clnsa_tensor *t[NIN];
  for (int i = 0; i < NIN; i++) t[i] = s->present[i] ? &s->in[i].t : NULL;
  return (clnsa_inputs){.q = t[IN_Q],
                        .k = t[IN_K],
                        .v = t[IN_V],
                        .g_cmp = t[IN_GCMP],
                        .g_slc = t[IN_GSLC],
                        .g_swa = t[IN_GSWA],
                        .block_indices = t[IN_IDX],
                        .block_counts = t[IN_CNT],
                        .seqs = s->seqs};
}

static const clnsa_tensor *output_or_null(const output *out) {
  return out->t.buffer ? &out->t : NULL;
}

/* The forward, then (given --do) the backward, on a workspace sized for what runs. */
static int passes(const run_options *o, run_state *s, const clnsa_params *params,
                  const clnsa_inputs *in) {
  size_t bytes = 0;
  clnsa_status st = o->d_o ? clnsa_backward_workspace_size(s->ctx, params, in, &bytes)
                           : clnsa_forward_workspace_size(s->ctx, params, in, &bytes);
  if (st == CLNSA_SUCCESS) {
    if (!(s->ws_buf = cli_alloc(PROG, s->ctx, bytes))) return CLI_EXIT_FAIL;
    st = clnsa_workspace_create(s->ctx, s->ws_buf, 0, bytes, &s->ws);
  }
  if (st == CLNSA_SUCCESS)
    st = clnsa_forward(s->ctx, params, in, &s->out[OUT_O].t, s->ws, 0, NULL, NULL);
  if (st == CLNSA_SUCCESS && o->d_o) {
    const output *g = s->out;
    clnsa_grads grads = {output_or_null(&g[OUT_DQ]),    output_or_null(&g[OUT_DK]),
                         output_or_null(&g[OUT_DV]),    output_or_null(&g[OUT_DGCMP]),
                         output_or_null(&g[OUT_DGSLC]), output_or_null(&g[OUT_DGSWA])};
    st = clnsa_backward(s->ctx, params, in, &s->in[IN_DO].t, &grads, s->ws, 0, NULL, NULL);
  }
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
  return 0;
}

/* Downloads a floating output and writes it as float32 .npy. */
static bool write_output(run_state *s, const output *out) {
  size_t n = cli_tensor_count(&out->t);
  float *host = malloc(n ? n * sizeof(float) : 1);
  char err[512];
  bool ok = host && cli_download(PROG, s->ctx, &out->t, host);
  if (!host) fprintf(stderr, PROG ": %s\n", clnsa_status_string(CLNSA_ERR_OUT_OF_HOST_MEMORY));
  if (ok &&
      npy_write_file(out->path, NPY_F32, out->t.ndim, out->t.shape, host, err, sizeof err) != 0) {
    fprintf(stderr, PROG ": %s %s: %s\n", out->option, out->path, err);
    ok = false;
  }
  free(host);
  return ok;
}

static int finish(const run_options *o, run_state *s) {
  for (int i = 0; i < NOUT; i++)
    if (s->out[i].t.buffer && !write_output(s, &s->out[i])) return CLI_EXIT_FAIL;
  if (!o->out_block_indices) return 0;
  /* Given indices are used as given (the workspace keeps no copy); else top-k's. */
  const input *given = s->present[IN_IDX] ? &s->in[IN_IDX] : NULL;
  clnsa_tensor idx = given ? given->t : (clnsa_tensor){0};
  char err[512];
  if (!given) {
    clnsa_status st = clnsa_forward_block_indices(s->ws, &idx);
    if (st != CLNSA_SUCCESS) {
      cli_report(PROG, s->ctx, st);
      return CLI_EXIT_FAIL;
    }
    size_t n = cli_tensor_count(&idx);
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
  clnsa_params params;
  if (!load_all(o, s) || !make_params(o, s, &params)) return CLI_EXIT_FAIL;
  if (!(s->ctx = cli_open_context(PROG, o->device))) return CLI_EXIT_FAIL;
  if (!upload_all(o, &params, s) || !alloc_outputs(o, s)) return CLI_EXIT_FAIL;
  clnsa_inputs in = inputs_of(s);
  int rc = passes(o, s, &params, &in);
  return rc ? rc : finish(o, s);
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
