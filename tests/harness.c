#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

clnsa_context *harness_context(void) {
  clnsa_context *ctx = NULL;
  clnsa_status st = clnsa_context_create_from_selector(NULL, &ctx);
  if (st == CLNSA_ERR_NO_DEVICE) {
    printf("# SKIP: no OpenCL device (%s)\n", clnsa_status_string(st));
    exit(SKIP_EXIT);
  }
  if (st != CLNSA_SUCCESS) {
    fprintf(stderr, "cannot create a context: %s\n", clnsa_status_string(st));
    exit(1);
  }
  char name[256] = "";
  clGetDeviceInfo(clnsa_context_device(ctx), CL_DEVICE_NAME, sizeof name - 1, name, NULL);
  printf("# device: %s\n", name);
  return ctx;
}

void harness_tune_append(const char *setting) {
  const char *old = getenv("CLNSA_TUNE");
  char tune[512];
  snprintf(tune, sizeof tune, "%s%s%s", old ? old : "", old && *old ? "," : "", setting);
  setenv("CLNSA_TUNE", tune, 1);
}

/* CLNSA_TUNE as it is now (NULL: unset), for tune_restore. */
static char *tune_save(void) {
  const char *now = getenv("CLNSA_TUNE");
  return now ? strdup(now) : NULL;
}

/* Puts CLNSA_TUNE back as tune_save found it, and frees the copy. */
static void tune_restore(char *saved) {
  if (saved)
    setenv("CLNSA_TUNE", saved, 1);
  else
    unsetenv("CLNSA_TUNE");
  free(saved);
}

static char *tune_before; /* CLNSA_TUNE before the running test's first extension */
static bool tune_extended;

void harness_tune_extend(const char *setting) {
  if (!tune_extended) tune_before = tune_save();
  tune_extended = true;
  harness_tune_append(setting);
}

int harness_tune_teardown(void **state) {
  (void)state;
  if (tune_extended) tune_restore(tune_before);
  tune_before = NULL;
  tune_extended = false;
  return 0;
}

static bool tensor_cores_path(clnsa_context *ctx) {
  cl_uint vendor = 0;
  clGetDeviceInfo(clnsa_context_device(ctx), CL_DEVICE_VENDOR_ID, sizeof vendor, &vendor, NULL);
  if (vendor != 0x10DE) harness_tune_append("MMA=2");
  const clnsa_mma want = vendor == 0x10DE ? CLNSA_MMA_NVIDIA : CLNSA_MMA_EMULATED;
  const clnsa_mma got = clnsa_context_tensor_cores(ctx);
  printf("# vendor 0x%x: tensor-core path %d (want %d)\n", vendor, (int)got, (int)want);
  return got == want;
}

bool harness_tensor_cores_mode(clnsa_context *ctx, int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "tensor-cores") != 0) return false;
  if (!tensor_cores_path(ctx)) {
    printf("no tensor-core path on this context (probe failed?)\n");
    clnsa_context_destroy(ctx);
    exit(1);
  }
  return true;
}

uint64_t harness_seed(const char *test_name) {
  const char *env = getenv("CLNSA_TEST_SEED");
  uint64_t seed = env && *env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL);
  printf("# %s: seed %llu (replay with CLNSA_TEST_SEED=%llu)\n", test_name,
         (unsigned long long)seed, (unsigned long long)seed);
  return seed;
}

static uint64_t splitmix(rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double rng_uniform(rng *r, double lo, double hi) {
  return lo + (hi - lo) * ((double)(splitmix(r) >> 11) / 9007199254740992.0);
}

int rng_int(rng *r, int lo, int hi) { return lo + (int)(splitmix(r) % (uint64_t)(hi - lo + 1)); }

void rng_fill(rng *r, double *x, size_t n, double lo, double hi) {
  for (size_t i = 0; i < n; i++) x[i] = rng_uniform(r, lo, hi);
}

/* ---- dtype conversions on the host ---- */
static uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static uint16_t f32_to_f16(float f) {
  /* Round to nearest even through double arithmetic on the magnitude. */
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  double a = fabs((double)f);
  if (isnan(f)) return 0x7e00;
  if (a >= 65520.0) return sign | 0x7c00;
  if (a < 6.103515625e-05) { /* subnormal: units of 2^-24 */
    double m = nearbyint(a * 16777216.0);
    return sign | (uint16_t)m;
  }
  int e;
  double fr = frexp(a, &e); /* a = fr * 2^e, fr in [0.5,1) */
  double m = nearbyint(fr * 2048.0); /* 11 significant bits */
  if (m >= 2048.0) {
    m /= 2.0;
    e++;
  }
  int exp = e - 1 + 15;
  if (exp >= 31) return sign | 0x7c00;
  return sign | (uint16_t)(exp << 10) | (uint16_t)((int)m - 1024);
}
static float f16_to_f32(uint16_t h) {
  int exp = (h >> 10) & 31, man = h & 1023;
  double v = exp == 0 ? ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY)
                                                  : ldexp(man + 1024, exp - 25);
  return (float)((h & 0x8000) ? -v : v);
}

double round_to_dtype(double x, clnsa_dtype dtype) {
  switch (dtype) {
    case CLNSA_F32: return (double)(float)x;
    case CLNSA_F16: return f16_to_f32(f32_to_f16((float)x));
    case CLNSA_BF16: return bf16_to_f32(f32_to_bf16((float)x));
    default: return x;
  }
}

static double round_f16(double x) { return round_to_dtype(x, CLNSA_F16); }
static double round_bf16(double x) { return round_to_dtype(x, CLNSA_BF16); }

double (*dtype_rounder(clnsa_dtype dtype))(double) {
  return dtype == CLNSA_F16 ? round_f16 : dtype == CLNSA_BF16 ? round_bf16 : NULL;
}

double dtype_tolerance(clnsa_dtype dtype) {
  return dtype == CLNSA_F32 ? 1e-5 : dtype == CLNSA_F16 ? 5e-3 : 2e-2;
}

const char *dtype_label(clnsa_dtype dtype) {
  return dtype == CLNSA_F32 ? "f32" : dtype == CLNSA_F16 ? "f16" : dtype == CLNSA_BF16 ? "bf16" : "i32";
}

/* ---- device tensors ---- */
static void fail_cl(cl_int err, const char *what) {
  if (err != CL_SUCCESS) {
    fprintf(stderr, "%s failed: %d\n", what, (int)err);
    exit(1);
  }
}

/* Layout of a (possibly padded) view: element offset 3 and each row of the last
 * dimension followed by a gap of 5 elements. */
static size_t layout(clnsa_tensor *t, int ndim, const int64_t *shape, bool padded) {
  t->ndim = ndim;
  t->offset = padded ? 3 : 0;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = stride;
    stride *= shape[i] + (padded && i == ndim - 1 ? 5 : 0);
  }
  return (size_t)stride + t->offset + 1;
}

static size_t element_index(const clnsa_tensor *t, size_t flat) {
  size_t idx = t->offset;
  for (int i = t->ndim - 1; i >= 0; i--) {
    idx += (flat % (size_t)t->shape[i]) * (size_t)t->strides[i];
    flat /= (size_t)t->shape[i];
  }
  return idx;
}

static size_t count_of(int ndim, const int64_t *shape) {
  size_t n = 1;
  for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
  return n;
}

static dev_tensor make(clnsa_context *ctx, clnsa_dtype dtype, int ndim, const int64_t *shape,
                       bool padded) {
  dev_tensor d;
  memset(&d, 0, sizeof d);
  d.t.dtype = dtype;
  size_t total = layout(&d.t, ndim, shape, padded);
  d.count = count_of(ndim, shape);
  cl_int err;
  d.t.buffer = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE,
                              total * clnsa_dtype_size(dtype), NULL, &err);
  fail_cl(err, "clCreateBuffer");
  return d;
}

static void write_all(clnsa_context *ctx, dev_tensor *d, const void *bytes) {
  size_t n = 0;
  clGetMemObjectInfo(d->t.buffer, CL_MEM_SIZE, sizeof n, &n, NULL);
  fail_cl(clEnqueueWriteBuffer(clnsa_context_queue(ctx), d->t.buffer, CL_TRUE, 0, n, bytes, 0,
                               NULL, NULL),
          "clEnqueueWriteBuffer");
}

static void *poisoned_bytes(const dev_tensor *d, size_t *n) {
  clGetMemObjectInfo(d->t.buffer, CL_MEM_SIZE, sizeof *n, n, NULL);
  unsigned char *b = malloc(*n);
  /* 0x7f bytes: NaN for f32/f16/bf16, a large out-of-range value for i32. */
  memset(b, d->t.dtype == CLNSA_I32 ? 0x7f : 0xff, *n);
  return b;
}

dev_tensor dev_upload(clnsa_context *ctx, clnsa_dtype dtype, int ndim, const int64_t *shape,
                      double *x, bool padded) {
  dev_tensor d = make(ctx, dtype, ndim, shape, padded);
  size_t n;
  unsigned char *b = poisoned_bytes(&d, &n);
  for (size_t i = 0; i < d.count; i++) {
    x[i] = round_to_dtype(x[i], dtype);
    size_t e = element_index(&d.t, i);
    if (dtype == CLNSA_F32) {
      float f = (float)x[i];
      memcpy(b + 4 * e, &f, 4);
    } else {
      uint16_t h = dtype == CLNSA_F16 ? f32_to_f16((float)x[i]) : f32_to_bf16((float)x[i]);
      memcpy(b + 2 * e, &h, 2);
    }
  }
  write_all(ctx, &d, b);
  free(b);
  d.host = x;
  return d;
}

dev_tensor dev_upload_int(clnsa_context *ctx, int ndim, const int64_t *shape, const int *x) {
  dev_tensor d = make(ctx, CLNSA_I32, ndim, shape, false);
  size_t n;
  unsigned char *b = poisoned_bytes(&d, &n);
  for (size_t i = 0; i < d.count; i++) {
    int32_t v = x[i];
    memcpy(b + 4 * element_index(&d.t, i), &v, 4);
  }
  write_all(ctx, &d, b);
  free(b);
  return d;
}

dev_tensor dev_output(clnsa_context *ctx, clnsa_dtype dtype, int ndim, const int64_t *shape,
                      bool padded) {
  dev_tensor d = make(ctx, dtype, ndim, shape, padded);
  size_t n;
  unsigned char *b = poisoned_bytes(&d, &n);
  write_all(ctx, &d, b);
  free(b);
  return d;
}

unsigned char *dev_raw(clnsa_context *ctx, const dev_tensor *d, size_t *bytes) {
  clGetMemObjectInfo(d->t.buffer, CL_MEM_SIZE, sizeof *bytes, bytes, NULL);
  unsigned char *b = malloc(*bytes);
  fail_cl(clEnqueueReadBuffer(clnsa_context_queue(ctx), d->t.buffer, CL_TRUE, 0, *bytes, b, 0,
                              NULL, NULL),
          "clEnqueueReadBuffer");
  return b;
}

double *dev_download(clnsa_context *ctx, dev_tensor *d) {
  size_t n;
  unsigned char *b = dev_raw(ctx, d, &n);
  if (!d->host) {
    d->host = malloc(sizeof(double) * (d->count ? d->count : 1));
    d->owns_host = true;
  }
  for (size_t i = 0; i < d->count; i++) {
    size_t e = element_index(&d->t, i);
    if (d->t.dtype == CLNSA_F32) {
      float f;
      memcpy(&f, b + 4 * e, 4);
      d->host[i] = f;
    } else {
      uint16_t h;
      memcpy(&h, b + 2 * e, 2);
      d->host[i] = d->t.dtype == CLNSA_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
  }
  free(b);
  return d->host;
}

int *dev_download_int(clnsa_context *ctx, dev_tensor *d) {
  size_t n;
  unsigned char *b = dev_raw(ctx, d, &n);
  int *out = malloc(sizeof(int) * (d->count ? d->count : 1));
  for (size_t i = 0; i < d->count; i++) {
    int32_t v;
    memcpy(&v, b + 4 * element_index(&d->t, i), 4);
    out[i] = v;
  }
  free(b);
  return out;
}

void dev_free(dev_tensor *d) {
  if (d->t.buffer) clReleaseMemObject(d->t.buffer);
  d->t.buffer = NULL;
  if (d->owns_host) free(d->host);
  d->host = NULL;
  d->owns_host = false;
}

double rel_error(const double *a, const double *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (isnan(a[i]) || isnan(b[i])) return INFINITY;
    if (isinf(b[i]) || isinf(a[i])) {
      if (a[i] != b[i]) return INFINITY;
      continue;
    }
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (den == 0) return sqrt(num);
  return sqrt(num / den);
}
