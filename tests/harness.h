/* Shared helpers for the device tests: device selection, random inputs, uploads in any
 * dtype, poisoned outputs, downloads and relative errors. */
#ifndef CLNSA_TEST_HARNESS_H
#define CLNSA_TEST_HARNESS_H

#include <stdbool.h>
#include <stdint.h>

#include "clnsa.h"

#define SKIP_EXIT 77

/* The context for the device named by CLNSA_DEVICE (default device otherwise); exits
 * with 77 (skipped) when no OpenCL device exists. */
clnsa_context *harness_context(void);
/* `test_x tensor-cores`: the suite entries that exist for the tensor-core kernels. True
 * when argv asks for that mode; NVIDIA devices must then have the hardware path (its
 * probe passed), any other device is switched to the emulation (CLNSA_TUNE gains MMA=2);
 * where the wanted path is not there it says so and exits with 1, so such an entry never
 * passes on the portable kernels. False (nothing changed) without the argument. */
/* Appends one NAME=VALUE setting to CLNSA_TUNE (read by the library at each call). */
void harness_tune_append(const char *setting);
/* CLNSA_TUNE extended for one test: harness_tune_extend appends a setting, having saved
 * the value before the test's first extension; harness_tune_teardown (a cmocka teardown,
 * also callable directly) puts that value back, so that a failed assertion does not leave
 * the settings to the tests after it. */
void harness_tune_extend(const char *setting);
int harness_tune_teardown(void **state);
bool harness_tensor_cores_mode(clnsa_context *ctx, int argc, char **argv);

/* Random numbers: one generator per test, seeded from CLNSA_TEST_SEED or the clock,
 * and the seed printed so that a failure can be replayed. */
typedef struct rng { uint64_t s; } rng;
uint64_t harness_seed(const char *test_name);
double rng_uniform(rng *r, double lo, double hi);
int rng_int(rng *r, int lo, int hi); /* inclusive */
void rng_fill(rng *r, double *x, size_t n, double lo, double hi);

/* A device tensor together with its host copy (values rounded to the dtype, so the
 * reference sees exactly what the device sees). */
typedef struct dev_tensor {
  clnsa_tensor t;
  double *host;    /* inputs: the caller's array; outputs: filled by dev_download */
  bool owns_host;  /* dev_free frees host */
  size_t count;
} dev_tensor;

/* Uploads x (count values, dense C order) as `dtype` with the given shape; with
 * `padded` the tensor is a strided view (offset and a gap between rows) to exercise
 * strides. host is rounded in place to what the dtype can hold. */
dev_tensor dev_upload(clnsa_context *ctx, clnsa_dtype dtype, int ndim, const int64_t *shape,
                      double *x, bool padded);
dev_tensor dev_upload_int(clnsa_context *ctx, int ndim, const int64_t *shape, const int *x);
/* An output tensor filled with a poison pattern (NaN for floats, 0x7f7f7f7f for ints). */
dev_tensor dev_output(clnsa_context *ctx, clnsa_dtype dtype, int ndim, const int64_t *shape,
                      bool padded);
/* Blocking read of a tensor into host (doubles). Returns host. */
double *dev_download(clnsa_context *ctx, dev_tensor *d);
int *dev_download_int(clnsa_context *ctx, dev_tensor *d);
/* Raw bytes of the whole buffer (to check that nothing was written). */
unsigned char *dev_raw(clnsa_context *ctx, const dev_tensor *d, size_t *bytes);
void dev_free(dev_tensor *d);

/* ||a - b|| / ||b|| over n values, with -inf == -inf allowed and any NaN giving +inf. */
double rel_error(const double *a, const double *b, size_t n);
/* The tolerance of a dtype from docs/SEMANTICS.md. */
double dtype_tolerance(clnsa_dtype dtype);
const char *dtype_label(clnsa_dtype dtype);
double round_to_dtype(double x, clnsa_dtype dtype);
/* round_to_dtype(., dtype) as a function for ref_shape's round_k_cmp / round_v_cmp: NULL
 * for f32 (CLNSA_FLAG_CMP_16BIT leaves f32 pooling as it is). */
double (*dtype_rounder(clnsa_dtype dtype))(double);

#endif
