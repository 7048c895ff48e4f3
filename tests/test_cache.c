/* The on-disk program cache (src/program.c): entries are written, reused, and a corrupt
 * or truncated entry is ignored (rebuilt from source) without changing any result. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

static char dir[256];

/* Number of cache entries, and the path of the first one. */
static int entries(char *first, size_t n) {
  DIR *d = opendir(dir);
  int count = 0;
  for (struct dirent *e; d && (e = readdir(d)) != NULL;)
    if (strstr(e->d_name, ".bin") && !strstr(e->d_name, ".tmp")) {
      if (count++ == 0 && first) snprintf(first, n, "%s/%s", dir, e->d_name);
    }
  if (d) closedir(d);
  return count;
}

/* Pools random keys on a fresh context and checks the result against the reference. */
static void pool_once(uint64_t seed) {
  clnsa_context *ctx = harness_context();
  rng r = {seed};
  ref_shape s = {0};
  s.B = 1, s.TQ = s.TK = 37, s.HQ = s.H = 2, s.DK = 24, s.DV = 8, s.BS = 8, s.S = 1;
  double k[37 * 2 * 24], v[37 * 2 * 8], rk[5 * 2 * 24], rv[5 * 2 * 8];
  rng_fill(&r, k, sizeof k / sizeof k[0], -1, 1);
  rng_fill(&r, v, sizeof v / sizeof v[0], -1, 1);
  ref_pool(&s, k, v, rk, rv);
  int64_t sk[4] = {1, 37, 2, 24}, sv[4] = {1, 37, 2, 8}, skc[4] = {1, 5, 2, 24},
          svc[4] = {1, 5, 2, 8};
  dev_tensor dk = dev_upload(ctx, CLNSA_F32, 4, sk, k, false);
  dev_tensor dv = dev_upload(ctx, CLNSA_F32, 4, sv, v, false);
  dev_tensor kc = dev_output(ctx, CLNSA_F32, 4, skc, false);
  dev_tensor vc = dev_output(ctx, CLNSA_F32, 4, svc, false);
  clnsa_params p = clnsa_params_default();
  p.block_size = 8;
  assert_int_equal(clnsa_pool(ctx, &p, NULL, &dk.t, &dv.t, &kc.t, &vc.t, 0, NULL, NULL), 0);
  assert_true(rel_error(dev_download(ctx, &kc), rk, 5 * 2 * 24) < 1e-6);
  assert_true(rel_error(dev_download(ctx, &vc), rv, 5 * 2 * 8) < 1e-6);
  dev_free(&dk), dev_free(&dv), dev_free(&kc), dev_free(&vc);
  clnsa_context_destroy(ctx);
}

static void overwrite(const char *path, long at, const char *bytes, size_t n, bool truncate) {
  FILE *f = fopen(path, "r+b");
  assert_non_null(f);
  if (truncate) {
    assert_int_equal(ftruncate(fileno(f), at), 0);
  } else {
    fseek(f, at, SEEK_SET);
    fwrite(bytes, 1, n, f);
  }
  fclose(f);
}

static long file_size(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fclose(f);
  return n;
}

/* A whole entry: the magic, and a payload as long as the header says. (Binaries need not
 * be byte-identical from one build to the next, so this is what a rewrite must restore.) */
static bool entry_whole(const char *path) {
  FILE *f = fopen(path, "rb");
  unsigned char h[32];
  bool ok = f && fread(h, 1, 32, f) == 32 && memcmp(h, "CLNSAPB1", 8) == 0;
  uint64_t len = 0;
  if (ok) memcpy(&len, h + 16, 8);
  if (f) fclose(f);
  return ok && file_size(path) == (long)(32 + len);
}

static void test_cache_lifecycle(void **state) {
  (void)state;
  uint64_t seed = harness_seed("cache");
  pool_once(seed);
  char path[512];
  int n = entries(path, sizeof path);
  if (n != 1) printf("# %d cache entries in %s\n", n, dir);
  assert_int_equal(n, 1);
  long size = file_size(path);
  assert_true(size > 32);
  pool_once(seed + 1); /* served from the cache */
  assert_int_equal(entries(NULL, 0), 1);

  assert_true(entry_whole(path));

  overwrite(path, size / 2, "garbage!", 8, false); /* payload no longer matches its hash */
  pool_once(seed + 2);
  assert_int_equal(entries(NULL, 0), 1);
  assert_true(entry_whole(path)); /* rebuilt and rewritten */

  overwrite(path, 20, NULL, 0, true); /* truncated inside the header */
  assert_false(entry_whole(path));
  pool_once(seed + 3);
  assert_true(entry_whole(path));

  overwrite(path, 0, "NOTMAGIC", 8, false);
  pool_once(seed + 4);
  assert_true(entry_whole(path));
}

static void test_cache_off(void **state) {
  (void)state;
  char off_dir[256];
  snprintf(off_dir, sizeof off_dir, "%s", dir);
  setenv("CLNSA_CACHE_DIR", "off", 1);
  int before = entries(NULL, 0);
  pool_once(harness_seed("cache-off") ^ 0x55);
  assert_int_equal(entries(NULL, 0), before);
  setenv("CLNSA_CACHE_DIR", off_dir, 1);
}

int main(void) {
  snprintf(dir, sizeof dir, "/tmp/clnsa-cache-test-XXXXXX");
  if (!mkdtemp(dir)) return 1;
  setenv("CLNSA_CACHE_DIR", dir, 1);
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_cache_lifecycle),
                                     cmocka_unit_test(test_cache_off)};
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  return rc;
}
