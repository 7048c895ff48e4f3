/* What several subcommands of the clnsa tool share: option values, dtype conversions on
 * the host, and uploads/downloads through the context's queue. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cli.h"

/* ------------------------------------------------------------------------- */
/* Option values                                                               */
/* ------------------------------------------------------------------------- */
bool cli_parse_int(const char *s, long lo, long hi, int *out) {
  if (!s || !*s) return false;
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || v < lo || v > hi) return false;
  *out = (int)v;
  return true;
}

bool cli_parse_float(const char *s, float *out) {
  if (!s || !*s) return false;
  char *end;
  errno = 0;
  float v = strtof(s, &end);
  if (errno || *end || !isfinite(v)) return false;
  *out = v;
  return true;
}

bool cli_parse_dtype(const char *s, clnsa_dtype *out) {
  static const struct {
    const char *name;
    clnsa_dtype t;
  } names[] = {{"f32", CLNSA_F32},     {"float32", CLNSA_F32}, {"f16", CLNSA_F16},
               {"float16", CLNSA_F16}, {"bf16", CLNSA_BF16},   {"bfloat16", CLNSA_BF16}};
  for (size_t i = 0; s && i < sizeof names / sizeof names[0]; i++)
    if (strcasecmp(s, names[i].name) == 0) {
      *out = names[i].t;
      return true;
    }
  return false;
}

const char *cli_dtype_name(clnsa_dtype t) {
  switch (t) {
    case CLNSA_F32:
      return "f32";
    case CLNSA_F16:
      return "f16";
    case CLNSA_BF16:
      return "bf16";
    case CLNSA_I32:
      return "i32";
  }
  return "?";
}

double cli_dtype_tolerance(clnsa_dtype t) {
  return t == CLNSA_F16 ? 5e-3 : t == CLNSA_BF16 ? 2e-2 : 1e-5;
}

/* ------------------------------------------------------------------------- */
/* Storage conversions                                                         */
/* ------------------------------------------------------------------------- */
static uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t cli_f32_to_f16(float f) {
  uint32_t x = bits_of(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  /* NaN stays a quiet NaN */
  if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to infinity */
  if (a >= 0x38800000u) {                      /* normal in f16: >= 2^-14 */
    uint32_t r = a - 0x38000000u;              /* rebias the exponent 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | (uint16_t)(r >> 13);
  }
  /* Subnormal in f16: the result counts units of 2^-24. */
  int e = (int)(a >> 23);
  if (e < 102) return sign; /* below 2^-25: rounds to zero */
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  int shift = 126 - e; /* 14 .. 24 */
  uint32_t r = (m + (1u << (shift - 1)) - 1u + ((m >> shift) & 1u)) >> shift;
  return sign | (uint16_t)r;
}

float cli_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
  if (e == 0) { /* zero or subnormal: m * 2^-24, exact in float */
    float v = (float)m * 0x1p-24f;
    return sign ? -v : v;
  }
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t cli_f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float cli_bf16_to_f32(uint16_t h) {
  return float_of((uint32_t)h << 16);
}

float cli_round_to(clnsa_dtype t, float x) {
  if (t == CLNSA_F16) return cli_f16_to_f32(cli_f32_to_f16(x));
  if (t == CLNSA_BF16) return cli_bf16_to_f32(cli_f32_to_bf16(x));
  return x;
}

/* ------------------------------------------------------------------------- */
/* Device helpers                                                              */
/* ------------------------------------------------------------------------- */
void cli_report(const char *prog, clnsa_context *ctx, clnsa_status st) {
  const char *msg = ctx ? clnsa_last_message(ctx) : NULL;
  if (msg && *msg)
    fprintf(stderr, "%s: %s: %s\n", prog, clnsa_status_string(st), msg);
  else
    fprintf(stderr, "%s: %s\n", prog, clnsa_status_string(st));
}

clnsa_context *cli_open_context(const char *prog, const char *selector) {
  clnsa_context *ctx = NULL;
  clnsa_status st = clnsa_context_create_from_selector(selector, &ctx);
  if (st == CLNSA_SUCCESS) return ctx;
  /* The context could not say why; the selector can (e.g. which name matched nothing). */
  char why[512] = "";
  cl_platform_id p;
  cl_device_id d;
  if (clnsa_select_device(selector, &p, &d, why, sizeof why) == CLNSA_SUCCESS || !*why)
    snprintf(why, sizeof why, "creating an OpenCL context or queue on the device failed");
  fprintf(stderr, "%s: %s: %s\n", prog, clnsa_status_string(st), why);
  return NULL;
}

static cl_mem create_buffer(const char *prog, clnsa_context *ctx, cl_mem_flags flags, size_t bytes,
                            void *host) {
  cl_int err;
  /* OpenCL refuses empty buffers; an empty tensor still needs a valid handle. */
  bool copy = bytes && host;
  cl_mem m = clCreateBuffer(clnsa_context_cl(ctx), flags | (copy ? CL_MEM_COPY_HOST_PTR : 0),
                            bytes ? bytes : 16, copy ? host : NULL, &err);
  if (err != CL_SUCCESS) {
    fprintf(stderr, "%s: %s: clCreateBuffer(%zu bytes) returned %d\n", prog,
            clnsa_status_string(CLNSA_ERR_OPENCL), bytes, (int)err);
    return NULL;
  }
  return m;
}

cl_mem cli_alloc(const char *prog, clnsa_context *ctx, size_t bytes) {
  return create_buffer(prog, ctx, CL_MEM_READ_WRITE, bytes, NULL);
}

cl_mem cli_upload_floats(const char *prog, clnsa_context *ctx, clnsa_dtype t, const float *x,
                         size_t n) {
  if (t == CLNSA_F32 || n == 0)
    return create_buffer(prog, ctx, CL_MEM_READ_ONLY, n * sizeof(float), n ? (void *)x : NULL);
  uint16_t *h = malloc(n * sizeof *h);
  if (!h) {
    fprintf(stderr, "%s: %s\n", prog, clnsa_status_string(CLNSA_ERR_OUT_OF_HOST_MEMORY));
    return NULL;
  }
  for (size_t i = 0; i < n; i++)
    h[i] = t == CLNSA_F16 ? cli_f32_to_f16(x[i]) : cli_f32_to_bf16(x[i]);
  cl_mem m = create_buffer(prog, ctx, CL_MEM_READ_ONLY, n * sizeof *h, h);
  free(h);
  return m;
}

cl_mem cli_upload_ints(const char *prog, clnsa_context *ctx, const int32_t *x, size_t n) {
  return create_buffer(prog, ctx, CL_MEM_READ_ONLY, n * sizeof *x, n ? (void *)x : NULL);
}

size_t cli_tensor_count(const clnsa_tensor *t) {
  size_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
  return n;
}

/* Converts element `src` of raw storage into dense output slot `dst`. */
static void store_elem(clnsa_dtype t, const unsigned char *raw, size_t src, void *out, size_t dst) {
  if (t == CLNSA_I32) {
    memcpy((int32_t *)out + dst, raw + src * 4, 4);
  } else if (t == CLNSA_F32) {
    memcpy((float *)out + dst, raw + src * 4, 4);
  } else {
    uint16_t h;
    memcpy(&h, raw + src * 2, 2);
    ((float *)out)[dst] = t == CLNSA_F16 ? cli_f16_to_f32(h) : cli_bf16_to_f32(h);
  }
}

bool cli_download(const char *prog, clnsa_context *ctx, const clnsa_tensor *t, void *out) {
  size_t count = cli_tensor_count(t), esize = clnsa_dtype_size(t->dtype);
  if (count == 0) return true;
  size_t span = 1; /* elements from the view's first to its last, inclusive */
  for (int i = 0; i < t->ndim; i++) span += (size_t)(t->shape[i] - 1) * (size_t)t->strides[i];
  unsigned char *raw = malloc(span * esize);
  if (!raw) {
    fprintf(stderr, "%s: %s\n", prog, clnsa_status_string(CLNSA_ERR_OUT_OF_HOST_MEMORY));
    return false;
  }
  cl_int err = clEnqueueReadBuffer(clnsa_context_queue(ctx), t->buffer, CL_TRUE, t->offset * esize,
                                   span * esize, raw, 0, NULL, NULL);
  if (err != CL_SUCCESS) {
    fprintf(stderr, "%s: %s: clEnqueueReadBuffer returned %d\n", prog,
            clnsa_status_string(CLNSA_ERR_OPENCL), (int)err);
    free(raw);
    return false;
  }
  int64_t idx[CLNSA_MAX_DIMS] = {0};
  for (size_t n = 0; n < count; n++) {
    size_t src = 0;
    for (int i = 0; i < t->ndim; i++) src += (size_t)idx[i] * (size_t)t->strides[i];
    store_elem(t->dtype, raw, src, out, n);
    for (int i = t->ndim - 1; i >= 0 && ++idx[i] == t->shape[i]; i--) idx[i] = 0;
  }
  free(raw);
  return true;
}
