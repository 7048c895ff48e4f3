/*
 * Fuzz harness for tools/npy.c: any byte string must either parse into an array that
 * satisfies the invariants below or fail with a message, without touching memory
 * outside the input (run under ASan/UBSan).
 *
 * libFuzzer:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined tools/npy.c tests/fuzz_npy.c \
 *     -o fuzz_npy && cp -r tests/fuzz_corpus /tmp/corpus && ./fuzz_npy /tmp/corpus
 * Standalone replay (any C compiler, no libFuzzer), as the test suite uses it:
 *   cc -DNPY_FUZZ_STANDALONE tools/npy.c tests/fuzz_npy.c -o fuzz_npy_replay
 *   ./fuzz_npy_replay tests/fuzz_corpus [more files or directories...]
 */
#if defined(NPY_FUZZ_STANDALONE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* opendir, stat */
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_MAX_BYTES ((size_t)1 << 20)

static size_t item_size(npy_type t) {
  return t == NPY_F16 ? 2 : t == NPY_F32 || t == NPY_I32 ? 4 : 8;
}

/* What a successful parse promises. abort() makes the fuzzer report a violation as a
 * crash; the last-byte read makes ASan check that data really holds count elements. */
static void check_array(const npy_array *a) {
  size_t count = 1, bytes;
  int d;
  if (a->ndim < 0 || a->ndim > NPY_MAX_DIMS || !a->data) abort();
  for (d = 0; d < a->ndim; d++)
    if (a->shape[d] < 0) abort();
  for (d = 0; d < a->ndim; d++) count *= (size_t)a->shape[d]; /* unsigned: wraps, no UB */
  if (count != a->count) abort();
  bytes = count * item_size(a->type);
  if (bytes > FUZZ_MAX_BYTES) abort();
  if (bytes > 0) {
    volatile unsigned char last = ((const unsigned char *)a->data)[bytes - 1];
    (void)last;
  }
}

/* Exactly one of the two conversions applies to each type; a refusal must explain. */
static void check_conversions(const npy_array *a) {
  char err[256] = "";
  int is_int = a->type == NPY_I32 || a->type == NPY_I64;
  float *f = npy_to_f32(a, err, sizeof err);
  int32_t *i;
  if ((f == NULL && err[0] == '\0') || (is_int && f != NULL)) abort();
  free(f);
  err[0] = '\0';
  i = npy_to_i32(a, err, sizeof err);
  if ((i == NULL && err[0] == '\0') || (!is_int && i != NULL)) abort();
  free(i);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  npy_array a;
  char err[256] = "";
  if (npy_parse(data, size, FUZZ_MAX_BYTES, &a, err, sizeof err) == 0) {
    check_array(&a);
    check_conversions(&a);
    npy_free(&a);
  } else if (err[0] == '\0' || memchr(err, '\0', sizeof err) == NULL || a.data != NULL) {
    abort(); /* a failure must leave a message and nothing to free */
  }
  return 0;
}

#ifdef NPY_FUZZ_STANDALONE
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>

#define REPLAY_MAX ((size_t)64 << 20)

/* Runs one file through the harness. Returns 0, or -1 if it cannot be read. */
static int replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  unsigned char *buf = malloc(REPLAY_MAX);
  size_t n = 0;
  int ok = f != NULL && buf != NULL;
  if (ok) n = fread(buf, 1, REPLAY_MAX, f);
  if (ok && ferror(f)) ok = 0;
  if (f) fclose(f);
  if (ok)
    LLVMFuzzerTestOneInput(buf, n);
  else
    fprintf(stderr, "fuzz_npy: cannot read %s\n", path);
  free(buf);
  return ok ? 0 : -1;
}

/* Runs every regular file directly inside dir (corpora are flat). */
static int replay_dir(const char *dir, int *runs) {
  DIR *d = opendir(dir);
  struct dirent *e;
  int rc = 0;
  if (!d) {
    fprintf(stderr, "fuzz_npy: cannot open directory %s\n", dir);
    return -1;
  }
  while ((e = readdir(d)) != NULL) {
    char path[4096];
    struct stat st;
    if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path) continue;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue; /* ., .., subdirs */
    if (replay_file(path) != 0) rc = -1;
    ++*runs;
  }
  closedir(d);
  return rc;
}

int main(int argc, char **argv) {
  int i, runs = 0, rc = 0;
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE_OR_DIR...\n", argv[0]);
    return 2;
  }
  for (i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
      if (replay_dir(argv[i], &runs) != 0) rc = 1;
    } else {
      if (replay_file(argv[i]) != 0) rc = 1;
      runs++;
    }
  }
  printf("fuzz_npy: replayed %d input%s\n", runs, runs == 1 ? "" : "s");
  return runs == 0 ? 1 : rc; /* an empty corpus means a broken test setup */
}
#endif /* NPY_FUZZ_STANDALONE */
