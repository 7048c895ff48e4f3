/* Status strings and the per-context message. */
#include <stdarg.h>
#include <string.h>

#include "internal.h"

const char *clnsa_status_string(clnsa_status status) {
  switch (status) {
#define CLNSA_STATUS_CASE_(name, value, text) \
  case name:                                  \
    return text;
    CLNSA_STATUS_TABLE(CLNSA_STATUS_CASE_)
#undef CLNSA_STATUS_CASE_
  }
  return "unknown status";
}

clnsa_status clnsa_fail(clnsa_context *ctx, clnsa_status status, const char *fmt, ...) {
  if (ctx) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->message, sizeof ctx->message, fmt, ap);
    va_end(ap);
  }
  return status;
}

clnsa_status clnsa_cl_fail(clnsa_context *ctx, cl_int err, const char *what) {
  return clnsa_fail(ctx, CLNSA_ERR_OPENCL, "%s failed with OpenCL error %d", what, (int)err);
}

const char *clnsa_last_message(const clnsa_context *ctx) {
  return ctx ? ctx->message : "no context";
}

size_t clnsa_dtype_size(clnsa_dtype dtype) {
  switch (dtype) {
    case CLNSA_F32:
    case CLNSA_I32:
      return 4;
    case CLNSA_F16:
    case CLNSA_BF16:
      return 2;
  }
  return 0;
}

clnsa_tensor clnsa_tensor_make(cl_mem buffer, size_t offset, clnsa_dtype dtype, int ndim,
                               const int64_t *shape) {
  clnsa_tensor t;
  memset(&t, 0, sizeof t);
  t.buffer = buffer;
  t.offset = offset;
  t.dtype = dtype;
  t.ndim = ndim;
  if (ndim < 1 || ndim > CLNSA_MAX_DIMS || !shape) return t;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

clnsa_params clnsa_params_default(void) {
  clnsa_params p;
  memset(&p, 0, sizeof p);
  p.block_size = 64;
  p.block_count = 16;
  p.compress = CLNSA_COMPRESS_MEAN;
  return p;
}
