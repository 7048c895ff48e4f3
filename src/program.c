/* Run-time compilation of the embedded kernels, with an on-disk binary cache.
 *
 * Every program is cl/common.cl followed by the kernel files named in `file`, joined by
 * '+' ("attend_setup.cl+attend.cl": shared helpers first). The cache key is a 128-bit
 * xxHash of: a format version, the library version, the source, the build options, and
 * the device name, driver version and platform version. A cache file is
 *   magic "CLNSAPB1" | u32 format | u32 reserved | u64 payload size | u64 XXH3 of payload
 *   | payload (the binary of the single device)
 * written to a temporary name and renamed, so readers never see half a file. Any
 * failure to read, verify or load a cached binary falls back to building from source.
 *
 * Environment: CLNSA_CACHE_DIR sets the directory ("off" or "0" disables the cache);
 * default $XDG_CACHE_HOME/clnsa, else $HOME/.cache/clnsa.
 *
 * Unless CLNSA_CACHE_DIR is set, PoCL is left to its own kernel cache (on by default,
 * POCL_CACHE_DIR): asking PoCL for
 * CL_PROGRAM_BINARIES makes it compile a second, generic copy of every kernel, which
 * measured 12.3 s against 7.9 s for a cold tests/test_pool, while PoCL's cache alone
 * rebuilds a warm program in about 0.1 s.
 *
 * On NVIDIA a program whose PTX holds wgmma instructions (behind a marker comment, see
 * cl/wgmma_ops.cl) is built a second time from its patched PTX; the cache keeps that one.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "internal.h"

#define CACHE_MAGIC "CLNSAPB1"
#define CACHE_FORMAT 1u
#define CACHE_HEADER 32

void options_add(build_options *o, const char *fmt, ...) {
  if (o->len >= sizeof o->text - 1) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(o->text + o->len, sizeof o->text - o->len, fmt, ap);
  va_end(ap);
  if (n > 0) o->len += (size_t)n;
  if (o->len > sizeof o->text - 1) o->len = sizeof o->text - 1;
}

void options_add_dtype(build_options *o, const char *role, const clnsa_tensor *t) {
  options_add(o, " -D%s_DT=%d", role, t ? (int)t->dtype : 0);
}

static const cl_source *find_source(const char *name) {
  for (size_t i = 0; i < clnsa_cl_source_count; i++)
    if (strcmp(clnsa_cl_sources[i].name, name) == 0) return &clnsa_cl_sources[i];
  return NULL;
}

/* ---- cache files ---- */
static bool caches_itself(const clnsa_context *ctx) {
  return strstr(ctx->info.platform_name, "Portable Computing Language") != NULL;
}

static bool cache_dir(const clnsa_context *ctx, char *out, size_t n) {
  const char *dir = getenv("CLNSA_CACHE_DIR");
  if ((!dir || !*dir) && caches_itself(ctx)) return false;
  if (dir && (!strcmp(dir, "off") || !strcmp(dir, "0"))) return false;
  if (dir && *dir) {
    snprintf(out, n, "%s", dir);
  } else if ((dir = getenv("XDG_CACHE_HOME")) && *dir) {
    snprintf(out, n, "%s/clnsa", dir);
  } else if ((dir = getenv("HOME")) && *dir) {
    snprintf(out, n, "%s/.cache", dir);
    mkdir(out, 0755);
    snprintf(out + strlen(out), n - strlen(out), "/clnsa");
  } else {
    return false;
  }
  return mkdir(out, 0755) == 0 || errno == EEXIST;
}

static void cache_path(const clnsa_context *ctx, const char *dir, const char *src, size_t srclen,
                       const char *options, char *out, size_t n) {
  XXH3_state_t *st = XXH3_createState();
  XXH3_128bits_reset(st);
  const unsigned format = CACHE_FORMAT;
  XXH3_128bits_update(st, &format, sizeof format);
  XXH3_128bits_update(st, CLNSA_VERSION_STRING, strlen(CLNSA_VERSION_STRING) + 1);
  XXH3_128bits_update(st, src, srclen);
  XXH3_128bits_update(st, options, strlen(options) + 1);
  XXH3_128bits_update(st, ctx->info.name, strlen(ctx->info.name) + 1);
  XXH3_128bits_update(st, ctx->info.driver, strlen(ctx->info.driver) + 1);
  XXH3_128bits_update(st, ctx->info.platform_version, strlen(ctx->info.platform_version) + 1);
  XXH128_hash_t h = XXH3_128bits_digest(st);
  XXH3_freeState(st);
  snprintf(out, n, "%s/%016llx%016llx.bin", dir, (unsigned long long)h.high64,
           (unsigned long long)h.low64);
}

static unsigned char *cache_read(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  unsigned char header[CACHE_HEADER];
  unsigned char *payload = NULL;
  if (fread(header, 1, CACHE_HEADER, f) == CACHE_HEADER && !memcmp(header, CACHE_MAGIC, 8)) {
    uint32_t format;
    uint64_t len, sum;
    memcpy(&format, header + 8, 4);
    memcpy(&len, header + 16, 8);
    memcpy(&sum, header + 24, 8);
    if (format == CACHE_FORMAT && len > 0 && len < (1ull << 30) &&
        (payload = malloc((size_t)len)) != NULL) {
      if (fread(payload, 1, (size_t)len, f) != len || fgetc(f) != EOF ||
          XXH3_64bits(payload, (size_t)len) != sum) {
        free(payload);
        payload = NULL;
      } else {
        *size = (size_t)len;
      }
    }
  }
  fclose(f);
  return payload;
}

static void cache_write(const char *path, const unsigned char *bin, size_t size) {
  char tmp[4300];
  snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
  FILE *f = fopen(tmp, "wb");
  if (!f) return;
  unsigned char header[CACHE_HEADER] = {0};
  uint32_t format = CACHE_FORMAT;
  uint64_t len = size, sum = XXH3_64bits(bin, size);
  memcpy(header, CACHE_MAGIC, 8);
  memcpy(header + 8, &format, 4);
  memcpy(header + 16, &len, 8);
  memcpy(header + 24, &sum, 8);
  bool ok = fwrite(header, 1, CACHE_HEADER, f) == CACHE_HEADER && fwrite(bin, 1, size, f) == size;
  ok = (fclose(f) == 0) && ok;
  if (!ok || rename(tmp, path) != 0) remove(tmp);
}

static unsigned char *program_binary(cl_program p, size_t *size) {
  if (clGetProgramInfo(p, CL_PROGRAM_BINARY_SIZES, sizeof *size, size, NULL) != CL_SUCCESS ||
      *size == 0)
    return NULL;
  unsigned char *bin = malloc(*size);
  if (bin && clGetProgramInfo(p, CL_PROGRAM_BINARIES, sizeof bin, &bin, NULL) != CL_SUCCESS) {
    free(bin);
    bin = NULL;
  }
  return bin;
}

/* ---- sm_90a (cl/wgmma_ops.cl) ---- */
#define SM90A_MARK "// @sm90a@ "
#define VENDOR_NVIDIA 0x10DEu

/* NVIDIA's OpenCL compiler emits PTX for sm_90, where ptxas refuses wgmma: the kernels
 * write those instructions as comments behind SM90A_MARK. A PTX module that holds the
 * marker comes back without it and with its target raised to sm_90a; NULL where the
 * module has no marker (or on no memory: the caller then keeps the source build, whose
 * kernels the probe rejects). */
static unsigned char *sm90a_patch(const unsigned char *ptx, size_t n, size_t *out_n) {
  const size_t mlen = strlen(SM90A_MARK);
  unsigned char *out = malloc(n + 16);
  if (!out) return NULL;
  size_t o = 0, marks = 0;
  bool target_done = false;
  for (size_t i = 0; i < n;) {
    if (n - i >= mlen && !memcmp(ptx + i, SM90A_MARK, mlen)) {
      i += mlen;
      marks++;
      continue;
    }
    static const char target[] = ".target sm_90";
    const size_t tlen = sizeof target - 1;
    if (!target_done && n - i > tlen && !memcmp(ptx + i, target, tlen) && ptx[i + tlen] != 'a' &&
        (ptx[i + tlen] < '0' || ptx[i + tlen] > '9')) {
      memcpy(out + o, target, tlen);
      o += tlen;
      out[o++] = 'a';
      i += tlen;
      target_done = true;
      continue;
    }
    out[o++] = ptx[i++];
  }
  if (marks == 0) {
    free(out);
    return NULL;
  }
  *out_n = o;
  return out;
}

/* ---- building ---- */
static clnsa_status build_log_fail(clnsa_context *ctx, cl_program p, const char *file,
                                   const char *options) {
  size_t n = 0;
  int head =
      snprintf(ctx->message, sizeof ctx->message, "building %s with [%s] failed:\n", file, options);
  if (head < 0 || (size_t)head >= sizeof ctx->message) head = 0;
  clGetProgramBuildInfo(p, ctx->device, CL_PROGRAM_BUILD_LOG, sizeof ctx->message - head - 1,
                        ctx->message + head, &n);
  ctx->message[sizeof ctx->message - 1] = '\0';
  return CLNSA_ERR_BUILD;
}

/* cl/common.cl and then each '+'-separated file of `file`, as one source string. */
static clnsa_status program_source(clnsa_context *ctx, const char *file, char **out,
                                   size_t *out_len) {
  const cl_source *parts[8];
  int n = 0;
  parts[n++] = find_source("common.cl");
  size_t len = parts[0] ? parts[0]->length + 1 : 0;
  for (const char *p = file; *p && parts[n - 1];) {
    const char *end = strchr(p, '+');
    size_t k = end ? (size_t)(end - p) : strlen(p);
    char name[64];
    if (k == 0 || k >= sizeof name || n == (int)(sizeof parts / sizeof parts[0]))
      return clnsa_fail(ctx, CLNSA_ERR_BUILD, "bad kernel file list %s", file);
    memcpy(name, p, k);
    name[k] = '\0';
    parts[n] = find_source(name);
    if (parts[n]) len += parts[n]->length + 1;
    n++;
    p = end ? end + 1 : p + k;
  }
  for (int i = 0; i < n; i++)
    if (!parts[i])
      return clnsa_fail(ctx, CLNSA_ERR_BUILD, "kernel source %s is not embedded", file);
  char *src = malloc(len + 1);
  if (!src) return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  size_t at = 0;
  for (int i = 0; i < n; i++) {
    memcpy(src + at, parts[i]->text, parts[i]->length);
    at += parts[i]->length;
    src[at++] = '\n';
  }
  src[at] = '\0';
  *out = src;
  *out_len = at;
  return CLNSA_SUCCESS;
}

/* CLNSA_BUILD_LOG=1: every kernel build from source (not a cache load) prints its build
 * log on stderr, on NVIDIA with -cl-nv-verbose (ptxas's registers, spills and warnings). */
static void build_log_print(clnsa_context *ctx, cl_program p, const char *file,
                            const char *options) {
  size_t n = 0;
  if (clGetProgramBuildInfo(p, ctx->device, CL_PROGRAM_BUILD_LOG, 0, NULL, &n) != CL_SUCCESS)
    return;
  char *log = malloc(n + 1);
  if (log && clGetProgramBuildInfo(p, ctx->device, CL_PROGRAM_BUILD_LOG, n, log, NULL) ==
                 CL_SUCCESS) {
    log[n] = '\0';
    fprintf(stderr, "clnsa: build log of %s [%s]:\n%s\n", file, options, log);
  }
  free(log);
}

static clnsa_status build_program(clnsa_context *ctx, const char *file, const char *options_in,
                                  cl_program *out) {
  const char *env = getenv("CLNSA_BUILD_LOG");
  const bool log = env && *env && strcmp(env, "0") != 0;
  char options[sizeof(((build_options *)0)->text) + 32];
  snprintf(options, sizeof options, "%s%s", options_in,
           log && ctx->info.vendor_id == VENDOR_NVIDIA ? " -cl-nv-verbose" : "");
  char *src = NULL;
  size_t len = 0;
  CHECK_STATUS(program_source(ctx, file, &src, &len));

  char dir[4000], path[4200];
  bool cached = cache_dir(ctx, dir, sizeof dir);
  if (cached) cache_path(ctx, dir, src, len, options, path, sizeof path);

  cl_int err;
  cl_program p = NULL;
  size_t bin_size = 0;
  unsigned char *bin = cached ? cache_read(path, &bin_size) : NULL;
  if (bin) {
    const unsigned char *bins[1] = {bin};
    cl_int bin_status;
    p = clCreateProgramWithBinary(ctx->cl, 1, &ctx->device, &bin_size, bins, &bin_status, &err);
    free(bin);
    if (err == CL_SUCCESS && bin_status == CL_SUCCESS &&
        clBuildProgram(p, 1, &ctx->device, options, NULL, NULL) == CL_SUCCESS) {
      free(src);
      *out = p;
      return CLNSA_SUCCESS;
    }
    if (p) clReleaseProgram(p); /* stale or corrupt entry: rebuild from source */
  }
  const char *srcs[1] = {src};
  p = clCreateProgramWithSource(ctx->cl, 1, srcs, &len, &err);
  free(src);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clCreateProgramWithSource");
  if (clBuildProgram(p, 1, &ctx->device, options, NULL, NULL) != CL_SUCCESS) {
    clnsa_status st = build_log_fail(ctx, p, file, options);
    clReleaseProgram(p);
    return st;
  }
  const bool nvidia = ctx->info.vendor_id == VENDOR_NVIDIA;
  bin = cached || nvidia ? program_binary(p, &bin_size) : NULL;
  size_t patched_size = 0;
  unsigned char *patched = nvidia && bin ? sm90a_patch(bin, bin_size, &patched_size) : NULL;
  if (patched) { /* the same program again, from its sm_90a PTX */
    free(bin);
    bin = patched, bin_size = patched_size;
    clReleaseProgram(p);
    const unsigned char *bins[1] = {bin};
    cl_int bin_status;
    p = clCreateProgramWithBinary(ctx->cl, 1, &ctx->device, &bin_size, bins, &bin_status, &err);
    if (err != CL_SUCCESS || bin_status != CL_SUCCESS) {
      free(bin);
      if (p) clReleaseProgram(p);
      return clnsa_fail(ctx, CLNSA_ERR_BUILD, "loading the sm_90a PTX of %s failed (%d, %d)",
                        file, (int)err, (int)bin_status);
    }
    if (clBuildProgram(p, 1, &ctx->device, options, NULL, NULL) != CL_SUCCESS) {
      free(bin);
      clnsa_status st = build_log_fail(ctx, p, file, options);
      clReleaseProgram(p);
      return st;
    }
  }
  if (cached && bin) cache_write(path, bin, bin_size);
  free(bin);
  if (log) build_log_print(ctx, p, file, options);
  *out = p;
  return CLNSA_SUCCESS;
}

static program_entry *find_program(clnsa_context *ctx, const char *key) {
  for (int i = 0; i < ctx->nprograms; i++)
    if (strcmp(ctx->programs[i].key, key) == 0) return &ctx->programs[i];
  return NULL;
}

static clnsa_status get_program(clnsa_context *ctx, const char *file, const char *options,
                                program_entry **out) {
  size_t klen = strlen(file) + strlen(options) + 2;
  char *key = malloc(klen);
  if (!key) return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  snprintf(key, klen, "%s\n%s", file, options);
  if ((*out = find_program(ctx, key)) != NULL) {
    free(key);
    return CLNSA_SUCCESS;
  }
  program_entry *grown = realloc(ctx->programs, (size_t)(ctx->nprograms + 1) * sizeof *grown);
  if (!grown) {
    free(key);
    return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  }
  ctx->programs = grown;
  cl_program p;
  clnsa_status st = build_program(ctx, file, options, &p);
  if (st != CLNSA_SUCCESS) {
    free(key);
    return st;
  }
  program_entry *e = &ctx->programs[ctx->nprograms++];
  memset(e, 0, sizeof *e);
  e->key = key;
  e->program = p;
  *out = e;
  return CLNSA_SUCCESS;
}

clnsa_status program_kernel(clnsa_context *ctx, const char *file, const char *options,
                            const char *kernel_name, cl_kernel *out) {
  program_entry *e;
  CHECK_STATUS(get_program(ctx, file, options, &e));
  for (int i = 0; i < e->nkernels; i++)
    if (strcmp(e->names[i], kernel_name) == 0) {
      *out = e->kernels[i];
      return CLNSA_SUCCESS;
    }
  cl_int err;
  cl_kernel k = clCreateKernel(e->program, kernel_name, &err);
  if (err != CL_SUCCESS)
    return clnsa_fail(ctx, CLNSA_ERR_BUILD, "kernel %s not found in %s (error %d)", kernel_name,
                      file, (int)err);
  cl_kernel *ks = realloc(e->kernels, (size_t)(e->nkernels + 1) * sizeof *ks);
  if (ks) e->kernels = ks;
  char **ns = ks ? realloc(e->names, (size_t)(e->nkernels + 1) * sizeof *ns) : NULL;
  if (ns) e->names = ns;
  char *name = ns ? malloc(strlen(kernel_name) + 1) : NULL;
  if (!name) {
    clReleaseKernel(k);
    return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  }
  strcpy(name, kernel_name);
  e->kernels[e->nkernels] = k;
  e->names[e->nkernels++] = name;
  *out = k;
  return CLNSA_SUCCESS;
}

void program_release_all(clnsa_context *ctx) {
  for (int i = 0; i < ctx->nprograms; i++) {
    program_entry *e = &ctx->programs[i];
    for (int j = 0; j < e->nkernels; j++) {
      clReleaseKernel(e->kernels[j]);
      free(e->names[j]);
    }
    free(e->kernels);
    free(e->names);
    clReleaseProgram(e->program);
    free(e->key);
  }
  free(ctx->programs);
  ctx->programs = NULL;
  ctx->nprograms = 0;
}
