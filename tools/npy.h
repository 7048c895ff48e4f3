/*
 * npy: a small, defensive reader/writer for NumPy .npy files, used by the clnsa
 * command-line tool to load inputs and save outputs.
 *
 * Reading accepts format versions 1.0, 2.0 and 3.0, C order, little-endian
 * descr '<f4', '<f8', '<f2', '<i4', '<i8'. Everything else (big-endian, fortran
 * order, object/structured/unknown descr, malformed header dicts, negative or
 * overflowing shapes, truncated data, trailing bytes, data over max_bytes) is
 * rejected with a message that says why. The parser never reads outside the
 * buffer it is given, whatever the input: it is fuzzed under ASan/UBSan
 * (tests/fuzz_npy.c).
 *
 * Writing produces version 1.0 files whose data starts at a multiple of 64 bytes,
 * the layout numpy itself writes.
 *
 * Every function that can fail takes (err, errlen) and on failure writes a
 * NUL-terminated message there (err may be NULL when errlen is 0).
 */
#ifndef CLNSA_TOOLS_NPY_H
#define CLNSA_TOOLS_NPY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum npy_type { NPY_F32, NPY_F64, NPY_F16, NPY_I32, NPY_I64 } npy_type;

#define NPY_MAX_DIMS 8

/* A parsed array. data holds count elements of `type` in host byte order, C order.
 * ndim 0 (shape ()) is a scalar with count 1. data is malloc'd (never NULL after a
 * successful parse, even when count is 0); release it with npy_free(). */
typedef struct npy_array {
  npy_type type;
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
  size_t count;
  void *data;
} npy_array;

/* Parses an in-memory .npy file. max_bytes caps the size of the data section (not
 * the header). Returns 0 on success, -1 on failure with *out zeroed (so npy_free is
 * still safe) and a message in err, e.g.
 * "truncated: header says 24 bytes of data, file has 20". */
int npy_parse(const void *buf, size_t len, size_t max_bytes, npy_array *out, char *err,
              size_t errlen);

/* Reads and parses a file; never reads more than the header plus max_bytes (+1 to
 * detect excess) into memory. Returns 0 or -1 as npy_parse. */
int npy_read_file(const char *path, size_t max_bytes, npy_array *out, char *err, size_t errlen);

/* Writes a version 1.0 .npy file. ndim is 0..NPY_MAX_DIMS; shape may be NULL when
 * ndim is 0; data holds the product of shape elements in host byte order. Arguments
 * are validated before the file is opened, so invalid arguments never touch it; after
 * an I/O error (-1) the file may be partly written. */
int npy_write_file(const char *path, npy_type type, int ndim, const int64_t *shape,
                   const void *data, char *err, size_t errlen);

/* Frees a->data and zeroes *a. Safe on a zeroed array, on NULL, and twice. */
void npy_free(npy_array *a);

/* Conversions into a newly malloc'd array of a->count elements (at least one byte is
 * allocated, so the result is non-NULL on success even when count is 0); the caller
 * frees it. On failure they return NULL with a message in err.
 *  - npy_to_f32 accepts F32, F64 and F16 and rejects integer types. F16 converts
 *    exactly. F64 values are rounded to nearest; a finite value that would round to
 *    infinity in float is rejected as out of range rather than silently becoming inf.
 *  - npy_to_i32 accepts I32 and I64 and rejects float types and I64 values outside
 *    the int32 range. */
float *npy_to_f32(const npy_array *a, char *err, size_t errlen);
int32_t *npy_to_i32(const npy_array *a, char *err, size_t errlen);

/* "float32", "float64", "float16", "int32", "int64", or "unknown". */
const char *npy_type_name(npy_type t);

#ifdef __cplusplus
}
#endif

#endif /* CLNSA_TOOLS_NPY_H */
