/* Problem dimensions: parameters, shapes and varlen packing, validated once for every
 * stage. See docs/SEMANTICS.md for what each name means. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

clnsa_status dims_params(clnsa_context *ctx, const clnsa_params *p, nsa_dims *d) {
  if (!p) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "params is NULL");
  if (p->block_size < 1 || p->block_size > 4096)
    return clnsa_fail(ctx, CLNSA_ERR_BLOCK_COUNT, "block_size %d is outside [1, 4096]",
                      p->block_size);
  if (p->block_count < 1 || p->block_count > CLNSA_MAX_BLOCK_COUNT)
    return clnsa_fail(ctx, CLNSA_ERR_BLOCK_COUNT, "block_count %d is outside [1, %d]",
                      p->block_count, CLNSA_MAX_BLOCK_COUNT);
  if (p->window < 0)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "window %d is negative", p->window);
  if (!isfinite(p->scale) || p->scale < 0)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "scale must be finite and >= 0");
  if ((unsigned)p->compress > CLNSA_COMPRESS_LINEAR || p->cmp_block_size < 0 || p->cmp_stride < 0)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "unknown compression settings");
  int l = p->cmp_block_size ? p->cmp_block_size : p->block_size;
  int stride = p->cmp_stride ? p->cmp_stride : l;
  if (l != p->block_size || stride != l)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED,
                      "compression block %d and stride %d different from the selection block "
                      "%d are not implemented yet",
                      l, stride, p->block_size);
  if (p->compress != CLNSA_COMPRESS_MEAN)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED, "learned compression is not implemented yet");
  if (p->paged_kv)
    return clnsa_fail(ctx, CLNSA_ERR_UNSUPPORTED, "paged key/value caches are not implemented yet");
  if (p->flags & ~(CLNSA_FLAG_TF32 | CLNSA_FLAG_CMP_16BIT))
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "unknown flags 0x%x", p->flags);
  d->BS = p->block_size;
  d->S = p->block_count;
  d->W = p->window;
  d->scale = p->scale;
  d->tf32 = (p->flags & CLNSA_FLAG_TF32) != 0;
  d->cmp16 = (p->flags & CLNSA_FLAG_CMP_16BIT) != 0;
  return CLNSA_SUCCESS;
}

static clnsa_status check_head_dim(clnsa_context *ctx, const char *name, int64_t dim) {
  if (dim < 1 || dim > CLNSA_MAX_HEAD_DIM)
    return clnsa_fail(ctx, CLNSA_ERR_HEAD_DIM, "%s: head dimension %lld is outside [1, %d]",
                      name, (long long)dim, CLNSA_MAX_HEAD_DIM);
  return CLNSA_SUCCESS;
}

/* The part of a varlen description every stage checks the same way. */
static clnsa_status dims_seqs(clnsa_context *ctx, const clnsa_seqs *seqs, nsa_dims *d) {
  d->seqs = seqs;
  if (!seqs) return CLNSA_SUCCESS;
  if (seqs->ctx != ctx)
    return clnsa_fail(ctx, CLNSA_ERR_INVALID_ARGUMENT, "seqs belongs to another context");
  if (seqs->block_size != d->BS)
    return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "seqs was made for block size %d, not %d",
                      seqs->block_size, d->BS);
  return CLNSA_SUCCESS;
}

clnsa_status dims_kv(clnsa_context *ctx, const clnsa_seqs *seqs, const clnsa_tensor *k,
                     const clnsa_tensor *v, const char *kname, const char *vname, nsa_dims *d) {
  if (!k) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "%s is NULL", kname);
  if (!v) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "%s is NULL", vname);
  if (k->ndim != 4 || v->ndim != 4)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s and %s must have rank 4", kname, vname);
  CHECK_STATUS(check_head_dim(ctx, kname, k->shape[3]));
  CHECK_STATUS(check_head_dim(ctx, vname, v->shape[3]));
  if (k->shape[2] < 1 || k->shape[2] > 65536)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s: %lld kv heads", kname,
                      (long long)k->shape[2]);
  if (k->shape[0] > (1 << 20) || k->shape[1] > (1 << 30))
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "%s: batch or length too large", kname);
  int64_t vshape[4] = {k->shape[0], k->shape[1], k->shape[2], -1};
  CHECK_STATUS(tensor_check(ctx, k, kname, 4, NULL, DT_FLOAT));
  CHECK_STATUS(tensor_check(ctx, v, vname, 4, vshape, DT_FLOAT));
  d->B = (int)k->shape[0];
  d->TK = (int)k->shape[1];
  d->H = (int)k->shape[2];
  d->DK = (int)k->shape[3];
  d->DV = (int)v->shape[3];
  CHECK_STATUS(dims_seqs(ctx, seqs, d));
  if (seqs) {
    if (d->B != 1 || d->TK != seqs->total_k)
      return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS,
                        "varlen needs B = 1 and %s length %d = cu_seqlens_k[n] = %d", kname,
                        d->TK, seqs->total_k);
    d->NB = seqs->total_c;
  } else {
    d->NB = (d->TK + d->BS - 1) / d->BS;
  }
  if (d->scale == 0) d->scale = (float)(1.0 / sqrt((double)d->DK));
  return CLNSA_SUCCESS;
}

clnsa_status dims_cmp(clnsa_context *ctx, const clnsa_seqs *seqs, const clnsa_tensor *q,
                      const clnsa_tensor *k_cmp, const clnsa_tensor *v_cmp, nsa_dims *d) {
  if (!q) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "q is NULL");
  if (!k_cmp) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "k_cmp is NULL");
  if (q->ndim != 4 || k_cmp->ndim != 4 || (v_cmp && v_cmp->ndim != 4))
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "q, k_cmp and v_cmp must have rank 4");
  CHECK_STATUS(check_head_dim(ctx, "k_cmp", k_cmp->shape[3]));
  if (v_cmp) CHECK_STATUS(check_head_dim(ctx, "v_cmp", v_cmp->shape[3]));
  if (k_cmp->shape[2] < 1 || k_cmp->shape[2] > 65536)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "k_cmp: %lld kv heads",
                      (long long)k_cmp->shape[2]);
  if (k_cmp->shape[0] > (1 << 20) || k_cmp->shape[1] > (1 << 30) || q->shape[1] > (1 << 30) ||
      k_cmp->shape[0] * q->shape[1] > INT32_MAX || k_cmp->shape[0] * k_cmp->shape[1] > INT32_MAX)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "k_cmp or q: batch or length too large");
  CHECK_STATUS(tensor_check(ctx, k_cmp, "k_cmp", 4, NULL, DT_FLOAT));
  if (v_cmp) {
    int64_t vshape[4] = {k_cmp->shape[0], k_cmp->shape[1], k_cmp->shape[2], -1};
    CHECK_STATUS(tensor_check(ctx, v_cmp, "v_cmp", 4, vshape, DT_FLOAT));
  }
  d->B = (int)k_cmp->shape[0];
  d->H = (int)k_cmp->shape[2];
  d->DK = (int)k_cmp->shape[3];
  d->DV = v_cmp ? (int)v_cmp->shape[3] : d->DK;
  CHECK_STATUS(dims_seqs(ctx, seqs, d));
  if (seqs) {
    if (d->B != 1)
      return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "varlen needs B = 1, k_cmp has B = %d", d->B);
    d->TK = seqs->total_k;
    d->NB = seqs->total_c;
  } else {
    d->TK = (int)q->shape[1];
    d->NB = (d->TK + d->BS - 1) / d->BS;
  }
  if (k_cmp->shape[1] != d->NB)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH,
                      "k_cmp has %lld compressed rows, expected %d for %d keys of block size "
                      "%d (%s)",
                      (long long)k_cmp->shape[1], d->NB, d->TK, d->BS,
                      seqs ? "the packed total of the sequences"
                           : "without seqs, keys = queries; pass seqs when TQ < TK");
  if (d->scale == 0) d->scale = (float)(1.0 / sqrt((double)d->DK));
  return dims_q(ctx, q, d);
}

clnsa_status dims_q(clnsa_context *ctx, const clnsa_tensor *q, nsa_dims *d) {
  if (!q) return clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "q is NULL");
  if (q->ndim != 4) return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "q must have rank 4");
  if (q->shape[2] < 1 || q->shape[2] > 65536)
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "q: %lld heads", (long long)q->shape[2]);
  if (q->shape[2] % d->H != 0)
    return clnsa_fail(ctx, CLNSA_ERR_GROUP_SIZE, "q has %lld heads, not a multiple of %d kv heads",
                      (long long)q->shape[2], d->H);
  if (q->shape[3] != d->DK) {
    CHECK_STATUS(check_head_dim(ctx, "q", q->shape[3]));
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH, "q head dim %lld != k head dim %d",
                      (long long)q->shape[3], d->DK);
  }
  int64_t expect[4] = {d->B, -1, -1, d->DK};
  CHECK_STATUS(tensor_check(ctx, q, "q", 4, expect, DT_FLOAT));
  d->TQ = (int)q->shape[1];
  d->HQ = (int)q->shape[2];
  d->G = d->HQ / d->H;
  if (d->seqs) {
    if (d->TQ != d->seqs->total_q)
      return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "q length %d != cu_seqlens_q[n] = %d", d->TQ,
                        d->seqs->total_q);
  } else if (d->TQ > d->TK) {
    return clnsa_fail(ctx, CLNSA_ERR_SHAPE_MISMATCH,
                      "q has %d tokens, more than the %d of k (queries are the last TQ)", d->TQ,
                      d->TK);
  }
  return CLNSA_SUCCESS;
}

void dims_shape_q(const nsa_dims *d, int64_t s[4]) {
  s[0] = d->B, s[1] = d->TQ, s[2] = d->HQ, s[3] = d->DK;
}
void dims_shape_o(const nsa_dims *d, int64_t s[4]) {
  s[0] = d->B, s[1] = d->TQ, s[2] = d->HQ, s[3] = d->DV;
}
void dims_shape_rows(const nsa_dims *d, int64_t s[3]) { s[0] = d->B, s[1] = d->TQ, s[2] = d->HQ; }
void dims_shape_kcmp(const nsa_dims *d, int64_t s[4]) {
  s[0] = d->B, s[1] = d->NB, s[2] = d->H, s[3] = d->DK;
}
void dims_shape_vcmp(const nsa_dims *d, int64_t s[4]) {
  s[0] = d->B, s[1] = d->NB, s[2] = d->H, s[3] = d->DV;
}
void dims_shape_idx(const nsa_dims *d, int64_t s[4]) {
  s[0] = d->B, s[1] = d->TQ, s[2] = d->H, s[3] = d->S;
}
void dims_shape_counts(const nsa_dims *d, int64_t s[3]) { s[0] = d->B, s[1] = d->TQ, s[2] = d->H; }

clnsa_status dims_check_rows(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *t,
                             const char *name) {
  if (!t) return CLNSA_SUCCESS;
  int64_t s[3];
  dims_shape_rows(d, s);
  return tensor_check(ctx, t, name, 3, s, DT_FLOAT);
}

cl_int dims_set_seq_args(cl_kernel k, cl_uint *arg, const nsa_dims *d) {
  cl_int nseq = d->seqs ? d->seqs->n : 0;
  cl_int v[7] = {nseq, d->B, d->TQ, d->TK, d->NB, d->HQ, d->H};
  cl_int err = clSetKernelArg(k, (*arg)++, sizeof(cl_mem), d->seqs ? &d->seqs->device : NULL);
  for (int i = 0; i < 7; i++) err |= clSetKernelArg(k, (*arg)++, sizeof(cl_int), &v[i]);
  return err;
}

bool dims_full_sequences(const nsa_dims *d) {
  if (!d->seqs) return d->TQ == d->TK;
  const int32_t *cq = d->seqs->host, *ck = d->seqs->host + d->seqs->n + 1;
  for (int i = 0; i < d->seqs->n; i++)
    if (cq[i + 1] - cq[i] != ck[i + 1] - ck[i]) return false;
  return true;
}

/* ---- varlen descriptions ---- */
static clnsa_status check_cu(clnsa_context *ctx, const int32_t *cu, int n, const char *name) {
  if (cu[0] != 0)
    return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "%s[0] is %d, must be 0", name, cu[0]);
  for (int i = 0; i < n; i++)
    if (cu[i + 1] < cu[i])
      return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "%s decreases at %d (%d > %d)", name, i,
                        cu[i], cu[i + 1]);
  return CLNSA_SUCCESS;
}

clnsa_status clnsa_seqs_create(clnsa_context *ctx, const clnsa_params *params, int n,
                               const int32_t *cu_q, const int32_t *cu_k, clnsa_seqs **out) {
  if (!ctx || !params || !cu_q || !out) {
    if (ctx) clnsa_fail(ctx, CLNSA_ERR_NULL_ARGUMENT, "clnsa_seqs_create: NULL argument");
    return CLNSA_ERR_NULL_ARGUMENT;
  }
  *out = NULL;
  nsa_dims d;
  CHECK_STATUS(dims_params(ctx, params, &d));
  if (n < 1 || n > (1 << 24))
    return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS, "number of sequences %d is out of range", n);
  if (!cu_k) cu_k = cu_q;
  CHECK_STATUS(check_cu(ctx, cu_q, n, "cu_seqlens_q"));
  CHECK_STATUS(check_cu(ctx, cu_k, n, "cu_seqlens_k"));
  clnsa_seqs *s = calloc(1, sizeof *s);
  int32_t *h = malloc(sizeof(int32_t) * 3 * ((size_t)n + 1));
  if (!s || !h) {
    free(s);
    free(h);
    return CLNSA_ERR_OUT_OF_HOST_MEMORY;
  }
  int64_t cmp = 0;
  h[2 * (n + 1)] = 0;
  for (int i = 0; i <= n; i++) {
    h[i] = cu_q[i];
    h[n + 1 + i] = cu_k[i];
    if (i < n) {
      int lq = cu_q[i + 1] - cu_q[i], lk = cu_k[i + 1] - cu_k[i];
      if (lq > lk) {
        free(s);
        free(h);
        return clnsa_fail(ctx, CLNSA_ERR_CU_SEQLENS,
                          "sequence %d has %d queries but only %d keys", i, lq, lk);
      }
      s->max_q = lq > s->max_q ? lq : s->max_q;
      s->max_k = lk > s->max_k ? lk : s->max_k;
      cmp += (lk + d.BS - 1) / d.BS;
      h[2 * (n + 1) + i + 1] = (int32_t)cmp;
    }
  }
  cl_int err;
  s->device = clCreateBuffer(ctx->cl, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                             sizeof(int32_t) * 3 * ((size_t)n + 1), h, &err);
  if (err != CL_SUCCESS) {
    free(s);
    free(h);
    return clnsa_cl_fail(ctx, err, "clCreateBuffer(cu_seqlens)");
  }
  s->ctx = ctx;
  s->n = n;
  s->block_size = d.BS;
  s->host = h;
  s->total_q = cu_q[n];
  s->total_k = cu_k[n];
  s->total_c = (int)cmp;
  *out = s;
  return CLNSA_SUCCESS;
}

void clnsa_seqs_destroy(clnsa_seqs *s) {
  if (!s) return;
  clReleaseMemObject(s->device);
  free(s->host);
  free(s);
}
