/* Contexts: wrapping the caller's OpenCL objects, or creating our own from a selector. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static clnsa_status context_init(cl_context cl, cl_device_id device, cl_command_queue queue,
                                 clnsa_context **out) {
  clnsa_context *ctx = calloc(1, sizeof *ctx);
  if (!ctx) return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  clnsa_status st = device_info_query(device, &ctx->info);
  if (st != CLNSA_SUCCESS) {
    free(ctx);
    return st;
  }
  ctx->cl = cl;
  ctx->device = device;
  ctx->queue = queue;
  *out = ctx;
  return CLNSA_SUCCESS;
}

clnsa_status clnsa_context_create(cl_context cl, cl_device_id device, cl_command_queue queue,
                                  clnsa_context **out) {
  if (!out || !cl || !device || !queue) return CLNSA_ERR_NULL_ARGUMENT;
  *out = NULL;
  cl_context qctx = NULL;
  cl_device_id qdev = NULL;
  if (clGetCommandQueueInfo(queue, CL_QUEUE_CONTEXT, sizeof qctx, &qctx, NULL) != CL_SUCCESS ||
      clGetCommandQueueInfo(queue, CL_QUEUE_DEVICE, sizeof qdev, &qdev, NULL) != CL_SUCCESS)
    return CLNSA_ERR_INVALID_HANDLE;
  if (qctx != cl || qdev != device) return CLNSA_ERR_INVALID_HANDLE;
  clnsa_status st = context_init(cl, device, queue, out);
  if (st != CLNSA_SUCCESS) return st;
  clRetainContext(cl);
  clRetainCommandQueue(queue);
  return CLNSA_SUCCESS;
}

clnsa_status clnsa_context_create_from_selector(const char *selector, clnsa_context **out) {
  if (!out) return CLNSA_ERR_NULL_ARGUMENT;
  *out = NULL;
  cl_platform_id platform;
  cl_device_id device;
  char message[512];
  clnsa_status st = clnsa_select_device(selector, &platform, &device, message, sizeof message);
  if (st != CLNSA_SUCCESS) return st;
  cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)platform, 0};
  cl_int err;
  cl_context cl = clCreateContext(props, 1, &device, NULL, NULL, &err);
  if (err != CL_SUCCESS) return CLNSA_ERR_OPENCL;
  cl_command_queue queue = clCreateCommandQueue(cl, device, CL_QUEUE_PROFILING_ENABLE, &err);
  if (err != CL_SUCCESS) {
    clReleaseContext(cl);
    return CLNSA_ERR_OPENCL;
  }
  st = context_init(cl, device, queue, out);
  if (st != CLNSA_SUCCESS) {
    clReleaseCommandQueue(queue);
    clReleaseContext(cl);
  }
  return st; /* the context now owns the one reference of each */
}

void clnsa_context_destroy(clnsa_context *ctx) {
  if (!ctx) return;
  program_release_all(ctx);
  clReleaseCommandQueue(ctx->queue);
  clReleaseContext(ctx->cl);
  free(ctx);
}

cl_command_queue clnsa_context_queue(const clnsa_context *ctx) { return ctx ? ctx->queue : NULL; }
cl_device_id clnsa_context_device(const clnsa_context *ctx) { return ctx ? ctx->device : NULL; }
cl_context clnsa_context_cl(const clnsa_context *ctx) { return ctx ? ctx->cl : NULL; }
