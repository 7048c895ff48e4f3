/* `clnsa bench`: times every NSA stage, the whole forward and backward, and dense causal
 * attention on random inputs, over a sweep of lengths, storage types and GQA groups.
 *
 * How one time is taken (docs/PERFORMANCE.md gives the reasons):
 *  - Each run is preceded by a clEnqueueFillBuffer over a buffer larger than the device's
 *    last-level cache (--flush-mb). It evicts what the previous run left in the cache,
 *    keeps the device busy while the host enqueues the stage, and its END timestamp is
 *    the run's start. The run's end is the END of the event the stage call returns (its
 *    last command; the queue is in order). A fill, unlike a marker, is certain to be a
 *    command the device executes, so its timestamps are the device's.
 *  - Every stage first runs --warmup times on each input set (kernel builds, first
 *    touches); then --repeat timed runs rotate among the sets, and the median and the
 *    minimum are reported.
 *  - What a later stage reads (pooled k/v, lse_cmp, block indices) is produced once per
 *    set by the stages themselves, so each stage is timed on the inputs the forward gives
 *    it. A stage that fails there is replaced by random data, so the others still run. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define PROG "clnsa bench"

int cmd_bench(int argc, char **argv);
void usage_bench(FILE *f);

enum { MAX_LIST = 32, MAX_SETS = 16 };
#define MEM_FRACTION 0.4 /* of CL_DEVICE_GLOBAL_MEM_SIZE the input sets may take */
#define MIB ((size_t)1 << 20)

typedef enum stage_id {
  ST_POOL,
  ST_COMPRESSED,
  ST_TOPK,
  ST_SELECTED,
  ST_WINDOW,
  ST_DENSE,
  ST_FORWARD,
  ST_BACKWARD,
  ST_COUNT
} stage_id;

static const char *const STAGE_NAME[ST_COUNT] = {
    "pool", "compressed", "topk", "selected", "window", "dense", "forward", "backward"};

void usage_bench(FILE *f) {
  fprintf(f,
          "usage: clnsa bench [options]\n\n"
          "Times each NSA stage (pool, compressed attention, top-k, selected attention, window),\n"
          "the whole forward and backward, and dense causal attention on random inputs with\n"
          "OpenCL event profiling: warm-up, then the median of --repeat runs rotating among\n"
          "--sets input sets, a cache-evicting write before each run. B=--batch, TQ=TK=T,\n"
          "HQ=H*G, DK=DV=D. Prints a table (dense/x = dense time / stage time); progress goes\n"
          "to stderr.\n\n"
          "  --seq LIST          lengths T (8192,16384,32768,65536 on GPUs; 1024,2048 else)\n"
          "  --dtype LIST        storage types, of f32,f16,bf16 (bf16)\n"
          "  --group LIST        GQA group sizes G (16)\n"
          "  --heads H           kv heads (4); query heads HQ = H*G\n"
          "  --batch B           batch (1)\n"
          "  --dim D             head dimension, DK = DV (128)\n"
          "  --block-size N      BS, selection and compression block (64)\n"
          "  --block-count N     S, blocks selected per query (16)\n"
          "  --window W          sliding window, 0 = off (0)\n"
          "  --stages LIST       of pool,compressed,topk,selected,window,dense,forward,\n"
          "                      backward (all; window only when W > 0)\n"
          "  --repeat N          timed runs per stage (10)\n"
          "  --warmup N          untimed runs per stage and input set first (1)\n"
          "  --sets K            input sets to rotate among (3; fewer when they would take\n"
          "                      more than 40%% of the device's global memory)\n"
          "  --flush-mb N        MiB written before each run to evict caches (128 on GPUs,\n"
          "                      twice the reported cache elsewhere); 0: write 4 bytes\n"
          "  --dense-max-seq N   skip dense attention above this T (4096 on CPU devices,\n"
          "                      no limit elsewhere; 0: no limit)\n"
          "  --seed N            seed of the random inputs (1)\n"
          "  --json F            write one JSON object per line per (config, stage) to F\n"
          "  --device SPEC       device index or name part (default: CLNSA_DEVICE, then\n"
          "                      the first GPU, then the first device; see `clnsa devices`)\n"
          "  --tf32              f32 runs with CLNSA_FLAG_TF32 (tensor cores where the\n"
          "                      device has them; dtype column \"tf32\")\n"
          "  --cmp16             f16/bf16 runs with CLNSA_FLAG_CMP_16BIT (k_cmp, v_cmp in\n"
          "                      the input dtype, as fla-org and mdy666 keep them; dtype\n"
          "                      column \"bf16c\", \"f16c\")\n"
          "  --quiet             no progress on stderr\n"
          "Lists are comma-separated: --seq 1024,2048 --dtype f32,bf16 --group 1,4,16.\n");
}

/* ------------------------------------------------------------------------- */
/* Options                                                                     */
/* ------------------------------------------------------------------------- */
typedef struct bench_options {
  int seq[MAX_LIST], nseq;
  clnsa_dtype dtype[MAX_LIST];
  int ndtype;
  int group[MAX_LIST], ngroup;
  int batch, heads, dim, block_size, block_count, window;
  int repeat, warmup, sets, flush_mb, dense_max_seq, seed;
  unsigned stages; /* bit (1u << stage_id) per stage asked for */
  bool stages_given, quiet, tf32, cmp16;
  const char *json, *device;
} bench_options;

typedef enum opt_kind { OPT_INT, OPT_INTS, OPT_DTYPES, OPT_STAGES, OPT_STRING, OPT_FLAG } opt_kind;

typedef struct opt_spec {
  const char *name;
  opt_kind kind;
  void *dest;
  int *count;   /* lists: number of items */
  long lo, hi;  /* integers: accepted range */
} opt_spec;

/* Splits `s` at commas into items of at most 63 characters; no item may be empty. */
static bool split_list(const char *s, char items[MAX_LIST][64], int *n) {
  *n = 0;
  for (const char *p = s;; p++) {
    const char *end = strchr(p, ',');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    if (len == 0 || len >= 64 || *n == MAX_LIST) return false;
    memcpy(items[*n], p, len);
    items[(*n)++][len] = '\0';
    if (!end) return true;
    p = end;
  }
}

static int stage_by_name(const char *s) {
  for (int i = 0; i < ST_COUNT; i++)
    if (strcmp(s, STAGE_NAME[i]) == 0) return i;
  return -1;
}

static bool set_list(const opt_spec *s, const char *value) {
  char items[MAX_LIST][64];
  int n;
  if (!split_list(value, items, &n)) return false;
  for (int i = 0; i < n; i++) {
    if (s->kind == OPT_INTS) {
      if (!cli_parse_int(items[i], s->lo, s->hi, (int *)s->dest + i)) return false;
    } else if (s->kind == OPT_DTYPES) {
      if (!cli_parse_dtype(items[i], (clnsa_dtype *)s->dest + i)) return false;
    } else {
      int st = stage_by_name(items[i]);
      if (st < 0) return false;
      *(unsigned *)s->dest |= 1u << st;
    }
  }
  if (s->count) *s->count = n;
  return true;
}

static bool set_option(const opt_spec *s, const char *value) {
  bool ok = true;
  switch (s->kind) {
    case OPT_INT: ok = cli_parse_int(value, s->lo, s->hi, s->dest); break;
    case OPT_STRING: *(const char **)s->dest = value; break;
    case OPT_FLAG: *(bool *)s->dest = true; break;
    default: ok = set_list(s, value); break;
  }
  if (ok) return true;
  const char *what = s->kind == OPT_DTYPES   ? "a list of f32, f16, bf16"
                     : s->kind == OPT_STAGES ? "a list of stage names"
                     : s->kind == OPT_INTS   ? "a list of integers"
                                             : "an integer";
  fprintf(stderr, PROG ": --%s: expected %s", s->name, what);
  if (s->kind == OPT_INT || s->kind == OPT_INTS) fprintf(stderr, " in [%ld, %ld]", s->lo, s->hi);
  fprintf(stderr, ", got '%s'\n\n", value);
  return false;
}

/* Finds the spec of "--name" or "--name=value"; *value is set for the second form. */
static const opt_spec *find_option(const opt_spec *specs, size_t n, const char *arg,
                                   const char **value) {
  *value = NULL;
  if (arg[0] != '-' || arg[1] != '-') return NULL;
  for (size_t j = 0; j < n; j++) {
    size_t len = strlen(specs[j].name);
    if (strncmp(arg + 2, specs[j].name, len) != 0) continue;
    if (arg[2 + len] == '=') *value = arg + 3 + len;
    if (arg[2 + len] == '=' || arg[2 + len] == '\0') return &specs[j];
  }
  return NULL;
}

static int usage_error(const char *fmt, const char *what) {
  fprintf(stderr, PROG ": ");
  fprintf(stderr, fmt, what);
  fprintf(stderr, "\n\n");
  usage_bench(stderr);
  return CLI_EXIT_USAGE;
}

/* Checks what single options cannot: combinations. Returns -1 or the exit status. */
static int check_options(bench_options *o) {
  for (int i = 0; i < o->ngroup; i++)
    if ((long)o->group[i] * o->heads > 65536)
      return usage_error("%s: query heads H*G exceed 65536", "--group/--heads");
  if (o->stages_given && (o->stages & (1u << ST_WINDOW)) && o->window == 0)
    return usage_error("%s: the window stage needs --window W > 0", "--stages");
  if (!o->stages_given) {
    o->stages = (1u << ST_COUNT) - 1;
    if (o->window == 0) o->stages &= ~(1u << ST_WINDOW);
  }
  return -1;
}

/* Returns -1 to go on, else the exit status. */
static int parse_options(int argc, char **argv, bench_options *o) {
  clnsa_params def = clnsa_params_default();
  *o = (bench_options){.ndtype = 1, .dtype = {CLNSA_BF16}, .ngroup = 1, .group = {16},
                       .batch = 1, .heads = 4, .dim = 128, .block_size = def.block_size,
                       .block_count = def.block_count, .window = 0, .repeat = 10,
                       .warmup = 1, .sets = 3, .flush_mb = -1, .dense_max_seq = -1,
                       .seed = 1};
  const opt_spec specs[] = {
      {"seq", OPT_INTS, o->seq, &o->nseq, 1, 1L << 28},
      {"dtype", OPT_DTYPES, o->dtype, &o->ndtype, 0, 0},
      {"group", OPT_INTS, o->group, &o->ngroup, 1, 65536},
      {"heads", OPT_INT, &o->heads, NULL, 1, 65536},
      {"batch", OPT_INT, &o->batch, NULL, 1, 1L << 20},
      {"dim", OPT_INT, &o->dim, NULL, 1, CLNSA_MAX_HEAD_DIM},
      {"block-size", OPT_INT, &o->block_size, NULL, 1, 4096},
      {"block-count", OPT_INT, &o->block_count, NULL, 1, CLNSA_MAX_BLOCK_COUNT},
      {"window", OPT_INT, &o->window, NULL, 0, 1L << 30},
      {"stages", OPT_STAGES, &o->stages, NULL, 0, 0},
      {"repeat", OPT_INT, &o->repeat, NULL, 1, 100000},
      {"warmup", OPT_INT, &o->warmup, NULL, 0, 1000},
      {"sets", OPT_INT, &o->sets, NULL, 1, MAX_SETS},
      {"flush-mb", OPT_INT, &o->flush_mb, NULL, 0, 65536},
      {"dense-max-seq", OPT_INT, &o->dense_max_seq, NULL, 0, 1L << 30},
      {"seed", OPT_INT, &o->seed, NULL, 0, 2147483647L},
      {"json", OPT_STRING, &o->json, NULL, 0, 0},
      {"device", OPT_STRING, &o->device, NULL, 0, 0},
      {"quiet", OPT_FLAG, &o->quiet, NULL, 0, 0},
      {"tf32", OPT_FLAG, &o->tf32, NULL, 0, 0},
      {"cmp16", OPT_FLAG, &o->cmp16, NULL, 0, 0},
  };
  const size_t nspecs = sizeof specs / sizeof specs[0];
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage_bench(stdout);
      return 0;
    }
    const char *value;
    const opt_spec *s = find_option(specs, nspecs, argv[i], &value);
    if (!s) return usage_error("unknown option '%s'", argv[i]);
    if (s->kind == OPT_FLAG && value) return usage_error("option --%s takes no value", s->name);
    if (s->kind != OPT_FLAG && !value) {
      if (i + 1 >= argc) return usage_error("option --%s needs a value", s->name);
      value = argv[++i];
    }
    if (s->kind == OPT_STAGES) o->stages_given = true, o->stages = 0;
    if (!set_option(s, value)) {
      usage_bench(stderr);
      return CLI_EXIT_USAGE;
    }
  }
  return check_options(o);
}

/* ------------------------------------------------------------------------- */
/* Device, configurations, work counts                                          */
/* ------------------------------------------------------------------------- */
typedef struct device_facts {
  char name[256];
  bool cpu, gpu;
  cl_ulong global_mem, max_alloc, cache;
} device_facts;

static void device_facts_query(clnsa_context *ctx, device_facts *d) {
  cl_device_id dev = clnsa_context_device(ctx);
  cl_device_type type = 0;
  memset(d, 0, sizeof *d);
  clGetDeviceInfo(dev, CL_DEVICE_NAME, sizeof d->name - 1, d->name, NULL);
  clGetDeviceInfo(dev, CL_DEVICE_TYPE, sizeof type, &type, NULL);
  clGetDeviceInfo(dev, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof d->global_mem, &d->global_mem, NULL);
  clGetDeviceInfo(dev, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof d->max_alloc, &d->max_alloc, NULL);
  clGetDeviceInfo(dev, CL_DEVICE_GLOBAL_MEM_CACHE_SIZE, sizeof d->cache, &d->cache, NULL);
  d->cpu = (type & CL_DEVICE_TYPE_CPU) != 0;
  d->gpu = (type & (CL_DEVICE_TYPE_GPU | CL_DEVICE_TYPE_ACCELERATOR)) != 0;
}

/* Bytes of the cache-evicting write: NVIDIA reports a per-SM cache size, not the L2
 * (50 MiB on H100/H200), so GPUs get a fixed 128 MiB. */
static size_t flush_bytes(const bench_options *o, const device_facts *d) {
  if (o->flush_mb >= 0) return o->flush_mb ? (size_t)o->flush_mb * MIB : 4;
  if (d->gpu) return 128 * MIB;
  size_t b = 2 * (size_t)d->cache / 4 * 4; /* the fill pattern is 4 bytes */
  return b < 8 * MIB ? 8 * MIB : b > 256 * MIB ? 256 * MIB : b;
}

typedef struct bench_config {
  int B, T, H, G, HQ, D, BS, S, W;
  clnsa_dtype dt;
  bool cmp16; /* CLNSA_FLAG_CMP_16BIT: k_cmp, v_cmp in dt instead of f32 */
} bench_config;

typedef struct work {
  double flop, bytes;
} work;

/* Sums over the query positions p = 0..T-1 (TQ = TK = T) of the key counts each stage
 * multiplies against (docs/PERFORMANCE.md, "FLOP counts"). */
typedef struct key_sums {
  double selected, compressed, topk, window, dense;
} key_sums;

static key_sums key_sums_of(const bench_config *c) {
  key_sums k = {0, 0, 0, 0, 0};
  for (int64_t p = 0; p < c->T; p++) {
    int64_t ic = p / c->BS, n = ic + 1 < c->S ? ic + 1 : c->S;
    /* n blocks kept, the own block (p % BS + 1 causal keys) among them; the others whole */
    k.selected += (double)(n == ic + 1 ? p + 1 : (n - 1) * c->BS + p % c->BS + 1);
    k.compressed += (double)((p + 1) / c->BS);
    k.topk += (double)ic;
    k.window += (double)(c->W > 0 && c->W < p + 1 ? c->W : p + 1);
  }
  k.dense = (double)c->T * (c->T + 1) / 2.0;
  return k;
}

/* FLOPs (2 per multiply-add, 2*D per key for q.k and 2*D for p.v) and the fewest bytes
 * each stage must move: inputs read once, outputs written once. Intermediates are f32 as
 * in the forward's workspace (k_cmp, v_cmp in dt with --cmp16). fwd_ws: bytes of the
 * forward's workspace. */
static work stage_work(const bench_config *c, const key_sums *ks, stage_id st, double fwd_ws) {
  const double es = (double)clnsa_dtype_size(c->dt), f = 4.0, D = c->D;
  const double fc = c->cmp16 ? es : f; /* bytes of a k_cmp, v_cmp element */
  const double rows = (double)c->B * c->T * c->HQ; /* query rows */
  const double kv = (double)c->B * c->T * c->H * 2 * D * es;
  const double nb = (double)c->B * ((c->T + c->BS - 1) / c->BS) * c->H;
  const double q = rows * D * es, out = rows * (D + 1) * f; /* o and lse, f32 */
  const double gates = (c->W > 0 ? 3 : 2) * rows * es;
  const double hb = (double)c->B * c->HQ; /* rows per position */
  work w = {0, 0};
  switch (st) {
    case ST_POOL: w = (work){kv / es, kv + nb * 2 * D * fc}; break;
    case ST_COMPRESSED: w = (work){hb * ks->compressed * 4 * D, q + nb * 2 * D * fc + out}; break;
    case ST_TOPK:
      w = (work){hb * ks->topk * 2 * D,
                 q + nb * D * fc + rows * f + (double)c->B * c->T * c->H * c->S * 4};
      break;
    case ST_SELECTED:
      w = (work){hb * ks->selected * 4 * D, q + kv + (double)c->B * c->T * c->H * c->S * 4 + out};
      break;
    case ST_WINDOW: w = (work){hb * ks->window * 4 * D, q + kv + out}; break;
    case ST_DENSE: w = (work){hb * ks->dense * 4 * D, q + kv + out}; break;
    case ST_FORWARD:
      for (int s = ST_POOL; s <= ST_WINDOW; s++)
        if (s != ST_WINDOW || c->W > 0) w.flop += stage_work(c, ks, (stage_id)s, 0).flop;
      w.bytes = q + kv + gates + rows * D * es + fwd_ws;
      break;
    case ST_BACKWARD:
      w.flop = 2.5 * stage_work(c, ks, ST_FORWARD, 0).flop;
      w.bytes = 2 * (q + kv + gates) + rows * D * es + fwd_ws; /* + d_o, the saved forward */
      break;
    default: break;
  }
  return w;
}

/* ------------------------------------------------------------------------- */
/* Random inputs                                                               */
/* ------------------------------------------------------------------------- */
typedef struct prng {
  uint64_t s;
} prng;

static uint64_t prng_next(prng *r) { /* splitmix64 */
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [lo, hi) with 24 random bits. */
static float prng_float(prng *r, float lo, float hi) {
  return lo + (hi - lo) * (float)(prng_next(r) >> 40) * 0x1p-24f;
}

/* ------------------------------------------------------------------------- */
/* Buffers                                                                     */
/* ------------------------------------------------------------------------- */
typedef struct bench_set {
  cl_mem q, k, v, g_cmp, g_slc, g_swa;  /* inputs */
  cl_mem k_cmp, v_cmp, lse_cmp, idx;    /* what later stages read, made per set */
  cl_mem ws_buf;
  clnsa_workspace *ws;
} bench_set;

typedef struct bench_run {
  clnsa_context *ctx;
  const bench_options *opt;
  const device_facts *dev;
  bench_config c;
  clnsa_params p;
  unsigned stages; /* stages to time for this config */
  int nsets;
  bench_set set[MAX_SETS];
  cl_mem o32, lse32, o, d_o, dq, dk, dv, dg_cmp, dg_slc, dg_swa, flush;
  size_t flush_bytes, ws_bytes, fwd_ws_bytes;
  bool broken; /* the queue reported an error: the context is recreated */
  char why[512];
} bench_run;

static bool want(const bench_run *r, stage_id s) { return (r->stages >> s) & 1u; }
static bool needs_ws(const bench_run *r) {
  return want(r, ST_FORWARD) || want(r, ST_BACKWARD);
}
/* The f32 output and lse that the attention stages, timed alone, write. */
static bool needs_o32(const bench_run *r) {
  return (r->stages & ((1u << ST_COMPRESSED) | (1u << ST_TOPK) | (1u << ST_SELECTED) |
                       (1u << ST_WINDOW) | (1u << ST_DENSE))) != 0;
}

static const char *cl_error_name(cl_int e) {
  switch (e) {
    case CL_MEM_OBJECT_ALLOCATION_FAILURE: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_PROFILING_INFO_NOT_AVAILABLE: return "CL_PROFILING_INFO_NOT_AVAILABLE";
    default: return "OpenCL error";
  }
}

static cl_mem buffer_new(bench_run *r, size_t bytes, const char *what) {
  if (r->why[0]) return NULL; /* an earlier allocation of this config failed */
  if (bytes == 0) bytes = 4;
  if (bytes > r->dev->max_alloc) {
    snprintf(r->why, sizeof r->why, "%s needs %.2f GiB, more than one buffer may hold (%.2f GiB)",
             what, bytes / 1073741824.0, r->dev->max_alloc / 1073741824.0);
    return NULL;
  }
  cl_int err;
  cl_mem m = clCreateBuffer(clnsa_context_cl(r->ctx), CL_MEM_READ_WRITE, bytes, NULL, &err);
  if (err != CL_SUCCESS) {
    snprintf(r->why, sizeof r->why, "clCreateBuffer(%s, %.1f MiB) failed: %d (%s)", what,
             bytes / 1048576.0, (int)err, cl_error_name(err));
    return NULL;
  }
  return m;
}

/* Fills a buffer with n random values of dtype t in [lo, hi), in chunks from the host. */
static bool fill_random(bench_run *r, cl_mem m, size_t n, clnsa_dtype t, float lo, float hi,
                        prng *g) {
  enum { CHUNK = 1 << 20 };
  const size_t es = clnsa_dtype_size(t);
  unsigned char *h = malloc(CHUNK * es);
  if (!h) {
    snprintf(r->why, sizeof r->why, "out of host memory for the inputs");
    return false;
  }
  cl_int err = CL_SUCCESS;
  for (size_t at = 0; at < n && err == CL_SUCCESS; at += CHUNK) {
    size_t len = n - at < CHUNK ? n - at : CHUNK;
    for (size_t i = 0; i < len; i++) {
      float x = prng_float(g, lo, hi);
      if (t == CLNSA_F32) {
        memcpy(h + 4 * i, &x, 4);
      } else {
        uint16_t b = t == CLNSA_F16 ? cli_f32_to_f16(x) : cli_f32_to_bf16(x);
        memcpy(h + 2 * i, &b, 2);
      }
    }
    err = clEnqueueWriteBuffer(clnsa_context_queue(r->ctx), m, CL_TRUE, at * es, len * es, h, 0,
                               NULL, NULL);
  }
  free(h);
  if (err != CL_SUCCESS)
    snprintf(r->why, sizeof r->why, "uploading inputs failed: %d (%s)", (int)err,
             cl_error_name(err));
  return err == CL_SUCCESS;
}

static cl_mem random_buffer(bench_run *r, size_t n, clnsa_dtype t, float lo, float hi, prng *g,
                            const char *what) {
  cl_mem m = buffer_new(r, n * clnsa_dtype_size(t), what);
  if (m && !fill_random(r, m, n, t, lo, hi, g)) {
    clReleaseMemObject(m);
    return NULL;
  }
  return m;
}

static void release(cl_mem *m) {
  if (*m) clReleaseMemObject(*m);
  *m = NULL;
}

static void set_free(bench_set *s) {
  clnsa_workspace_destroy(s->ws);
  s->ws = NULL;
  cl_mem *all[] = {&s->q, &s->k, &s->v, &s->g_cmp, &s->g_slc, &s->g_swa,
                   &s->k_cmp, &s->v_cmp, &s->lse_cmp, &s->idx, &s->ws_buf};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) release(all[i]);
}

static void run_free(bench_run *r) {
  for (int i = 0; i < MAX_SETS; i++) set_free(&r->set[i]);
  cl_mem *all[] = {&r->o32, &r->lse32, &r->o, &r->d_o, &r->dq, &r->dk,
                   &r->dv, &r->dg_cmp, &r->dg_slc, &r->dg_swa, &r->flush};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) release(all[i]);
}

/* Element counts of the tensors of a config. */
typedef struct counts {
  size_t q, kv, rows, cmp, idx;
} counts;

static counts counts_of(const bench_config *c) {
  counts n;
  n.rows = (size_t)c->B * c->T * c->HQ;
  n.q = n.rows * c->D;
  n.kv = (size_t)c->B * c->T * c->H * c->D;
  n.cmp = (size_t)c->B * ((c->T + c->BS - 1) / c->BS) * c->H * c->D;
  n.idx = (size_t)c->B * c->T * c->H * c->S;
  return n;
}

/* The forward's workspace as nsa.c lays it out (f32, 256-byte aligned regions); only
 * for planning memory, the real size is asked from the library once inputs exist. */
static size_t ws_estimate(const bench_config *c) {
  counts n = counts_of(c);
  size_t f = 2 * n.cmp + 2 * n.rows * c->D + 2 * n.rows + n.idx;
  if (c->W > 0) f += n.rows * c->D + n.rows;
  return 4 * f + 16 * 256;
}

static size_t set_bytes(const bench_run *r, size_t ws) {
  counts n = counts_of(&r->c);
  size_t es = clnsa_dtype_size(r->c.dt), gates = r->c.W > 0 ? 3 : 2;
  return es * (n.q + 2 * n.kv + gates * n.rows) + 4 * (2 * n.cmp + n.rows + n.idx) +
         (needs_ws(r) ? ws : 0);
}

static size_t shared_bytes(const bench_run *r) {
  counts n = counts_of(&r->c);
  size_t es = clnsa_dtype_size(r->c.dt), gates = r->c.W > 0 ? 3 : 2;
  size_t b = r->flush_bytes + (needs_o32(r) ? 4 * (n.q + n.rows) : 0);
  if (needs_ws(r)) b += es * n.q;
  if (want(r, ST_BACKWARD)) b += es * (2 * n.q + 2 * n.kv + gates * n.rows);
  return b;
}

/* How many input sets fit in MEM_FRACTION of the device beside the shared buffers. */
static int plan_sets(bench_run *r, size_t ws) {
  double budget = MEM_FRACTION * (double)r->dev->global_mem - (double)shared_bytes(r);
  double per = (double)set_bytes(r, ws), k = floor(budget / per);
  return k < 1 ? 1 : k < r->opt->sets ? (int)k : r->opt->sets;
}

static bool set_inputs(bench_run *r, int i) {
  const bench_config *c = &r->c;
  bench_set *s = &r->set[i];
  counts n = counts_of(c);
  prng g = {(uint64_t)r->opt->seed * 0x2545f4914f6cdd1dull + (uint64_t)i + 1};
  s->q = random_buffer(r, n.q, c->dt, -1, 1, &g, "q");
  s->k = random_buffer(r, n.kv, c->dt, -1, 1, &g, "k");
  s->v = random_buffer(r, n.kv, c->dt, -1, 1, &g, "v");
  s->g_cmp = random_buffer(r, n.rows, c->dt, 0, 1, &g, "g_cmp");
  s->g_slc = random_buffer(r, n.rows, c->dt, 0, 1, &g, "g_slc");
  if (c->W > 0) s->g_swa = random_buffer(r, n.rows, c->dt, 0, 1, &g, "g_swa");
  s->k_cmp = buffer_new(r, 4 * n.cmp, "k_cmp");
  s->v_cmp = buffer_new(r, 4 * n.cmp, "v_cmp");
  s->lse_cmp = buffer_new(r, 4 * n.rows, "lse_cmp");
  s->idx = buffer_new(r, 4 * n.idx, "block_indices");
  return !r->why[0];
}

static bool shared_buffers(bench_run *r) {
  const bench_config *c = &r->c;
  counts n = counts_of(c);
  size_t es = clnsa_dtype_size(c->dt);
  prng g = {(uint64_t)r->opt->seed ^ 0x6a09e667f3bcc909ull};
  if (needs_o32(r)) {
    r->o32 = buffer_new(r, 4 * n.q, "stage output");
    r->lse32 = buffer_new(r, 4 * n.rows, "stage lse");
  }
  r->flush = buffer_new(r, r->flush_bytes, "cache flush");
  if (needs_ws(r)) r->o = buffer_new(r, es * n.q, "o");
  if (want(r, ST_BACKWARD)) {
    r->d_o = random_buffer(r, n.q, c->dt, -1, 1, &g, "d_o");
    r->dq = buffer_new(r, es * n.q, "dq");
    r->dk = buffer_new(r, es * n.kv, "dk");
    r->dv = buffer_new(r, es * n.kv, "dv");
    r->dg_cmp = buffer_new(r, es * n.rows, "dg_cmp");
    r->dg_slc = buffer_new(r, es * n.rows, "dg_slc");
    if (c->W > 0) r->dg_swa = buffer_new(r, es * n.rows, "dg_swa");
  }
  return !r->why[0];
}

/* ------------------------------------------------------------------------- */
/* Stage calls                                                                 */
/* ------------------------------------------------------------------------- */
typedef struct views {
  clnsa_tensor q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, lse_cmp, idx, o32, lse, o;
  clnsa_tensor d_o, dq, dk, dv, dg_cmp, dg_slc, dg_swa;
} views;

/* The dtype of the pooled keys the stages see: what the whole forward keeps (f32, or the
 * input dtype with CLNSA_FLAG_CMP_16BIT). Their buffers have room for f32. */
static clnsa_dtype cmp_dtype(const bench_run *r) {
  return r->c.cmp16 ? r->c.dt : CLNSA_F32;
}

static void make_views(const bench_run *r, const bench_set *s, views *v) {
  const bench_config *c = &r->c;
  const int64_t nb = (c->T + c->BS - 1) / c->BS;
  const int64_t sq[4] = {c->B, c->T, c->HQ, c->D}, skv[4] = {c->B, c->T, c->H, c->D};
  const int64_t scmp[4] = {c->B, nb, c->H, c->D}, srow[3] = {c->B, c->T, c->HQ};
  const int64_t sidx[4] = {c->B, c->T, c->H, c->S};
  memset(v, 0, sizeof *v);
  v->q = clnsa_tensor_make(s->q, 0, c->dt, 4, sq);
  v->k = clnsa_tensor_make(s->k, 0, c->dt, 4, skv);
  v->v = clnsa_tensor_make(s->v, 0, c->dt, 4, skv);
  v->g_cmp = clnsa_tensor_make(s->g_cmp, 0, c->dt, 3, srow);
  v->g_slc = clnsa_tensor_make(s->g_slc, 0, c->dt, 3, srow);
  v->g_swa = clnsa_tensor_make(s->g_swa, 0, c->dt, 3, srow);
  v->k_cmp = clnsa_tensor_make(s->k_cmp, 0, cmp_dtype(r), 4, scmp);
  v->v_cmp = clnsa_tensor_make(s->v_cmp, 0, cmp_dtype(r), 4, scmp);
  v->lse_cmp = clnsa_tensor_make(s->lse_cmp, 0, CLNSA_F32, 3, srow);
  v->idx = clnsa_tensor_make(s->idx, 0, CLNSA_I32, 4, sidx);
  v->o32 = clnsa_tensor_make(r->o32, 0, CLNSA_F32, 4, sq);
  v->lse = clnsa_tensor_make(r->lse32, 0, CLNSA_F32, 3, srow);
  v->o = clnsa_tensor_make(r->o, 0, c->dt, 4, sq);
  v->d_o = clnsa_tensor_make(r->d_o, 0, c->dt, 4, sq);
  v->dq = clnsa_tensor_make(r->dq, 0, c->dt, 4, sq);
  v->dk = clnsa_tensor_make(r->dk, 0, c->dt, 4, skv);
  v->dv = clnsa_tensor_make(r->dv, 0, c->dt, 4, skv);
  v->dg_cmp = clnsa_tensor_make(r->dg_cmp, 0, c->dt, 3, srow);
  v->dg_slc = clnsa_tensor_make(r->dg_slc, 0, c->dt, 3, srow);
  v->dg_swa = clnsa_tensor_make(r->dg_swa, 0, c->dt, 3, srow);
}

static clnsa_inputs make_inputs(const bench_run *r, const views *v) {
  clnsa_inputs in;
  memset(&in, 0, sizeof in);
  in.q = &v->q, in.k = &v->k, in.v = &v->v;
  in.g_cmp = &v->g_cmp, in.g_slc = &v->g_slc;
  in.g_swa = r->c.W > 0 ? &v->g_swa : NULL;
  return in;
}

/* Enqueues one stage on input set `si`; *ev receives its last event. */
static clnsa_status call_stage(bench_run *r, stage_id st, int si, cl_event *ev) {
  clnsa_context *ctx = r->ctx;
  const clnsa_params *p = &r->p;
  bench_set *s = &r->set[si];
  views v;
  make_views(r, s, &v);
  clnsa_inputs in = make_inputs(r, &v);
  clnsa_params dense = *p;
  dense.window = r->c.T; /* window >= TK: dense causal attention */
  switch (st) {
    case ST_POOL: return clnsa_pool(ctx, p, NULL, &v.k, &v.v, &v.k_cmp, &v.v_cmp, 0, NULL, ev);
    case ST_COMPRESSED:
      return clnsa_compressed_attention(ctx, p, NULL, &v.q, &v.k_cmp, &v.v_cmp, &v.o32,
                                        &v.lse_cmp, 0, NULL, ev);
    case ST_TOPK:
      return clnsa_topk(ctx, p, NULL, &v.q, &v.k_cmp, &v.lse_cmp, NULL, &v.idx, 0, NULL, ev);
    case ST_SELECTED:
      return clnsa_selected_attention(ctx, p, NULL, &v.q, &v.k, &v.v, &v.idx, &v.o32, &v.lse,
                                      0, NULL, ev);
    case ST_WINDOW:
      return clnsa_window_attention(ctx, p, NULL, &v.q, &v.k, &v.v, &v.o32, &v.lse, 0, NULL, ev);
    case ST_DENSE:
      return clnsa_window_attention(ctx, &dense, NULL, &v.q, &v.k, &v.v, &v.o32, &v.lse, 0,
                                    NULL, ev);
    case ST_FORWARD: return clnsa_forward(ctx, p, &in, &v.o, s->ws, 0, NULL, ev);
    case ST_BACKWARD: {
      clnsa_grads g = {&v.dq, &v.dk, &v.dv, &v.dg_cmp, &v.dg_slc,
                       r->c.W > 0 ? &v.dg_swa : NULL};
      return clnsa_backward(ctx, p, &in, &v.d_o, &g, s->ws, 0, NULL, ev);
    }
    default: return CLNSA_ERR_INVALID_ARGUMENT;
  }
}

/* Block indices as top-k would shape them (forced IC, IC-1, 0, then random distinct
 * blocks, ascending, -1 padded), for when clnsa_topk itself cannot run. */
static bool host_indices(bench_run *r, bench_set *s, prng *g) {
  const bench_config *c = &r->c;
  const size_t nrow = (size_t)c->B * c->T * c->H;
  int32_t *h = malloc(nrow * c->S * sizeof *h);
  if (!h) return false;
  for (size_t row = 0; row < nrow; row++) {
    int32_t *x = h + row * c->S;
    int ic = (int)(row / c->H % c->T) / c->BS, n = 0;
    for (int j = 0; j < c->S; j++) x[j] = -1;
    if (ic + 1 <= c->S) {
      for (n = 0; n <= ic; n++) x[n] = n;
    } else {
      int forced[3] = {ic, ic - 1, 0};
      for (int j = 0; j < 3 && n < c->S; j++) x[n++] = forced[j];
      while (n < c->S) {
        int b = (int)(prng_next(g) % (uint64_t)(ic + 1)), dup = 0;
        for (int j = 0; j < n; j++) dup |= x[j] == b;
        if (!dup) x[n++] = b;
      }
    }
    for (int i = 1; i < n; i++) /* insertion sort: n <= 128 */
      for (int j = i; j > 0 && x[j - 1] > x[j]; j--) {
        int32_t t = x[j];
        x[j] = x[j - 1], x[j - 1] = t;
      }
  }
  cl_int err = clEnqueueWriteBuffer(clnsa_context_queue(r->ctx), s->idx, CL_TRUE, 0,
                                    nrow * c->S * sizeof *h, h, 0, NULL, NULL);
  free(h);
  return err == CL_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Preparing the input sets                                                     */
/* ------------------------------------------------------------------------- */
typedef struct stage_result {
  bool asked;       /* in --stages */
  int n;            /* timed runs */
  double med, min;  /* ms */
  clnsa_status st;  /* of the failing call, or CLNSA_SUCCESS */
  char note[256];   /* why there is no time */
} stage_result;

/* "<status>: <last message>", or the status alone when the library left no message. */
static void status_note(char *note, size_t len, const char *prefix, clnsa_context *ctx,
                        clnsa_status s) {
  const char *msg = clnsa_last_message(ctx);
  snprintf(note, len, "%s%s%s%s", prefix, clnsa_status_string(s), msg && *msg ? ": " : "",
           msg && *msg ? msg : "");
}

/* Runs a stage once and waits for it. */
static clnsa_status run_once(bench_run *r, stage_id st, int si, char *note, size_t len) {
  cl_event ev = NULL;
  clnsa_status s = call_stage(r, st, si, &ev);
  if (s != CLNSA_SUCCESS) {
    status_note(note, len, "", r->ctx, s);
    return s;
  }
  cl_int err = clFinish(clnsa_context_queue(r->ctx));
  clReleaseEvent(ev);
  if (err != CL_SUCCESS) {
    snprintf(note, len, "the queue failed: %d (%s)", (int)err, cl_error_name(err));
    r->broken = true;
    return CLNSA_ERR_OPENCL;
  }
  return CLNSA_SUCCESS;
}

static void note_fallback(bench_run *r, stage_id st, const char *why, const char *instead) {
  if (!r->opt->quiet)
    fprintf(stderr, PROG ": note: %s failed (%s); later stages read %s instead\n",
            STAGE_NAME[st], why, instead);
}

/* After a failed queue: the config is skipped, the reason in r->why. */
static bool queue_failed(bench_run *r, stage_id st, const char *why) {
  snprintf(r->why, sizeof r->why, "%s while preparing the inputs: %s", STAGE_NAME[st], why);
  return false;
}

/* Produces what the asked stages read (pooled k/v, lse_cmp, block indices) with the
 * stages themselves, falling back to random data where a stage cannot run. */
static bool prepare_set(bench_run *r, int si, stage_result *res) {
  bench_set *s = &r->set[si];
  counts n = counts_of(&r->c);
  prng g = {(uint64_t)r->opt->seed * 0x9e3779b97f4a7c15ull + 77u * (uint64_t)si};
  const bool need_idx = want(r, ST_SELECTED), need_lse = need_idx || want(r, ST_TOPK);
  const bool need_cmp = need_lse || want(r, ST_COMPRESSED);
  char why[200];
  if (need_cmp && run_once(r, ST_POOL, si, why, sizeof why) != CLNSA_SUCCESS) {
    if (r->broken) return queue_failed(r, ST_POOL, why);
    if (si == 0) note_fallback(r, ST_POOL, why, "random pooled keys");
    if (!fill_random(r, s->k_cmp, n.cmp, cmp_dtype(r), -1, 1, &g) ||
        !fill_random(r, s->v_cmp, n.cmp, cmp_dtype(r), -1, 1, &g))
      return false;
  }
  if (need_lse && run_once(r, ST_COMPRESSED, si, why, sizeof why) != CLNSA_SUCCESS) {
    if (r->broken) return queue_failed(r, ST_COMPRESSED, why);
    if (si == 0) note_fallback(r, ST_COMPRESSED, why, "a random lse_cmp");
    if (!fill_random(r, s->lse_cmp, n.rows, CLNSA_F32, 1, 4, &g)) return false;
  }
  if (need_idx && run_once(r, ST_TOPK, si, why, sizeof why) != CLNSA_SUCCESS) {
    if (r->broken) return queue_failed(r, ST_TOPK, why);
    if (si == 0) note_fallback(r, ST_TOPK, why, "random block indices");
    if (!host_indices(r, s, &g)) {
      snprintf(r->why, sizeof r->why, "writing random block indices failed");
      return false;
    }
  }
  /* The backward reads what the last forward on this workspace saved. */
  clnsa_status fs;
  if (s->ws && want(r, ST_BACKWARD) &&
      (fs = run_once(r, ST_FORWARD, si, why, sizeof why)) != CLNSA_SUCCESS) {
    if (r->broken) return queue_failed(r, ST_FORWARD, why);
    res[ST_BACKWARD].st = fs;
    snprintf(res[ST_BACKWARD].note, sizeof res[ST_BACKWARD].note, "needs a forward: %s", why);
  }
  return true;
}

/* Asks the library for the workspace size (inputs must exist, so set 0 is made first). */
static void query_workspace(bench_run *r, stage_result *res) {
  views v;
  make_views(r, &r->set[0], &v);
  clnsa_inputs in = make_inputs(r, &v);
  size_t fwd = 0, bwd = 0;
  clnsa_status s = clnsa_forward_workspace_size(r->ctx, &r->p, &in, &fwd);
  if (s == CLNSA_SUCCESS && want(r, ST_BACKWARD))
    s = clnsa_backward_workspace_size(r->ctx, &r->p, &in, &bwd);
  if (s != CLNSA_SUCCESS) {
    for (int st = ST_FORWARD; st <= ST_BACKWARD; st++) {
      res[st].st = s;
      status_note(res[st].note, sizeof res[st].note, "workspace size: ", r->ctx, s);
    }
    r->ws_bytes = 0;
    return;
  }
  r->fwd_ws_bytes = fwd;
  r->ws_bytes = bwd > fwd ? bwd : fwd;
}

static bool make_workspace(bench_run *r, int si) {
  bench_set *s = &r->set[si];
  s->ws_buf = buffer_new(r, r->ws_bytes, "workspace");
  if (!s->ws_buf) return false;
  clnsa_status st = clnsa_workspace_create(r->ctx, s->ws_buf, 0, r->ws_bytes, &s->ws);
  if (st != CLNSA_SUCCESS)
    status_note(r->why, sizeof r->why, "clnsa_workspace_create: ", r->ctx, st);
  return st == CLNSA_SUCCESS;
}

/* Allocates and fills everything; false (r->why says why) skips the config. */
static bool prepare(bench_run *r, stage_result *res) {
  const double gib = 1073741824.0;
  size_t est_ws = ws_estimate(&r->c);
  double one = (double)shared_bytes(r) + (double)set_bytes(r, est_ws);
  if (one > (double)r->dev->global_mem) {
    snprintf(r->why, sizeof r->why,
             "needs about %.2f GiB with one input set, the device has %.2f GiB", one / gib,
             r->dev->global_mem / gib);
    return false;
  }
  r->nsets = plan_sets(r, est_ws);
  if (!shared_buffers(r) || !set_inputs(r, 0)) return false;
  if (needs_ws(r)) {
    query_workspace(r, res);
    if (r->ws_bytes) r->nsets = plan_sets(r, r->ws_bytes);
  }
  for (int i = 1; i < r->nsets; i++)
    if (!set_inputs(r, i)) return false;
  for (int i = 0; i < r->nsets; i++) {
    if (r->ws_bytes && !make_workspace(r, i)) return false;
    if (!prepare_set(r, i, res)) return false;
  }
  if (r->nsets < r->opt->sets && !r->opt->quiet)
    fprintf(stderr, PROG ": note: %d input set%s instead of %d (%.0f%% of device memory)\n",
            r->nsets, r->nsets == 1 ? "" : "s", r->opt->sets, 100 * MEM_FRACTION);
  return true;
}

/* ------------------------------------------------------------------------- */
/* Timing                                                                      */
/* ------------------------------------------------------------------------- */
static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static cl_int event_end(cl_event e, cl_ulong *t) {
  return clGetEventProfilingInfo(e, CL_PROFILING_COMMAND_END, sizeof *t, t, NULL);
}

/* One run: the cache-evicting write, then the stage. Returns the ms between the write's
 * end and the stage's end, or a negative value with res->note set. */
static double timed_run(bench_run *r, stage_id st, int si, stage_result *res) {
  cl_command_queue q = clnsa_context_queue(r->ctx);
  cl_event fev = NULL, ev = NULL;
  const cl_uint pattern = 0x3c003c00u;
  cl_int err = clEnqueueFillBuffer(q, r->flush, &pattern, sizeof pattern, 0, r->flush_bytes, 0,
                                   NULL, &fev);
  if (err != CL_SUCCESS) {
    snprintf(res->note, sizeof res->note, "clEnqueueFillBuffer: %d (%s)", (int)err,
             cl_error_name(err));
    res->st = CLNSA_ERR_OPENCL;
    return -1;
  }
  clnsa_status s = call_stage(r, st, si, &ev);
  if (s != CLNSA_SUCCESS) {
    res->st = s;
    status_note(res->note, sizeof res->note, "", r->ctx, s);
  }
  cl_ulong t0 = 0, t1 = 0;
  err = clFinish(q);
  if (err != CL_SUCCESS) {
    r->broken = true;
    res->st = CLNSA_ERR_OPENCL;
    snprintf(res->note, sizeof res->note, "the queue failed: %d (%s)", (int)err,
             cl_error_name(err));
  } else if (s == CLNSA_SUCCESS && ((err = event_end(fev, &t0)) != CL_SUCCESS ||
                                    (err = event_end(ev, &t1)) != CL_SUCCESS)) {
    res->st = CLNSA_ERR_OPENCL;
    snprintf(res->note, sizeof res->note, "clGetEventProfilingInfo: %d (%s)", (int)err,
             cl_error_name(err));
  }
  clReleaseEvent(fev);
  if (ev) clReleaseEvent(ev);
  return res->st == CLNSA_SUCCESS ? (double)(t1 - t0) * 1e-6 : -1;
}

static void time_stage(bench_run *r, stage_id st, stage_result *res) {
  const int warm = r->opt->warmup * r->nsets, total = warm + r->opt->repeat;
  double *ms = malloc((size_t)r->opt->repeat * sizeof *ms);
  if (!ms) {
    res->st = CLNSA_ERR_OUT_OF_HOST_MEMORY;
    snprintf(res->note, sizeof res->note, "out of host memory");
    return;
  }
  res->n = 0;
  for (int i = 0; i < total; i++) {
    double t = timed_run(r, st, i % r->nsets, res);
    if (t < 0) break;
    if (i >= warm) ms[res->n++] = t;
  }
  if (res->st == CLNSA_SUCCESS && res->n > 0) {
    qsort(ms, (size_t)res->n, sizeof *ms, cmp_double);
    res->min = ms[0];
    res->med = res->n % 2 ? ms[res->n / 2] : 0.5 * (ms[res->n / 2 - 1] + ms[res->n / 2]);
  } else {
    res->n = 0;
  }
  free(ms);
}

/* ------------------------------------------------------------------------- */
/* Reporting                                                                   */
/* ------------------------------------------------------------------------- */
static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      fprintf(f, "\\%c", ch);
    else if (ch < 0x20)
      fprintf(f, "\\u%04x", ch);
    else
      fputc(ch, f);
  }
  fputc('"', f);
}

static void json_number(FILE *f, const char *key, double x, bool valid) {
  if (valid && isfinite(x))
    fprintf(f, ",\"%s\":%.6g", key, x);
  else
    fprintf(f, ",\"%s\":null", key);
}

/* The dtype column: the storage type, "tf32" for f32 run with CLNSA_FLAG_TF32, "bf16c"
 * and "f16c" for 16-bit runs with CLNSA_FLAG_CMP_16BIT. */
static const char *dtype_label(const bench_run *r) {
  if (r->p.flags & CLNSA_FLAG_TF32) return "tf32";
  if (r->c.cmp16) return r->c.dt == CLNSA_F16 ? "f16c" : "bf16c";
  return cli_dtype_name(r->c.dt);
}

static void json_line(FILE *f, const bench_run *r, stage_id st, const stage_result *res,
                      work w) {
  const bench_config *c = &r->c;
  char date[32];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
  const bool ok = res->n > 0;
  fputs("{\"device\":", f);
  json_string(f, r->dev->name);
  fprintf(f,
          ",\"date\":\"%s\",\"T\":%d,\"B\":%d,\"HQ\":%d,\"H\":%d,\"G\":%d,\"DK\":%d,\"DV\":%d,"
          "\"BS\":%d,\"S\":%d,\"W\":%d,\"dtype\":\"%s\",\"stage\":\"%s\"",
          date, c->T, c->B, c->HQ, c->H, c->G, c->D, c->D, c->BS, c->S, c->W,
          dtype_label(r), STAGE_NAME[st]);
  json_number(f, "ms_median", res->med, ok);
  json_number(f, "ms_min", res->min, ok);
  fprintf(f, ",\"repeats\":%d", res->n);
  json_number(f, "tflops", w.flop / (res->med * 1e-3) / 1e12, ok);
  json_number(f, "gbps", w.bytes / (res->med * 1e-3) / 1e9, ok);
  fprintf(f, ",\"sets\":%d", r->nsets);
  json_number(f, "flop", w.flop, true);
  json_number(f, "bytes", w.bytes, true);
  if (!ok) {
    fputs(",\"error\":", f);
    json_string(f, res->note);
  }
  fputs("}\n", f);
  fflush(f);
}

static void table_header(void) {
  printf("%7s %-5s %4s %5s %-10s %4s %11s %11s %8s %8s %10s %8s\n", "T", "dtype", "G", "HQ",
         "stage", "sets", "ms(median)", "ms(min)", "TFLOP/s", "GB/s", "dense ms", "dense/x");
}

static void table_row(const bench_run *r, stage_id st, const stage_result *res, work w,
                      const stage_result *dense) {
  const bench_config *c = &r->c;
  printf("%7d %-5s %4d %5d %-10s %4d ", c->T, dtype_label(r), c->G, c->HQ,
         STAGE_NAME[st], r->nsets);
  if (res->n == 0) {
    printf("%11s %11s %8s %8s", "n/a", "n/a", "-", "-");
  } else {
    double s = res->med * 1e-3;
    printf("%11.4f %11.4f %8.3g %8.1f", res->med, res->min, w.flop / s / 1e12,
           w.bytes / s / 1e9);
  }
  /* Dense forward is the yardstick of the forward stages; there is no dense backward. */
  if (st == ST_DENSE || st == ST_BACKWARD || !dense->asked)
    printf(" %10s %8s\n", "-", "-");
  else if (dense->n == 0)
    printf(" %10s %8s\n", "n/a", "n/a");
  else if (res->n == 0)
    printf(" %10.4f %8s\n", dense->med, "n/a");
  else
    printf(" %10.4f %8.2f\n", dense->med, dense->med / res->med);
  fflush(stdout);
}

/* ------------------------------------------------------------------------- */
/* The sweep                                                                   */
/* ------------------------------------------------------------------------- */
typedef struct sweep {
  const bench_options *opt;
  clnsa_context *ctx;
  device_facts dev;
  FILE *json;
  int index, total;
  int measured, failed; /* stages timed; stages failed with a real error */
} sweep;

static bool dense_allowed(const sweep *w, int T, char *note, size_t len) {
  int limit = w->opt->dense_max_seq >= 0 ? w->opt->dense_max_seq : w->dev.cpu ? 4096 : 0;
  if (limit == 0 || T <= limit) return true;
  snprintf(note, len, "skipped: T > %d on this device (--dense-max-seq)", limit);
  return false;
}

static void report_config(sweep *w, const bench_run *r, stage_result *res) {
  key_sums ks = key_sums_of(&r->c);
  double fwd_ws = r->fwd_ws_bytes ? (double)r->fwd_ws_bytes : (double)ws_estimate(&r->c);
  for (int st = 0; st < ST_COUNT; st++) {
    if (!res[st].asked) continue;
    work wk = stage_work(&r->c, &ks, (stage_id)st, fwd_ws);
    table_row(r, (stage_id)st, &res[st], wk, &res[ST_DENSE]);
    if (w->json) json_line(w->json, r, (stage_id)st, &res[st], wk);
    if (res[st].n > 0) w->measured++;
    if (res[st].n == 0 && res[st].note[0])
      fprintf(stderr, PROG ": T=%d %s G=%d %s: n/a: %s\n", r->c.T, cli_dtype_name(r->c.dt),
              r->c.G, STAGE_NAME[st], res[st].note);
    if (res[st].n == 0 && res[st].st != CLNSA_SUCCESS && res[st].st != CLNSA_ERR_UNSUPPORTED)
      w->failed++;
  }
}

static void run_config(sweep *w, bench_run *r) {
  stage_result res[ST_COUNT];
  memset(res, 0, sizeof res);
  for (int st = 0; st < ST_COUNT; st++) res[st].asked = want(r, (stage_id)st);
  const char *dt = cli_dtype_name(r->c.dt);
  if (!dense_allowed(w, r->c.T, res[ST_DENSE].note, sizeof res[ST_DENSE].note))
    r->stages &= ~(1u << ST_DENSE);
  if (!w->opt->quiet)
    fprintf(stderr, PROG ": [%d/%d] T=%d %s G=%d HQ=%d: preparing inputs\n", w->index, w->total,
            r->c.T, dt, r->c.G, r->c.HQ);
  if (!prepare(r, res)) {
    fprintf(stderr, PROG ": T=%d %s G=%d: config skipped: %s\n", r->c.T, dt, r->c.G,
            r->why);
    return;
  }
  for (int st = 0; st < ST_COUNT && !r->broken; st++) {
    if (!want(r, (stage_id)st) || res[st].note[0]) continue;
    if (!w->opt->quiet)
      fprintf(stderr, PROG ": [%d/%d] T=%d %s G=%d: %s\n", w->index, w->total, r->c.T, dt,
              r->c.G, STAGE_NAME[st]);
    time_stage(r, (stage_id)st, &res[st]);
  }
  report_config(w, r, res);
}

static bool sweep_one(sweep *w, clnsa_dtype dt, int G, int T) {
  const bench_options *o = w->opt;
  bench_run *r = calloc(1, sizeof *r);
  if (!r) return false;
  r->ctx = w->ctx, r->opt = o, r->dev = &w->dev;
  r->c = (bench_config){o->batch, T, o->heads, G, o->heads * G, o->dim,
                        o->block_size, o->block_count, o->window, dt, false};
  r->p = clnsa_params_default();
  r->p.block_size = o->block_size, r->p.block_count = o->block_count, r->p.window = o->window;
  if (o->tf32 && dt == CLNSA_F32) r->p.flags |= CLNSA_FLAG_TF32;
  if (o->cmp16 && dt != CLNSA_F32) r->p.flags |= CLNSA_FLAG_CMP_16BIT, r->c.cmp16 = true;
  r->stages = o->stages;
  r->flush_bytes = flush_bytes(o, &w->dev);
  run_config(w, r);
  clFinish(clnsa_context_queue(w->ctx));
  run_free(r);
  bool broken = r->broken;
  free(r);
  if (!broken) return true;
  /* A failed queue can poison the context: start the next config on a fresh one. */
  fprintf(stderr, PROG ": the OpenCL queue failed; reopening the device\n");
  clnsa_context_destroy(w->ctx);
  w->ctx = cli_open_context(PROG, o->device);
  return w->ctx != NULL;
}

static void print_preamble(const sweep *w, size_t flush) {
  const bench_options *o = w->opt;
  printf("# clnsa bench on %s (%s, %.1f GiB): B=%d H=%d D=%d BS=%d S=%d W=%d; median of %d "
         "runs after %d warm-up run%s per input set; %.0f MiB cache flush before each run\n",
         w->dev.name, w->dev.cpu ? "CPU" : w->dev.gpu ? "GPU" : "other",
         w->dev.global_mem / 1073741824.0, o->batch, o->heads, o->dim, o->block_size,
         o->block_count, o->window, o->repeat, o->warmup, o->warmup == 1 ? "" : "s",
         (double)flush / (double)MIB);
  table_header();
  fflush(stdout);
}

int cmd_bench(int argc, char **argv) {
  bench_options o;
  int rc = parse_options(argc, argv, &o);
  if (rc >= 0) return rc;
  sweep w = {&o, NULL, {{0}, false, false, 0, 0, 0}, NULL, 0, 0, 0, 0};
  w.ctx = cli_open_context(PROG, o.device);
  if (!w.ctx) return CLI_EXIT_FAIL;
  device_facts_query(w.ctx, &w.dev);
  if (o.nseq == 0) {
    static const int gpu_seq[] = {8192, 16384, 32768, 65536}, cpu_seq[] = {1024, 2048};
    const int *def = w.dev.gpu ? gpu_seq : cpu_seq;
    o.nseq = w.dev.gpu ? 4 : 2;
    memcpy(o.seq, def, (size_t)o.nseq * sizeof *def);
  }
  if (o.json && !(w.json = fopen(o.json, "w"))) {
    fprintf(stderr, PROG ": cannot write %s\n", o.json);
    clnsa_context_destroy(w.ctx);
    return CLI_EXIT_FAIL;
  }
  print_preamble(&w, flush_bytes(&o, &w.dev));
  w.total = o.ndtype * o.ngroup * o.nseq;
  bool alive = true;
  for (int a = 0; a < o.ndtype && alive; a++)
    for (int b = 0; b < o.ngroup && alive; b++)
      for (int c = 0; c < o.nseq && alive; c++) {
        w.index++;
        alive = sweep_one(&w, o.dtype[a], o.group[b], o.seq[c]);
      }
  if (w.json) fclose(w.json);
  clnsa_context_destroy(w.ctx);
  if (!alive) return CLI_EXIT_FAIL;
  return w.failed > 0 || w.measured == 0 ? CLI_EXIT_FAIL : 0;
}
