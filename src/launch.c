/* Enqueue chains: a multi-kernel operation behaves like one clEnqueue* call. The first
 * kernel waits on the caller's list, each next one on its predecessor (so out-of-order
 * queues stay correct), and the caller receives the last event. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* CLNSA_TRACE=1: every kernel is waited for and named on stderr before the next one is
 * enqueued, so that a kernel that hangs or faults names itself, with its run time where
 * the queue profiles (`clnsa bench` makes such a queue: a per-kernel breakdown). Debugging
 * only: it serialises the queue. */
static void trace_kernel(cl_kernel k, cl_event ev) {
  const char *env = getenv("CLNSA_TRACE");
  if (!env || strcmp(env, "1") != 0) return;
  char name[128] = "?";
  clGetKernelInfo(k, CL_KERNEL_FUNCTION_NAME, sizeof name - 1, name, NULL);
  fprintf(stderr, "clnsa trace: %s ...", name);
  fflush(stderr);
  const cl_int err = clWaitForEvents(1, &ev);
  cl_ulong t0 = 0, t1 = 0; /* only on a queue made with CL_QUEUE_PROFILING_ENABLE */
  if (err == CL_SUCCESS &&
      clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_START, sizeof t0, &t0, NULL) ==
          CL_SUCCESS &&
      clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_END, sizeof t1, &t1, NULL) == CL_SUCCESS)
    fprintf(stderr, " done %.4f ms\n", (double)(t1 - t0) * 1e-6);
  else
    fprintf(stderr, " %s\n", err == CL_SUCCESS ? "done" : "FAILED");
}

void chain_begin(enqueue_chain *c, cl_uint nwait, const cl_event *wait) {
  c->nwait = nwait;
  c->wait = wait;
  c->last = NULL;
  c->dry_run = false;
}

void chain_begin_dry(enqueue_chain *c) {
  chain_begin(c, 0, NULL);
  c->dry_run = true;
}

clnsa_status chain_launch(clnsa_context *ctx, enqueue_chain *c, cl_kernel k, cl_uint work_dim,
                          const size_t *global, const size_t *local) {
  if (c->dry_run) return CLNSA_SUCCESS;
  for (cl_uint i = 0; i < work_dim; i++)
    if (global[i] == 0) return CLNSA_SUCCESS; /* nothing to do for an empty grid */
  cl_event ev = NULL;
  cl_int err = c->last ? clEnqueueNDRangeKernel(ctx->queue, k, work_dim, NULL, global, local, 1,
                                                &c->last, &ev)
                       : clEnqueueNDRangeKernel(ctx->queue, k, work_dim, NULL, global, local,
                                                c->nwait, c->nwait ? c->wait : NULL, &ev);
  if (err != CL_SUCCESS) {
    char name[128] = "?";
    clGetKernelInfo(k, CL_KERNEL_FUNCTION_NAME, sizeof name - 1, name, NULL);
    return clnsa_fail(ctx, CLNSA_ERR_OPENCL, "enqueueing kernel %s failed with OpenCL error %d",
                      name, (int)err);
  }
  trace_kernel(k, ev);
  if (c->last) clReleaseEvent(c->last);
  c->last = ev;
  return CLNSA_SUCCESS;
}

clnsa_status chain_end(clnsa_context *ctx, enqueue_chain *c, cl_event *event) {
  if (!c->last && event) {
    cl_int err =
        clEnqueueMarkerWithWaitList(ctx->queue, c->nwait, c->nwait ? c->wait : NULL, &c->last);
    if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clEnqueueMarkerWithWaitList");
  }
  if (event)
    *event = c->last;
  else if (c->last)
    clReleaseEvent(c->last);
  c->last = NULL;
  return CLNSA_SUCCESS;
}

void chain_abort(enqueue_chain *c) {
  if (c->last) clReleaseEvent(c->last);
  c->last = NULL;
}

/* ---- kernel arguments ---- */
kargs args_begin(cl_kernel k) {
  return (kargs){k, 0, CL_SUCCESS};
}
void arg_tensor(kargs *a, const clnsa_tensor *t) {
  a->err |= t ? tensor_set_args(a->k, &a->n, t) : tensor_set_absent_args(a->k, &a->n);
}
void arg_mem(kargs *a, cl_mem m) {
  a->err |= clSetKernelArg(a->k, a->n++, sizeof m, &m);
}
void arg_long(kargs *a, cl_long v) {
  a->err |= clSetKernelArg(a->k, a->n++, sizeof v, &v);
}
void arg_int(kargs *a, cl_int v) {
  a->err |= clSetKernelArg(a->k, a->n++, sizeof v, &v);
}
void arg_float(kargs *a, cl_float v) {
  a->err |= clSetKernelArg(a->k, a->n++, sizeof v, &v);
}
void arg_seq(kargs *a, const nsa_dims *d) {
  a->err |= dims_set_seq_args(a->k, &a->n, d);
}

clnsa_status args_launch(clnsa_context *ctx, enqueue_chain *c, const kargs *a, cl_uint dims,
                         const size_t *global, const size_t *local) {
  if (a->err != CL_SUCCESS) {
    char name[128] = "?";
    clGetKernelInfo(a->k, CL_KERNEL_FUNCTION_NAME, sizeof name - 1, name, NULL);
    return clnsa_cl_fail(ctx, a->err, name);
  }
  return chain_launch(ctx, c, a->k, dims, global, local);
}

row_walk row_walk_plan(const clnsa_context *ctx, int width, bool vec, int max_lanes, bool pow2) {
  int wg = (ctx->info.type & CL_DEVICE_TYPE_CPU) ? 64 : 128;
  while ((size_t)wg > ctx->info.max_wg && wg > 1) wg /= 2;
  row_walk w = {vec ? 4 : 1, 0, 0};
  const int most = max_lanes > 0 && max_lanes < wg ? max_lanes : wg;
  w.lanes = width / w.vecw < most ? width / w.vecw : most;
  if (w.lanes < 1) w.lanes = 1;
  if (pow2) {
    int p = 1;
    while (p < w.lanes) p *= 2;
    w.lanes = p;
  }
  w.rows = wg / w.lanes;
  return w;
}
