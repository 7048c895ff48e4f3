/* Float64 host reference of Native Sparse Attention, written from
 * /work/shared/nsa-semantics.md. Every kernel test compares against it, so it
 * favours obvious loops over speed. All arrays are dense C-order:
 *   q [B][TQ][HQ][DK]   k [B][TK][H][DK]   v [B][TK][H][DV]
 *   gates, lse [B][TQ][HQ]   o [B][TQ][HQ][DV]   block_indices [B][TQ][H][S]
 *   k_cmp [B][NB][H][DK]   v_cmp [B][NB][H][DV]   (NB = ref_num_cmp()) */
#ifndef CLNSA_TESTS_REFERENCE_H
#define CLNSA_TESTS_REFERENCE_H

typedef struct ref_shape {
  int B, TQ, TK, HQ, H, DK, DV;   /* varlen: B = 1 and TQ/TK are the packed totals */
  int nseq;                        /* 0: no varlen. else number of packed sequences */
  const int *cu_q, *cu_k;          /* [nseq+1] each when nseq > 0 (cu_k may equal cu_q;
                                      NULL cu_k also means "same as cu_q") */
  int BS;                          /* block size (compression = selection block = stride) */
  int S;                           /* block_count: width of block_indices */
  int W;                           /* window, 0 = off */
  double scale;                    /* already resolved (caller passes 1/sqrt(DK) if default) */
  const int *block_counts;         /* NULL, or [B][TQ][H] per-query counts in [0, S] */
  /* NULL, or the rounding of each pooled k_cmp / v_cmp value to its storage dtype
   * (CLNSA_FLAG_CMP_16BIT); gradients pass it as the identity */
  double (*round_k_cmp)(double), (*round_v_cmp)(double);
} ref_shape;

/* Compressed rows per batch element: ceil(TK/BS), or with varlen the sum over
 * sequences of ceil(TKs/BS) (sequence s's rows are packed back to back). */
int ref_num_cmp(const ref_shape *s);

/* Mean pooling of each block of BS tokens (the last block may be shorter), each mean then
 * rounded by s->round_k_cmp / round_v_cmp where set. */
void ref_pool(const ref_shape *s, const double *k, const double *v,
              double *k_cmp, double *v_cmp);

/* Attention over complete past blocks c < (p+1)/BS. Empty set: o = 0, lse = -inf. */
void ref_compressed(const ref_shape *s, const double *q, const double *k_cmp,
                    const double *v_cmp, double *o_cmp, double *lse_cmp);

/* Top-k block selection from the compressed scores (lse_cmp from ref_compressed). */
void ref_topk(const ref_shape *s, const double *q, const double *k_cmp,
              const double *lse_cmp, int *block_indices);

/* Attention over the tokens of the listed blocks, causal. */
void ref_selected(const ref_shape *s, const double *q, const double *k,
                  const double *v, const int *block_indices, double *o_slc,
                  double *lse_slc);

/* Sliding window attention over keys p-W < j <= p (W from s->W, must be > 0). */
void ref_window(const ref_shape *s, const double *q, const double *k,
                const double *v, double *o_swa, double *lse_swa);

typedef struct ref_inputs {
  const double *q, *k, *v, *g_cmp, *g_slc, *g_swa;
  const int *block_indices;        /* NULL: computed by ref_topk */
} ref_inputs;

/* Intermediates of ref_forward, caller-allocated; any pointer may be NULL.
 * o_swa/lse_swa are ignored when W == 0. */
typedef struct ref_saved {
  double *k_cmp, *v_cmp, *o_cmp, *lse_cmp, *o_slc, *lse_slc, *o_swa, *lse_swa;
  int *block_indices;
} ref_saved;

/* o = g_slc*o_slc (weight 1 if absent) + g_cmp*o_cmp (if given)
 *   + g_swa*o_swa (if given and W > 0). saved may be NULL. */
void ref_forward(const ref_shape *s, const ref_inputs *in, double *o,
                 ref_saved *saved);

typedef struct ref_grads {
  double *dq, *dk, *dv, *dg_cmp, *dg_slc, *dg_swa;  /* dg_* NULL when that gate absent */
} ref_grads;

/* Gradients of L given d_o = dL/do; block indices are treated as constants.
 * Every non-NULL output is overwritten (not accumulated into). */
void ref_backward(const ref_shape *s, const ref_inputs *in, const double *d_o,
                  ref_grads *g);

#endif
