/* Tensor descriptor checks and how tensors become kernel arguments. */
#include <string.h>

#include "internal.h"

static const char *dtype_name(clnsa_dtype t) {
  switch (t) {
    case CLNSA_F32: return "f32";
    case CLNSA_F16: return "f16";
    case CLNSA_BF16: return "bf16";
    case CLNSA_I32: return "i32";
  }
  return "unknown";
}

static clnsa_status check_buffer(clnsa_context *ctx, const clnsa_tensor *t, const char *name) {
  cl_context owner = NULL;
  size_t bytes = 0;
  if (clGetMemObjectInfo(t->buffer, CL_MEM_CONTEXT, sizeof owner, &owner, NULL) != CL_SUCCESS ||
      clGetMemObjectInfo(t->buffer, CL_MEM_SIZE, sizeof bytes, &bytes, NULL) != CL_SUCCESS)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_HANDLE, "%s: buffer is not a valid cl_mem", name);
  if (owner != ctx->cl)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_HANDLE,
                      "%s: buffer belongs to another OpenCL context", name);
  bool empty = false;
  for (int i = 0; i < t->ndim; i++) empty |= t->shape[i] == 0;
  if (empty) return CLNSA_SUCCESS;
  /* Highest element addressed, in elements, with overflow guarded by the 2^62 cap. */
  uint64_t last = t->offset;
  for (int i = 0; i < t->ndim; i++) {
    uint64_t span = (uint64_t)(t->shape[i] - 1) * (uint64_t)t->strides[i];
    if ((uint64_t)t->shape[i] > (1ull << 40) || (uint64_t)t->strides[i] > (1ull << 40) ||
        span > (1ull << 61) || last > (1ull << 61))
      return clnsa_fail(ctx, CLNSA_ERR_BUFFER_TOO_SMALL, "%s: shape or stride too large", name);
    last += span;
  }
  uint64_t need = (last + 1) * clnsa_dtype_size(t->dtype);
  if (need > bytes)
    return clnsa_fail(ctx, CLNSA_ERR_BUFFER_TOO_SMALL,
                      "%s: shape, strides and offset address %llu bytes, buffer has %zu", name,
                      (unsigned long long)need, bytes);
  return CLNSA_SUCCESS;
}

clnsa_status tensor_check(clnsa_context *ctx, const clnsa_tensor *t, const char *name,
                          int ndim, const int64_t *expected, unsigned dtype_mask) {
  if (!t) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "%s is NULL", name);
  if (!t->buffer) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "%s: buffer is NULL", name);
  if ((unsigned)t->dtype > CLNSA_I32 || !(dtype_mask & (1u << t->dtype)))
    return clnsa_fail(ctx, CLNSA_ERR_DTYPE, "%s: dtype %s (%d) is not allowed here", name,
                      dtype_name(t->dtype), (int)t->dtype);
  if (t->ndim != ndim)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s: rank %d, expected %d", name, t->ndim,
                      ndim);
  for (int i = 0; i < ndim; i++) {
    if (t->shape[i] < 0)
      return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s: negative shape[%d]", name, i);
    if (expected && expected[i] >= 0 && t->shape[i] != expected[i])
      return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s: shape[%d] is %lld, expected %lld",
                        name, i, (long long)t->shape[i], (long long)expected[i]);
    if (t->strides[i] < 0)
      return clnsa_fail(ctx, CLNSA_ERR_STRIDE, "%s: negative stride[%d]", name, i);
  }
  if (t->strides[ndim - 1] != 1 && t->shape[ndim - 1] > 1)
    return clnsa_fail(ctx, CLNSA_ERR_STRIDE, "%s: the last dimension must have stride 1", name);
  if (t->offset > (1ull << 61))
    return clnsa_fail(ctx, CLNSA_ERR_BUFFER_TOO_SMALL, "%s: offset too large", name);
  return check_buffer(ctx, t, name);
}

/* Kernels see every tensor as (pointer, offset, stride of dims 0, 1, 2). */
cl_int tensor_set_args(cl_kernel k, cl_uint *arg, const clnsa_tensor *t) {
  cl_long off = (cl_long)t->offset, s[3] = {0, 0, 0};
  for (int i = 0; i < 3 && i < t->ndim; i++) s[i] = (cl_long)t->strides[i];
  cl_int err = clSetKernelArg(k, (*arg)++, sizeof(cl_mem), &t->buffer);
  err |= clSetKernelArg(k, (*arg)++, sizeof off, &off);
  for (int i = 0; i < 3; i++) err |= clSetKernelArg(k, (*arg)++, sizeof s[i], &s[i]);
  return err;
}

cl_int tensor_set_absent_args(cl_kernel k, cl_uint *arg) {
  cl_long zero = 0;
  cl_int err = clSetKernelArg(k, (*arg)++, sizeof(cl_mem), NULL);
  for (int i = 0; i < 4; i++) err |= clSetKernelArg(k, (*arg)++, sizeof zero, &zero);
  return err;
}

/* True when the rows of t (head dim `dim`) can be read in aligned units of n elements:
 * offset, strides and the head dim are whole units (buffers are aligned far beyond 16
 * bytes, so a unit of up to 16 bytes is then aligned to its size). */
bool tensor_rows_vec(const clnsa_tensor *t, int dim, int n) {
  if (t->offset % (size_t)n || dim % n) return false;
  for (int i = 0; i < 3; i++)
    if (t->strides[i] % n) return false;
  return true;
}

bool tensor_rows_aligned16(const clnsa_tensor *t, int dim) {
  return tensor_rows_vec(t, dim, 16 / (int)clnsa_dtype_size(t->dtype));
}
