/* Internal interfaces shared by the host files of libclnsa. Not installed. */
#ifndef CLNSA_INTERNAL_H
#define CLNSA_INTERNAL_H

#include <stdbool.h>
#include <stdio.h>

#include "clnsa.h"

#define CLNSA_MESSAGE_SIZE 16384

/* ---- device facts the tuning table and the program cache key need ---- */
typedef struct device_info {
  cl_uint vendor_id;       /* 0x10DE NVIDIA, 0x1002 AMD, 0x8086 Intel, else other */
  cl_device_type type;
  cl_ulong local_mem;      /* bytes of local memory per work-group */
  cl_ulong max_alloc;      /* bytes of the largest buffer (CL_DEVICE_MAX_MEM_ALLOC_SIZE) */
  size_t max_wg;           /* largest work-group */
  cl_uint compute_units;
  cl_uint cc_major, cc_minor; /* NVIDIA compute capability, 0 elsewhere */
  bool fp64;
  char name[256], driver[128], platform_name[256], platform_version[256];
} device_info;

/* ---- programs: one per (kernel file, build options), built once, cached ---- */
typedef struct program_entry {
  char *key;          /* "file\n options" */
  cl_program program;
  cl_kernel *kernels; /* created on demand, parallel to names */
  char **names;
  int nkernels;
} program_entry;

struct clnsa_context {
  cl_context cl;
  cl_device_id device;
  cl_command_queue queue;
  device_info info;
  program_entry *programs;
  int nprograms;
  int mma_hardware, mma_emulated; /* probe of the tensor-core path: 0 not run, 1 ok, -1 failed */
  int wgmma_hardware, wgmma_emulated; /* the same for the wgmma kernels (src/mma.c) */
  char message[CLNSA_MESSAGE_SIZE];
};

/* Records a formatted message on the context and returns `status` (for `return fail(...)`). */
clnsa_status clnsa_fail(clnsa_context *ctx, clnsa_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
clnsa_status clnsa_cl_fail(clnsa_context *ctx, cl_int err, const char *what);

/* mma.c: which tensor-core path a kernel launch may take (see src/mma.c). */
enum { MMA_OFF = 0, MMA_HARDWARE = 1, MMA_EMULATED = 2 };
clnsa_status mma_mode(clnsa_context *ctx, int *mode);
/* whether kernels with a wgmma variant take it under tensor-core path `mode` (Hopper) */
clnsa_status wgmma_enabled(clnsa_context *ctx, int mode, bool *on);

/* device.c */
clnsa_status device_info_query(cl_device_id device, device_info *info);

/* program.c: returns a kernel from `file` (a name in cl/, e.g. "attend.cl") built with
 * `options` (the -D defines for dtypes and tunables). The shared header cl/common.cl is
 * prepended to every program. Programs are built once per context and cached on disk. */
clnsa_status program_kernel(clnsa_context *ctx, const char *file, const char *options,
                            const char *kernel_name, cl_kernel *out);
void program_release_all(clnsa_context *ctx);

/* cl_sources.c (generated at build time from cl/ by tools/embed_cl.py) */
typedef struct cl_source {
  const char *name;
  const unsigned char *text;
  size_t length;
} cl_source;
extern const cl_source clnsa_cl_sources[];
extern const size_t clnsa_cl_source_count;

/* ---- build options: -D defines accumulated into a small string ---- */
typedef struct build_options {
  char text[1024];
  size_t len;
} build_options;
void options_add(build_options *o, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* -D<ROLE>_DT=<dtype> for a tensor given to a kernel under that role name. */
void options_add_dtype(build_options *o, const char *role, const clnsa_tensor *t);

/* ---- tuning.c: per-device tunables, as -D defines ---- */
typedef struct attend_tuning {
  int rows;      /* query rows per work-group */
  int key_tile;  /* keys staged in local memory per step */
  int threads;   /* work-items per work-group */
} attend_tuning;
attend_tuning tuning_attend(const clnsa_context *ctx, int dk, int dv, int rows_hint);
/* Appends CLNSA_TUNE (environment, "NAME=VALUE,NAME=VALUE") as -D defines: experiments only. */
void tuning_env_override(build_options *o);
/* The value CLNSA_TUNE gives `name` (an integer >= min), else fallback: for tunables the
 * host must know too (they size the grid), so that host and kernel never disagree. */
int tuning_env_int(const char *name, int fallback, int min);

/* ---- tensors (tensor.c) ---- */
/* Checks a tensor's handle, dtype (allowed: bit mask of 1u << dtype), rank, shape
 * (expected[i] < 0 means any), strides and that the buffer holds what they address. */
clnsa_status tensor_check(clnsa_context *ctx, const clnsa_tensor *t, const char *name,
                          int ndim, const int64_t *expected, unsigned dtype_mask);
#define DT_FLOAT ((1u << CLNSA_F32) | (1u << CLNSA_F16) | (1u << CLNSA_BF16))
#define DT_INT (1u << CLNSA_I32)
/* Sets the 4 kernel arguments of a tensor: buffer, offset, and the strides of dims 0..2
 * (batch, token, head; the last dim has stride 1). Rank-3 tensors pass 1 for dim 2... */
cl_int tensor_set_args(cl_kernel k, cl_uint *arg, const clnsa_tensor *t);
/* Arguments for an optional tensor: a NULL buffer and zeros. */
cl_int tensor_set_absent_args(cl_kernel k, cl_uint *arg);
/* Rows of t (head dim `dim`) readable in aligned units of n elements (offset, strides,
 * dim whole units); tensor_rows_aligned16: units of 16 bytes. */
bool tensor_rows_vec(const clnsa_tensor *t, int dim, int n);
bool tensor_rows_aligned16(const clnsa_tensor *t, int dim);

/* ---- problem dimensions shared by all stages (dims.c) ---- */
struct clnsa_seqs {
  clnsa_context *ctx;
  int n;
  int block_size;
  int32_t *host;   /* cu_q[n+1], cu_k[n+1], cu_c[n+1] back to back */
  cl_mem device;   /* the same three arrays */
  int total_q, total_k, total_c;
  int max_q, max_k; /* longest sequence (for launch sizing) */
};

typedef struct nsa_dims {
  int B, TQ, TK, HQ, H, G, DK, DV;
  int BS, S, W;
  int NB;          /* compressed rows per batch element (packed total with seqs) */
  float scale;
  bool tf32;       /* CLNSA_FLAG_TF32: f32 attention may run on tf32 matrix units */
  bool cmp16;      /* CLNSA_FLAG_CMP_16BIT */
  /* dtypes of the whole forward's k_cmp, v_cmp (inputs_validate): f32, or with cmp16
   * those of k and v */
  clnsa_dtype kc_dt, vc_dt;
  const clnsa_seqs *seqs;
} nsa_dims;

/* Validates params and fills the parameter part of dims (BS, S, W, scale needs DK). */
clnsa_status dims_params(clnsa_context *ctx, const clnsa_params *p, nsa_dims *d);
/* From k and v (both [B,TK,H,D]); seqs may be NULL. */
clnsa_status dims_kv(clnsa_context *ctx, const clnsa_seqs *seqs, const clnsa_tensor *k,
                     const clnsa_tensor *v, const char *kname, const char *vname, nsa_dims *d);
/* For stages that see pooled keys instead of k and v (compressed attention, top-k;
 * v_cmp may be NULL): k_cmp does not tell TK, so it is seqs->total_k with seqs, else TQ,
 * and k_cmp must have NB = ceil(TK/BS) rows (or the packed total). Also runs dims_q. */
clnsa_status dims_cmp(clnsa_context *ctx, const clnsa_seqs *seqs, const clnsa_tensor *q,
                      const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp, nsa_dims *d);
/* From q given dims_kv's result: HQ, G, TQ, and the varlen agreement. */
clnsa_status dims_q(clnsa_context *ctx, const clnsa_tensor *q, nsa_dims *d);
/* Expected shapes, to pass to tensor_check. */
void dims_shape_q(const nsa_dims *d, int64_t s[4]);       /* [B,TQ,HQ,DK] */
void dims_shape_o(const nsa_dims *d, int64_t s[4]);       /* [B,TQ,HQ,DV] */
void dims_shape_rows(const nsa_dims *d, int64_t s[3]);    /* [B,TQ,HQ] */
void dims_shape_kcmp(const nsa_dims *d, int64_t s[4]);    /* [B,NB,H,DK] */
void dims_shape_vcmp(const nsa_dims *d, int64_t s[4]);    /* [B,NB,H,DV] */
void dims_shape_idx(const nsa_dims *d, int64_t s[4]);     /* [B,TQ,H,S] */
void dims_shape_counts(const nsa_dims *d, int64_t s[3]);  /* [B,TQ,H] */
/* An optional float tensor of shape [B,TQ,HQ] (gates, their gradients). */
clnsa_status dims_check_rows(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *t,
                             const char *name);
/* Sets the sequence arguments every kernel takes after its tensors:
 * cu (global int*, NULL without seqs), nseq, B, TQ, TK, NB, HQ, H. */
cl_int dims_set_seq_args(cl_kernel k, cl_uint *arg, const nsa_dims *d);
/* Every sequence's queries are all its tokens (TQ = TK per sequence): training and
 * prefill. The backward, and the selection masks (positions = token indices), need it. */
bool dims_full_sequences(const nsa_dims *d);

/* nsa.c: the whole pass's inputs (params, q/k/v, gates, indices, counts), for the forward,
 * the workspace size queries and the backward. */
clnsa_status inputs_validate(clnsa_context *ctx, const clnsa_params *params,
                             const clnsa_inputs *in, nsa_dims *d);

/* ---- enqueue chains (launch.c): several kernels behave as one clEnqueue* call ---- */
typedef struct enqueue_chain {
  cl_uint nwait;
  const cl_event *wait;
  cl_event last;       /* event of the most recent launch, owned by the chain */
  bool dry_run;        /* build and set arguments, enqueue nothing */
} enqueue_chain;
void chain_begin(enqueue_chain *c, cl_uint nwait, const cl_event *wait);
/* A chain that enqueues nothing: a multi-kernel operation runs its stages through one
 * first, so that every kernel is built and every tuning check passed before the real
 * chain enqueues anything (a failure then leaves every buffer untouched). */
void chain_begin_dry(enqueue_chain *c);
/* Enqueues a kernel that waits on the previous link (or the caller's list). */
clnsa_status chain_launch(clnsa_context *ctx, enqueue_chain *c, cl_kernel k, cl_uint work_dim,
                          const size_t *global, const size_t *local);
/* Hands the last event to the caller (or releases it); with no launch, enqueues a marker. */
clnsa_status chain_end(clnsa_context *ctx, enqueue_chain *c, cl_event *event);
void chain_abort(enqueue_chain *c);

/* Kernel arguments set in order; the first error is kept and reported by args_launch. */
typedef struct kargs {
  cl_kernel k;
  cl_uint n;
  cl_int err;
} kargs;
kargs args_begin(cl_kernel k);
/* How a memory-bound kernel (combine, gate gradients, finalize) walks rows of `width`
 * elements: vecw consecutive elements a step (4 where `vec`: the caller checked the
 * rows' alignment), `lanes` work-items a row, `rows` rows a work-group of lanes * rows
 * items (128, 64 on CPUs, halved to the device's limit). Lanes: one vector each up to
 * max_lanes (0: the group), rounded up to a power of two with pow2 (for a fixed tree). */
typedef struct row_walk {
  int vecw, lanes, rows;
} row_walk;
row_walk row_walk_plan(const clnsa_context *ctx, int width, bool vec, int max_lanes, bool pow2);
void arg_tensor(kargs *a, const clnsa_tensor *t); /* NULL: an absent tensor's arguments */
void arg_mem(kargs *a, cl_mem m);
void arg_long(kargs *a, cl_long v);
void arg_int(kargs *a, cl_int v);
void arg_float(kargs *a, cl_float v);
void arg_seq(kargs *a, const nsa_dims *d); /* dims_set_seq_args */
/* chain_launch, or the failure of an argument (named by the kernel). */
clnsa_status args_launch(clnsa_context *ctx, enqueue_chain *c, const kargs *a, cl_uint dims,
                         const size_t *global, const size_t *local);

/* ---- stage launchers (one file each); they assume validated arguments ---- */
clnsa_status pool_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *k,
                          const clnsa_tensor *v, const clnsa_tensor *k_cmp,
                          const clnsa_tensor *v_cmp, enqueue_chain *c);

/* attend.c (cl/attend.cl): flash-style attention with per-row key sets. lse may be NULL. */
clnsa_status compressed_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                                const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp,
                                const clnsa_tensor *o, const clnsa_tensor *lse,
                                enqueue_chain *c);
clnsa_status window_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                            const clnsa_tensor *k, const clnsa_tensor *v, const clnsa_tensor *o,
                            const clnsa_tensor *lse, enqueue_chain *c);
/* Tensors cl/attend_mma.cl takes: q f16/bf16, k and v of its type (or f32 with bf16 q),
 * head dims in 32-wide chunks within the register budget, rows aligned to 16 bytes. */
bool attend_mma_fits(const nsa_dims *d, const clnsa_tensor *q, const clnsa_tensor *k,
                     const clnsa_tensor *v);
clnsa_status selected_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                              const clnsa_tensor *k, const clnsa_tensor *v,
                              const clnsa_tensor *block_indices, const clnsa_tensor *o,
                              const clnsa_tensor *lse, enqueue_chain *c);
/* selected_kvm.c (MODE 3 of cl/attend_mma.cl, cl/selected_merge.cl): the selected
 * branch in kv-block-major order, for small G on the tensor-core path. *range_tokens is
 * the tokens one launch covers (0: it does not take these inputs); *scratch_bytes is what
 * it needs after the forward's regions, at most room (ws_scratch_room). */
clnsa_status selected_kvm_plan(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                               const clnsa_tensor *k, const clnsa_tensor *v, size_t room,
                               size_t *range_tokens, size_t *scratch_bytes);
/* Same outputs as selected_enqueue; scratch is the byte offset of its region in buf,
 * range_tokens the plan's. */
clnsa_status selected_kvm_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                                  const clnsa_tensor *k, const clnsa_tensor *v,
                                  const clnsa_tensor *block_indices, const clnsa_tensor *o,
                                  const clnsa_tensor *lse, cl_mem buf, size_t scratch,
                                  size_t range_tokens, enqueue_chain *c);

/* select_mask.c (cl/select_mask.cl): the selection turned around, for the backward and
 * for selected_kvm.c: per (kv head, block) a bit mask of the tokens that chose it, cut
 * into chunks of at least chunk_tokens tokens (the last of a row may hold fewer). Regions
 * are element offsets into buf. */
typedef struct select_mask_at {
  cl_mem buf;
  cl_long mask, counts, offsets, slot_row, slot_word;
  int nch;            /* mask words per row: ceil(longest sequence / 32) */
  int chunk_tokens;
} select_mask_at;
typedef struct select_mask_kernels {
  cl_kernel build, chunks, scan;
  int scan_wg;
} select_mask_kernels;
clnsa_status select_mask_kernels_get(clnsa_context *ctx, int scan_wg, select_mask_kernels *k);
clnsa_status select_mask_enqueue(clnsa_context *ctx, const nsa_dims *d,
                                 const select_mask_kernels *k, const clnsa_tensor *idx,
                                 const select_mask_at *at, enqueue_chain *c);
/* Bound on the chunks over all mask rows: H (B TQ S / chunk_tokens + B NB). */
size_t select_mask_slots(const nsa_dims *d, int chunk_tokens);

/* topk.c (cl/topk.cl). block_counts may be NULL (then d->S for every query). */
clnsa_status topk_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *q,
                          const clnsa_tensor *k_cmp, const clnsa_tensor *lse_cmp,
                          const clnsa_tensor *block_counts, const clnsa_tensor *block_indices,
                          enqueue_chain *c);

/* ---- the whole pass (nsa.c) and its workspace ---- */
/* Byte offsets of the forward's intermediates from the start of the workspace (each a
 * multiple of 256; all f32 except block_indices, i32). o_swa/lse_swa are reserved only
 * when the window branch runs (W > 0 and g_swa given), else they are 0 and unused.
 * end: bytes the forward needs; scratch: where backward scratch starts (end rounded up
 * to 256). */
typedef struct ws_layout {
  size_t k_cmp, v_cmp, o_cmp, lse_cmp, block_indices, o_slc, lse_slc, o_swa, lse_swa;
  size_t end, scratch;
} ws_layout;

struct clnsa_workspace {
  clnsa_context *ctx;
  cl_mem buffer; /* retained */
  size_t offset; /* bytes, a multiple of 4 */
  size_t bytes;
  struct {              /* what the last successful clnsa_forward saved */
    bool valid;
    nsa_dims dims;
    clnsa_dtype q_dt, k_dt, v_dt;
    bool g_cmp, g_slc, g_swa;   /* gates given */
    bool window;                /* o_swa/lse_swa were computed (W > 0 and g_swa) */
    bool compressed;            /* k_cmp, v_cmp, o_cmp, lse_cmp were computed */
    bool caller_indices;        /* block_indices came from the caller, not the workspace */
    bool block_counts;          /* per-query counts were given */
    ws_layout layout;
  } last;
};

/* nsa.c: the workspace regions as tensors (f32 except the i32 indices). */
typedef struct ws_views {
  clnsa_tensor k_cmp, v_cmp, o_cmp, lse_cmp, idx, o_slc, lse_slc, o_swa, lse_swa;
} ws_views;
void workspace_views(const clnsa_workspace *ws, const nsa_dims *d, const ws_layout *l,
                     ws_views *v);
/* Workspace and scratch layouts: reserves `elems` 4-byte elements at the next offset that
 * is a multiple of 256 bytes after *at, advances *at past them, returns the offset. */
size_t ws_reserve(size_t *at, size_t elems);
/* Bytes a scratch after the forward's regions may take so that the whole workspace still
 * fits one buffer of the device (CL_DEVICE_MAX_MEM_ALLOC_SIZE): the optional partials
 * (kv-block-major forward and dq) are declined beyond it rather than ask for a workspace
 * no buffer can hold. */
size_t ws_scratch_room(const clnsa_context *ctx, const nsa_dims *d, const clnsa_inputs *in);
/* Tokens (b TQ + t) a pass of a kv-block-major kernel covers, so that a pass's partials,
 * per_token bytes a token, fit budget: as few passes as fit, of equal size. CLNSA_TUNE's
 * cap_mb caps a pass's partials at that many MiB, fixed_tokens sets the tokens a pass
 * below that (tests: many passes on small shapes). 0 where a pass would hold fewer than
 * WS_PASS_MIN tokens (and fewer than all): each pass repeats its chunks' setup, so the
 * caller then runs its query-major kernel. */
#define WS_PASS_MIN 1024
size_t ws_pass_tokens(size_t all, size_t budget, size_t per_token, const char *cap_mb,
                      const char *fixed_tokens);

/* backward.c: bytes of scratch the backward needs after the forward's regions (0 where
 * no backward exists). */
clnsa_status backward_scratch_bytes(clnsa_context *ctx, const nsa_dims *d,
                                    const clnsa_inputs *in, size_t *bytes);

#define CHECK_STATUS(expr)                                                             \
  do {                                                                                 \
    clnsa_status s_ = (expr);                                                          \
    if (s_ != CLNSA_SUCCESS) return s_;                                                \
  } while (0)

#endif /* CLNSA_INTERNAL_H */
