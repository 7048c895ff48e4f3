/*
 * clnsa: Native Sparse Attention (arXiv 2502.11089) on any OpenCL device.
 *
 * One header holds the whole public API. The function computed is specified in
 * docs/SEMANTICS.md. Conventions:
 *  - Every operation enqueues work on the context's command queue and follows the
 *    clEnqueue* convention: (num_events_in_wait_list, event_wait_list, event) last.
 *    Nothing blocks unless a function says so.
 *  - Every entry point validates all of its arguments before enqueueing anything. On
 *    any status other than CLNSA_SUCCESS nothing was enqueued and no output was written;
 *    clnsa_last_message() then explains.
 *  - Ownership: handles the caller passes in (cl_context, cl_device_id,
 *    cl_command_queue, cl_mem) are retained while clnsa holds them and released only to
 *    drop that retain; clnsa never releases what it did not retain.
 *  - Threads: there is no global mutable state. A clnsa_context may be used by one thread
 *    at a time; different contexts (on the same or different devices and vendors) may be
 *    used from different threads concurrently (tests/test_threads.c). Device discovery
 *    (clnsa_select_device) takes a process-wide lock, because some drivers' first
 *    initialization is not thread-safe.
 */
#ifndef CLNSA_H
#define CLNSA_H

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>
#include <stddef.h>
#include <stdint.h>

#include "clnsa_version.h"

#if defined(_WIN32) && defined(CLNSA_BUILDING)
#define CLNSA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define CLNSA_API __attribute__((visibility("default")))
#else
#define CLNSA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------- */
/* Status codes: one table generates the enum and clnsa_status_string().      */
/* ------------------------------------------------------------------------- */
#define CLNSA_STATUS_TABLE(X)                                                          \
  X(CLNSA_SUCCESS, 0, "success")                                                       \
  X(CLNSA_ERR_NULL_ARGUMENT, -1, "a required pointer or handle is NULL")              \
  X(CLNSA_ERR_INVALID_HANDLE, -2, "an OpenCL handle is invalid or already released")  \
  X(CLNSA_ERR_SHAPE_MISMATCH, -3, "tensor shapes disagree")                          \
  X(CLNSA_ERR_GROUP_SIZE, -4, "query heads are not a whole multiple of kv heads")     \
  X(CLNSA_ERR_HEAD_DIM, -5, "head dimension is out of range")                        \
  X(CLNSA_ERR_BUFFER_TOO_SMALL, -6, "a buffer is smaller than its shape and strides need") \
  X(CLNSA_ERR_CU_SEQLENS, -7, "cu_seqlens are negative, non-monotonic or disagree with the shapes") \
  X(CLNSA_ERR_BLOCK_COUNT, -8, "block count or block size is out of range")          \
  X(CLNSA_ERR_DTYPE, -9, "unknown dtype, or a dtype this tensor cannot have")         \
  X(CLNSA_ERR_STRIDE, -10, "strides are negative or the last dimension is not contiguous") \
  X(CLNSA_ERR_UNSUPPORTED, -11, "valid parameters that this version does not implement yet") \
  X(CLNSA_ERR_WORKSPACE, -12, "workspace missing, too small, or saved by another shape") \
  X(CLNSA_ERR_NO_BACKWARD, -13, "backward is undefined for this forward (TQ < TK)")   \
  X(CLNSA_ERR_INVALID_ARGUMENT, -14, "an argument is out of range")                  \
  X(CLNSA_ERR_NO_DEVICE, -15, "no OpenCL device matches the selector")               \
  X(CLNSA_ERR_BUILD, -16, "a kernel failed to build (the build log is in clnsa_last_message)") \
  X(CLNSA_ERR_OPENCL, -17, "an OpenCL call failed")                                   \
  X(CLNSA_ERR_OUT_OF_HOST_MEMORY, -18, "a host allocation failed")

typedef enum clnsa_status {
#define CLNSA_STATUS_ENUM_(name, value, text) name = value,
  CLNSA_STATUS_TABLE(CLNSA_STATUS_ENUM_)
#undef CLNSA_STATUS_ENUM_
} clnsa_status;

/*! clnsa_status_string() : a static, human-readable description of a status code.
 *  Unknown codes give "unknown status". Thread-safe. */
CLNSA_API const char *clnsa_status_string(clnsa_status status);

/* ------------------------------------------------------------------------- */
/* Context                                                                    */
/* ------------------------------------------------------------------------- */
typedef struct clnsa_context clnsa_context;

/*! clnsa_context_create() : wraps the caller's OpenCL objects. The context, device and
 *  in-order or out-of-order queue are retained (and released by clnsa_context_destroy).
 *  The queue must belong to the context and the device. */
CLNSA_API clnsa_status clnsa_context_create(cl_context context, cl_device_id device,
                                            cl_command_queue queue, clnsa_context **out);

/*! clnsa_context_create_from_selector() : convenience for tools and tests. Picks a device
 *  by `selector` (see clnsa_select_device) and creates its own OpenCL context and an
 *  in-order queue with profiling enabled. */
CLNSA_API clnsa_status clnsa_context_create_from_selector(const char *selector,
                                                         clnsa_context **out);

/*! clnsa_context_destroy() : releases everything the context created or retained.
 *  Waits for nothing: finish the queue first if work is in flight. NULL is a no-op. */
CLNSA_API void clnsa_context_destroy(clnsa_context *ctx);

/*! clnsa_last_message() : details of the last failure on this context (a validation
 *  message, or the kernel build log). Valid until the next call on the context. */
CLNSA_API const char *clnsa_last_message(const clnsa_context *ctx);

CLNSA_API cl_command_queue clnsa_context_queue(const clnsa_context *ctx);
CLNSA_API cl_device_id clnsa_context_device(const clnsa_context *ctx);
CLNSA_API cl_context clnsa_context_cl(const clnsa_context *ctx);

/*! clnsa_context_tensor_cores() : the matrix-unit path the context's attention kernels
 *  take for f16/bf16 q, k, v: CLNSA_MMA_NONE (portable kernels), CLNSA_MMA_NVIDIA
 *  (tensor cores through inline PTX mma.sync; NVIDIA devices whose probe kernel passed) or
 *  CLNSA_MMA_EMULATED (CLNSA_TUNE=MMA=2: the same kernels with the warp instructions
 *  emulated, any device, for tests). The first call runs the probe (one tiny blocking
 *  kernel on the context's queue); CLNSA_TUNE=MMA=0 turns the path off. NULL gives NONE. */
typedef enum clnsa_mma {
  CLNSA_MMA_NONE = 0,
  CLNSA_MMA_NVIDIA = 1,
  CLNSA_MMA_EMULATED = 2
} clnsa_mma;
CLNSA_API clnsa_mma clnsa_context_tensor_cores(clnsa_context *ctx);

/*! clnsa_context_wgmma() : 1 where the compressed and window branches run on Hopper's
 *  warpgroup instructions (wgmma: opt-in with CLNSA_TUNE=WGMMA=1, on compute capability
 *  9.x after their own probe kernel, or on the emulated path), 0 where they keep mma.sync
 *  or the portable kernels. The first call runs the probes. NULL gives 0. */
CLNSA_API int clnsa_context_wgmma(clnsa_context *ctx);

/*! clnsa_select_device() : resolves a device selector. `selector` is NULL, an index into
 *  the list of all devices of all platforms ("0", "1", ...) or a case-insensitive
 *  substring of "platform name / device name". NULL or "" reads the environment variable
 *  CLNSA_DEVICE and, if that is unset too, takes the first GPU, else the first device.
 *  `message` (may be NULL) receives the reason of a failure. */
CLNSA_API clnsa_status clnsa_select_device(const char *selector, cl_platform_id *platform,
                                           cl_device_id *device, char *message,
                                           size_t message_size);

/* ------------------------------------------------------------------------- */
/* Tensors                                                                    */
/* ------------------------------------------------------------------------- */
typedef enum clnsa_dtype {
  CLNSA_F32 = 0,  /* IEEE binary32 */
  CLNSA_F16 = 1,  /* IEEE binary16, stored as 16-bit words */
  CLNSA_BF16 = 2, /* bfloat16, stored as 16-bit words */
  CLNSA_I32 = 3   /* indices, counts */
} clnsa_dtype;

#define CLNSA_MAX_DIMS 4

/* A strided view into a cl_mem. offset and strides count elements, not bytes. The last
 * dimension must have stride 1; other strides may be anything non-negative, so a view
 * may point into a packed QKV buffer. */
typedef struct clnsa_tensor {
  cl_mem buffer;
  size_t offset;
  clnsa_dtype dtype;
  int ndim;
  int64_t shape[CLNSA_MAX_DIMS];
  int64_t strides[CLNSA_MAX_DIMS];
} clnsa_tensor;

/*! clnsa_tensor_make() : a C-contiguous view of `buffer` from element `offset`. */
CLNSA_API clnsa_tensor clnsa_tensor_make(cl_mem buffer, size_t offset, clnsa_dtype dtype,
                                         int ndim, const int64_t *shape);

/*! clnsa_dtype_size() : bytes per element (0 for an unknown dtype). */
CLNSA_API size_t clnsa_dtype_size(clnsa_dtype dtype);

/* ------------------------------------------------------------------------- */
/* Parameters                                                                 */
/* ------------------------------------------------------------------------- */
typedef enum clnsa_compress_method {
  CLNSA_COMPRESS_MEAN = 0,  /* mean pooling over each compression block */
  CLNSA_COMPRESS_LINEAR = 1 /* learned linear map (paper's MLP): not implemented yet */
} clnsa_compress_method;

/* Key/value caches laid out in pages (reserved: any non-NULL value returns
 * CLNSA_ERR_UNSUPPORTED in this version). */
typedef struct clnsa_paged_kv {
  const clnsa_tensor *page_table; /* [B, max_pages] int32 */
  int page_size;
} clnsa_paged_kv;

/* CLNSA_FLAG_TF32: permission (not a demand) to run the forward attention of f32 inputs
 * (compressed, selected and window branches; q, k and v all f32) on NVIDIA tensor cores in
 * TF32: q, k, v and the softmax weights are rounded to tf32 (10-bit mantissa, to nearest),
 * products are exact and sums f32. Relative error of o and lse against float64, measured
 * on the emulation (CLNSA_TUNE=MMA=2, tests/test_attend.c): o 2e-4 to 3e-4 and lse below
 * 6e-5 with inputs in [-1, 1], o 6e-4 and lse 2e-4 with peaked scores; the bound is 1e-2
 * (docs/SEMANTICS.md). Exact f32 wherever the context has no tensor-core path
 * (clnsa_context_tensor_cores) or the shapes do not fit: DK a multiple of 16 and DV of 32,
 * both <= 128, rows of q, k, v 16-byte aligned. Top-k and the backward stay exact; top-k
 * reads the compressed branch's lse, whose tf32 rounding (~1e-4) can decide near-ties of
 * block importance differently. */
#define CLNSA_FLAG_TF32 (1u << 0)

/* CLNSA_FLAG_CMP_16BIT: clnsa_forward (and the clnsa_backward that reads its workspace)
 * stores the pooled k_cmp in the dtype of k and v_cmp in that of v, each block mean
 * rounded to nearest, instead of in f32, as fla-org's and mdy666's NSA kernels do. With
 * f16 or bf16 k and v this halves the bytes of the pooled keys, and on the tensor-core
 * path the compressed branch, top-k and the compressed backward then take k_cmp as one
 * 16-bit operand instead of splitting an f32 value into two bf16 terms (bf16 q), or reach
 * the tensor cores at all (f16 q: an f32 k_cmp keeps the portable kernels; H100 and H200
 * timings in docs/PERFORMANCE.md). The rounding is part of the function computed, on
 * every device alike: scores move by about 2^-9 (bf16) or 2^-12 (f16) of |q||k_cmp|,
 * which can decide near-ties of block importance differently (the tests compare against
 * a float64 reference of the rounded k_cmp); gradients pass the rounding as if it were
 * the identity. No effect with f32 k and v, nor on the stage functions (their k_cmp,
 * v_cmp have the caller's dtypes). clnsa_backward must get the same flag as the forward
 * it reads: otherwise CLNSA_ERR_WORKSPACE. */
#define CLNSA_FLAG_CMP_16BIT (1u << 1)

#define CLNSA_MAX_HEAD_DIM 256
#define CLNSA_MAX_BLOCK_COUNT 128

typedef struct clnsa_params {
  int block_size;      /* l': selection block size, also l and d when those are 0 */
  int cmp_block_size;  /* l: compression block (0 = block_size; others unsupported) */
  int cmp_stride;      /* d: compression stride (0 = cmp_block_size; others unsupported) */
  int block_count;     /* S: selected blocks per query, width of block_indices */
  int window;          /* W: sliding window; 0 turns the branch off */
  float scale;         /* softmax scale; 0 means 1/sqrt(DK) */
  clnsa_compress_method compress;
  unsigned flags;      /* CLNSA_FLAG_* */
  const clnsa_paged_kv *paged_kv; /* NULL: contiguous k and v */
} clnsa_params;

/*! clnsa_params_default() : block_size 64, block_count 16, window 0, scale 1/sqrt(DK),
 *  mean pooling, no flags, no paging. */
CLNSA_API clnsa_params clnsa_params_default(void);

/* ------------------------------------------------------------------------- */
/* Variable-length packing                                                     */
/* ------------------------------------------------------------------------- */
typedef struct clnsa_seqs clnsa_seqs;

/*! clnsa_seqs_create() : describes n packed sequences (tensors then have B = 1 and the
 *  token axis holds every sequence back to back). cu_seqlens_q and cu_seqlens_k are host
 *  arrays of n+1 non-decreasing offsets starting at 0; cu_seqlens_k NULL means the same as
 *  cu_seqlens_q. Each sequence needs TQ_s <= TK_s (its queries are its last TQ_s tokens).
 *  Compressed keys of a packed batch are packed too: sequence s owns ceil(TK_s/block_size)
 *  rows, back to back. The object copies the arrays to the device once (blocking) so
 *  that one description can serve every layer of a step. */
CLNSA_API clnsa_status clnsa_seqs_create(clnsa_context *ctx, const clnsa_params *params,
                                         int n, const int32_t *cu_seqlens_q,
                                         const int32_t *cu_seqlens_k, clnsa_seqs **out);
CLNSA_API void clnsa_seqs_destroy(clnsa_seqs *seqs);

/* ------------------------------------------------------------------------- */
/* Forward stages. Shapes (B = 1 when seqs is given; NB = ceil(TK/BS), or the packed   */
/* total of the sequences):                                                    */
/*   q [B,TQ,HQ,DK]  k [B,TK,H,DK]  v [B,TK,H,DV]  k_cmp [B,NB,H,DK]  v_cmp [B,NB,H,DV] */
/*   o_* [B,TQ,HQ,DV]  lse_* [B,TQ,HQ] f32  block_indices [B,TQ,H,S] i32              */
/*   block_counts [B,TQ,H] i32 (optional; params->block_count otherwise)          */
/* Floating tensors may be f32, f16 or bf16 independently; lse is f32. Optional     */
/* arguments are NULL. lse of a query with an empty key set is -INFINITY.          */
/* ------------------------------------------------------------------------- */

/*! clnsa_pool() : k_cmp, v_cmp = mean of k, v over each block (true length). */
CLNSA_API clnsa_status clnsa_pool(clnsa_context *ctx, const clnsa_params *params,
                                  const clnsa_seqs *seqs, const clnsa_tensor *k,
                                  const clnsa_tensor *v, const clnsa_tensor *k_cmp,
                                  const clnsa_tensor *v_cmp, cl_uint num_events_in_wait_list,
                                  const cl_event *event_wait_list, cl_event *event);

/*! clnsa_compressed_attention() : attention of each query over the complete past
 *  compressed blocks; o_cmp = 0 and lse_cmp = -inf where there are none. lse_cmp may be NULL.
 *  k_cmp does not tell TK, so without seqs the queries are taken to be the whole sequence
 *  (TK = TQ); for TQ < TK pass seqs with n = 1, cu_seqlens_q {0, TQ}, cu_seqlens_k {0, TK}.
 *  k_cmp must have ceil(TK/BS) rows (or the packed total), else CLNSA_ERR_SHAPE_MISMATCH. */
CLNSA_API clnsa_status clnsa_compressed_attention(
    clnsa_context *ctx, const clnsa_params *params, const clnsa_seqs *seqs,
    const clnsa_tensor *q, const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp,
    const clnsa_tensor *o_cmp, const clnsa_tensor *lse_cmp, cl_uint num_events_in_wait_list,
    const cl_event *event_wait_list, cl_event *event);

/*! clnsa_topk() : block selection from compressed-attention probabilities summed over
 *  each GQA group (needs lse_cmp from clnsa_compressed_attention); forced blocks IC,
 *  IC-1, 0; ascending indices then -1. TK is found as for clnsa_compressed_attention.
 *  Per-query block_counts live on the device, where the host cannot check them without
 *  blocking: the kernel clamps each into [0, S]. */
CLNSA_API clnsa_status clnsa_topk(clnsa_context *ctx, const clnsa_params *params,
                                  const clnsa_seqs *seqs, const clnsa_tensor *q,
                                  const clnsa_tensor *k_cmp, const clnsa_tensor *lse_cmp,
                                  const clnsa_tensor *block_counts,
                                  const clnsa_tensor *block_indices,
                                  cl_uint num_events_in_wait_list,
                                  const cl_event *event_wait_list, cl_event *event);

/*! clnsa_selected_attention() : attention over the tokens of the listed blocks, used as
 *  given (entries < 0 or beyond the query's own block ignored, duplicates counted once,
 *  causal inside the own block). Block counts act in clnsa_topk only. lse_slc may be NULL. */
CLNSA_API clnsa_status clnsa_selected_attention(
    clnsa_context *ctx, const clnsa_params *params, const clnsa_seqs *seqs,
    const clnsa_tensor *q, const clnsa_tensor *k, const clnsa_tensor *v,
    const clnsa_tensor *block_indices, const clnsa_tensor *o_slc, const clnsa_tensor *lse_slc,
    cl_uint num_events_in_wait_list, const cl_event *event_wait_list, cl_event *event);

/*! clnsa_window_attention() : causal attention over the last params->window tokens
 *  (window >= TK gives dense causal attention; window 0 is the empty key set: o = 0,
 *  lse = -inf). lse_swa may be NULL. */
CLNSA_API clnsa_status clnsa_window_attention(
    clnsa_context *ctx, const clnsa_params *params, const clnsa_seqs *seqs,
    const clnsa_tensor *q, const clnsa_tensor *k, const clnsa_tensor *v,
    const clnsa_tensor *o_swa, const clnsa_tensor *lse_swa, cl_uint num_events_in_wait_list,
    const cl_event *event_wait_list, cl_event *event);

/* ------------------------------------------------------------------------- */
/* Whole pass                                                                 */
/* ------------------------------------------------------------------------- */
typedef struct clnsa_inputs {
  const clnsa_tensor *q, *k, *v;               /* required */
  const clnsa_tensor *g_cmp, *g_slc, *g_swa;   /* [B,TQ,HQ], optional (see semantics) */
  const clnsa_tensor *block_indices;           /* optional: caller-given selection */
  const clnsa_tensor *block_counts;            /* optional: per-query counts */
  const clnsa_seqs *seqs;                      /* optional: varlen packing */
} clnsa_inputs;

typedef struct clnsa_grads {
  const clnsa_tensor *dq, *dk, *dv;              /* required, shapes of q, k, v */
  const clnsa_tensor *dg_cmp, *dg_slc, *dg_swa; /* optional; only for gates given */
} clnsa_grads;

/* The workspace holds the forward's intermediates: pooled keys/values, each branch's
 * output and lse (f32), the block indices. It is what the backward reads; its size
 * depends on the shapes and on the context, so query it with the context that will run
 * the pass, allocate a cl_mem, and wrap it. On the tensor-core path, small GQA groups add
 * scratch for the kv-block-major selected kernels' per-slot partials: B*TQ*HQ*S*(DV + 1)
 * floats in the forward (G <= 2), B*TQ*HQ*S*DK in the backward (G <= 8), each only where
 * the whole workspace still fits the device's largest buffer; see docs/PERFORMANCE.md. */
typedef struct clnsa_workspace clnsa_workspace;

/*! clnsa_forward_workspace_size() : bytes the forward needs (and keeps for backward). */
CLNSA_API clnsa_status clnsa_forward_workspace_size(clnsa_context *ctx,
                                                    const clnsa_params *params,
                                                    const clnsa_inputs *in, size_t *bytes);

/*! clnsa_backward_workspace_size() : bytes a forward-then-backward needs (>= forward's). */
CLNSA_API clnsa_status clnsa_backward_workspace_size(clnsa_context *ctx,
                                                     const clnsa_params *params,
                                                     const clnsa_inputs *in, size_t *bytes);

/*! clnsa_workspace_create() : wraps `bytes` of `buffer` from byte `offset` (buffer
 *  retained; offset a multiple of 4, and of 256 for the fastest loads). The handle also
 *  records which shape the last forward saved, so that a backward with another shape is
 *  refused. Query the size with the same inputs the forward gets: the window's regions
 *  exist only when g_swa is given and window > 0. */
CLNSA_API clnsa_status clnsa_workspace_create(clnsa_context *ctx, cl_mem buffer,
                                              size_t offset, size_t bytes,
                                              clnsa_workspace **out);
CLNSA_API void clnsa_workspace_destroy(clnsa_workspace *ws);

/*! clnsa_forward() : o = g_slc*o_slc + g_cmp*o_cmp + g_swa*o_swa (semantics section 6). */
CLNSA_API clnsa_status clnsa_forward(clnsa_context *ctx, const clnsa_params *params,
                                     const clnsa_inputs *in, const clnsa_tensor *o,
                                     clnsa_workspace *ws, cl_uint num_events_in_wait_list,
                                     const cl_event *event_wait_list, cl_event *event);

/*! clnsa_forward_block_indices() : a view of the block indices the last forward used
 *  (in the workspace, [B,TQ,H,S] i32). */
CLNSA_API clnsa_status clnsa_forward_block_indices(const clnsa_workspace *ws,
                                                   clnsa_tensor *out);

/*! clnsa_backward() : gradients of the last clnsa_forward on `ws` (same params and
 *  inputs) given d_o = dL/do. Deterministic: no floating-point atomics. A forward with
 *  TQ < TK returns CLNSA_ERR_NO_BACKWARD. */
CLNSA_API clnsa_status clnsa_backward(clnsa_context *ctx, const clnsa_params *params,
                                      const clnsa_inputs *in, const clnsa_tensor *d_o,
                                      const clnsa_grads *grads, clnsa_workspace *ws,
                                      cl_uint num_events_in_wait_list,
                                      const cl_event *event_wait_list, cl_event *event);

#ifdef __cplusplus
}
#endif
#endif /* CLNSA_H */
