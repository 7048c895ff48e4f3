/* Float64 host reference of NSA; see reference.h and nsa-semantics.md.
 * Structure: every attention branch is "softmax attention of one query over a
 * key set"; the branches differ only in how the key set is built (key_set) and
 * in which key/value rows they read (raw tokens or pooled blocks). */
#include "reference.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum branch { BR_CMP, BR_SLC, BR_SWA };

/* One independent sequence: a batch element, or a packed varlen sequence.
 * q0/k0/c0 are its first query row, key row and compressed row. */
typedef struct seg {
  int q0, k0, c0, tq, tk, nb;
} seg;

/* Per-call scratch, sized for the longest possible key set (TK). */
typedef struct scratch {
  int *idx;
  double *prob, *dob;
  unsigned char *mark;
} scratch;

static void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size);
  assert(p && "reference: out of memory");
  return p;
}

static int ceil_div(int a, int b) { return (a + b - 1) / b; }
static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }

static double dot(const double *a, const double *b, int n) {
  double acc = 0.0;
  for (int d = 0; d < n; d++) acc += a[d] * b[d];
  return acc;
}

static void check_shape(const ref_shape *s) {
  assert(s->BS > 0 && s->H > 0 && s->HQ % s->H == 0);
  assert(s->nseq == 0 || (s->B == 1 && s->cu_q));
  (void)s;
}

static int num_segs(const ref_shape *s) { return s->nseq > 0 ? s->nseq : s->B; }

static seg get_seg(const ref_shape *s, int n) {
  seg g;
  if (s->nseq == 0) {
    g.tq = s->TQ;
    g.tk = s->TK;
    g.nb = ceil_div(s->TK, s->BS);
    g.q0 = n * s->TQ;
    g.k0 = n * s->TK;
    g.c0 = n * g.nb;
    return g;
  }
  const int *cq = s->cu_q, *ck = s->cu_k ? s->cu_k : s->cu_q;
  g.q0 = cq[n];
  g.tq = cq[n + 1] - cq[n];
  g.k0 = ck[n];
  g.tk = ck[n + 1] - ck[n];
  g.nb = ceil_div(g.tk, s->BS);
  g.c0 = 0; /* compressed rows of earlier sequences come first */
  for (int m = 0; m < n; m++) g.c0 += ceil_div(ck[m + 1] - ck[m], s->BS);
  assert(g.tq <= g.tk);
  return g;
}

int ref_num_cmp(const ref_shape *s) {
  if (s->nseq == 0) return ceil_div(s->TK, s->BS);
  seg last = get_seg(s, s->nseq - 1);
  return last.c0 + last.nb;
}

static scratch scratch_new(const ref_shape *s) {
  scratch w;
  w.idx = xcalloc((size_t)s->TK + 1, sizeof *w.idx);
  w.prob = xcalloc((size_t)s->TK + 1, sizeof *w.prob);
  w.mark = xcalloc((size_t)s->TK + 1, 1);
  w.dob = xcalloc((size_t)s->DV + 1, sizeof *w.dob);
  return w;
}

static void scratch_free(scratch *w) {
  free(w->idx);
  free(w->prob);
  free(w->mark);
  free(w->dob);
}

/* ---------------------------------------------------------------- pooling */

void ref_pool(const ref_shape *s, const double *k, const double *v,
              double *k_cmp, double *v_cmp) {
  check_shape(s);
  const int H = s->H, DK = s->DK, DV = s->DV;
  for (int n = 0; n < num_segs(s); n++) {
    seg g = get_seg(s, n);
    for (int c = 0; c < g.nb; c++) {
      int lo = c * s->BS, hi = imin(lo + s->BS, g.tk);
      for (int h = 0; h < H; h++) {
        double *kc = k_cmp + ((size_t)(g.c0 + c) * H + h) * DK;
        double *vc = v_cmp + ((size_t)(g.c0 + c) * H + h) * DV;
        for (int d = 0; d < DK; d++) {
          double acc = 0.0;
          for (int j = lo; j < hi; j++) acc += k[((size_t)(g.k0 + j) * H + h) * DK + d];
          kc[d] = acc / (hi - lo); /* true length: the last block may be short */
          if (s->round_k_cmp) kc[d] = s->round_k_cmp(kc[d]);
        }
        for (int d = 0; d < DV; d++) {
          double acc = 0.0;
          for (int j = lo; j < hi; j++) acc += v[((size_t)(g.k0 + j) * H + h) * DV + d];
          vc[d] = acc / (hi - lo);
          if (s->round_v_cmp) vc[d] = s->round_v_cmp(vc[d]);
        }
      }
    }
  }
}

/* Gradient of the pooling: each token of block c gets d_cmp[c] / len(c). */
static void unpool_grad(const ref_shape *s, const double *dk_cmp,
                        const double *dv_cmp, double *dk, double *dv) {
  const int H = s->H, DK = s->DK, DV = s->DV;
  for (int n = 0; n < num_segs(s); n++) {
    seg g = get_seg(s, n);
    for (int c = 0; c < g.nb; c++) {
      int lo = c * s->BS, hi = imin(lo + s->BS, g.tk);
      for (int j = lo; j < hi; j++) {
        for (int h = 0; h < H; h++) {
          const double *gk = dk_cmp + ((size_t)(g.c0 + c) * H + h) * DK;
          const double *gv = dv_cmp + ((size_t)(g.c0 + c) * H + h) * DV;
          double *tk = dk + ((size_t)(g.k0 + j) * H + h) * DK;
          double *tv = dv + ((size_t)(g.k0 + j) * H + h) * DV;
          for (int d = 0; d < DK; d++) tk[d] += gk[d] / (hi - lo);
          for (int d = 0; d < DV; d++) tv[d] += gv[d] / (hi - lo);
        }
      }
    }
  }
}

/* ---------------------------------------------------------------- key sets */

/* Sequence-local key rows that query i (kv head h) attends to in branch br.
 * For BR_CMP the rows are block numbers into the compressed keys. */
static int key_set(const ref_shape *s, const seg *g, int br, int i, int h,
                   const int *bi, scratch *w) {
  const int p = i + g->tk - g->tq, BS = s->BS;
  int n = 0;
  if (br == BR_CMP) { /* complete blocks only: c < (p+1)/BS */
    for (int c = 0; c < (p + 1) / BS; c++) w->idx[n++] = c;
    return n;
  }
  if (br == BR_SWA) {
    for (int j = imax(0, p - s->W + 1); j <= p; j++) w->idx[n++] = j;
    return n;
  }
  /* Selected: mark listed blocks in [0, IC] so duplicates count once and
   * entries < 0 or > IC are ignored; then take their causal tokens. */
  const int ic = p / BS;
  const int *row = bi + ((size_t)(g->q0 + i) * s->H + h) * s->S;
  memset(w->mark, 0, (size_t)ic + 1);
  for (int t = 0; t < s->S; t++)
    if (row[t] >= 0 && row[t] <= ic) w->mark[row[t]] = 1;
  for (int c = 0; c <= ic; c++) {
    if (!w->mark[c]) continue;
    for (int j = c * BS; j < imin((c + 1) * BS, p + 1); j++) w->idx[n++] = j;
  }
  return n;
}

/* ---------------------------------------------------------------- attention */

/* K/V point at row 0 of the current kv head; row j is at j*H*D. */
static void attn_fwd(const ref_shape *s, const double *q, const double *K,
                     const double *V, int n, scratch *w, double *o, double *lse) {
  const size_t ks = (size_t)s->H * s->DK, vs = (size_t)s->H * s->DV;
  for (int d = 0; d < s->DV; d++) o[d] = 0.0;
  if (n == 0) { /* empty key set: zero row, never NaN */
    *lse = -INFINITY;
    return;
  }
  double m = -INFINITY, sum = 0.0;
  for (int t = 0; t < n; t++) {
    w->prob[t] = s->scale * dot(q, K + w->idx[t] * ks, s->DK);
    m = fmax(m, w->prob[t]);
  }
  for (int t = 0; t < n; t++) {
    w->prob[t] = exp(w->prob[t] - m);
    sum += w->prob[t];
  }
  for (int t = 0; t < n; t++) {
    const double *vj = V + w->idx[t] * vs;
    for (int d = 0; d < s->DV; d++) o[d] += w->prob[t] / sum * vj[d];
  }
  *lse = m + log(sum);
}

/* Backward of one query row. dob = dL/d(branch output), already gated.
 * P_j = exp(s_j - lse); dS_j = P_j (dob.v_j - dob.o); s_j = scale q.k_j. */
static void attn_bwd(const ref_shape *s, const double *q, const double *K,
                     const double *V, int n, const scratch *w, const double *o,
                     double lse, double *dq, double *dK, double *dV) {
  const size_t ks = (size_t)s->H * s->DK, vs = (size_t)s->H * s->DV;
  const double D = dot(w->dob, o, s->DV);
  for (int t = 0; t < n; t++) {
    const size_t j = (size_t)w->idx[t];
    const double *kj = K + j * ks, *vj = V + j * vs;
    double P = exp(s->scale * dot(q, kj, s->DK) - lse);
    double dS = P * (dot(w->dob, vj, s->DV) - D);
    for (int d = 0; d < s->DK; d++) {
      dq[d] += s->scale * dS * kj[d];
      dK[j * ks + d] += s->scale * dS * q[d];
    }
    for (int d = 0; d < s->DV; d++) dV[j * vs + d] += P * w->dob[d];
  }
}

/* Runs branch br for every query row. k/v are token rows, or the pooled
 * rows for BR_CMP (then key rows are offset by c0 instead of k0). */
static void branch_fwd(const ref_shape *s, int br, const double *q,
                       const double *k, const double *v, const int *bi,
                       double *o, double *lse) {
  check_shape(s);
  const int G = s->HQ / s->H;
  scratch w = scratch_new(s);
  for (int n = 0; n < num_segs(s); n++) {
    seg g = get_seg(s, n);
    const size_t row0 = (size_t)(br == BR_CMP ? g.c0 : g.k0) * s->H;
    for (int i = 0; i < g.tq; i++) {
      for (int hq = 0; hq < s->HQ; hq++) {
        const int h = hq / G;
        const size_t r = (size_t)(g.q0 + i) * s->HQ + hq;
        int cnt = key_set(s, &g, br, i, h, bi, &w);
        attn_fwd(s, q + r * s->DK, k + (row0 + h) * s->DK, v + (row0 + h) * s->DV,
                 cnt, &w, o + r * s->DV, &lse[r]);
      }
    }
  }
  scratch_free(&w);
}

/* Backward of branch br weighted by gate (NULL = weight 1). Accumulates into
 * dq/dk/dv (dk/dv are pooled-row gradients for BR_CMP); writes dgate. */
static void branch_bwd(const ref_shape *s, int br, const double *q,
                       const double *k, const double *v, const int *bi,
                       const double *o, const double *lse, const double *gate,
                       const double *d_o, double *dq, double *dk, double *dv,
                       double *dgate) {
  const int G = s->HQ / s->H, DV = s->DV;
  scratch w = scratch_new(s);
  for (int n = 0; n < num_segs(s); n++) {
    seg g = get_seg(s, n);
    const size_t row0 = (size_t)(br == BR_CMP ? g.c0 : g.k0) * s->H;
    for (int i = 0; i < g.tq; i++) {
      for (int hq = 0; hq < s->HQ; hq++) {
        const int h = hq / G;
        const size_t r = (size_t)(g.q0 + i) * s->HQ + hq;
        const double wgt = gate ? gate[r] : 1.0;
        if (dgate) dgate[r] = dot(d_o + r * DV, o + r * DV, DV);
        for (int d = 0; d < DV; d++) w.dob[d] = wgt * d_o[r * DV + d];
        int cnt = key_set(s, &g, br, i, h, bi, &w);
        attn_bwd(s, q + r * s->DK, k + (row0 + h) * s->DK, v + (row0 + h) * DV,
                 cnt, &w, o + r * DV, lse[r], dq + r * s->DK,
                 dk + (row0 + h) * s->DK, dv + (row0 + h) * DV);
      }
    }
  }
  scratch_free(&w);
}

void ref_compressed(const ref_shape *s, const double *q, const double *k_cmp,
                    const double *v_cmp, double *o_cmp, double *lse_cmp) {
  branch_fwd(s, BR_CMP, q, k_cmp, v_cmp, NULL, o_cmp, lse_cmp);
}

void ref_selected(const ref_shape *s, const double *q, const double *k,
                  const double *v, const int *block_indices, double *o_slc,
                  double *lse_slc) {
  branch_fwd(s, BR_SLC, q, k, v, block_indices, o_slc, lse_slc);
}

void ref_window(const ref_shape *s, const double *q, const double *k,
                const double *v, double *o_swa, double *lse_swa) {
  assert(s->W > 0);
  branch_fwd(s, BR_SWA, q, k, v, NULL, o_swa, lse_swa);
}

/* ---------------------------------------------------------------- top-k */

/* Picks n of the candidates [0, ic]: forced ic, ic-1, 0 first (that priority),
 * then highest importance with ties to the lower index. Writes ascending
 * indices then -1 up to width S. */
static void choose_blocks(const double *imp, int ic, int n, int S,
                          unsigned char *taken, int *out) {
  const int forced[3] = {ic, ic - 1, 0};
  int m = 0;
  memset(taken, 0, (size_t)ic + 1);
  for (int f = 0; f < 3 && m < n; f++) {
    if (forced[f] >= 0 && !taken[forced[f]]) {
      taken[forced[f]] = 1;
      m++;
    }
  }
  for (; m < n; m++) { /* n <= ic+1, so an untaken c < ic always exists here */
    int best = -1;
    for (int c = 0; c < ic; c++) /* strict > keeps the lower index on ties */
      if (!taken[c] && (best < 0 || imp[c] > imp[best])) best = c;
    taken[best] = 1;
  }
  int j = 0;
  for (int c = 0; c <= ic; c++)
    if (taken[c]) out[j++] = c;
  while (j < S) out[j++] = -1;
}

/* Importance of block c < ic for kv head h: summed compressed probability
 * of the G query heads of the group. */
static void importance(const ref_shape *s, const seg *g, int i, int h, int ic,
                       const double *q, const double *k_cmp,
                       const double *lse_cmp, double *imp) {
  const int G = s->HQ / s->H;
  for (int c = 0; c < ic; c++) {
    const double *kc = k_cmp + ((size_t)(g->c0 + c) * s->H + h) * s->DK;
    imp[c] = 0.0;
    for (int hq = h * G; hq < (h + 1) * G; hq++) {
      const size_t r = (size_t)(g->q0 + i) * s->HQ + hq;
      imp[c] += exp(s->scale * dot(q + r * s->DK, kc, s->DK) - lse_cmp[r]);
    }
  }
}

void ref_topk(const ref_shape *s, const double *q, const double *k_cmp,
              const double *lse_cmp, int *block_indices) {
  check_shape(s);
  scratch w = scratch_new(s);
  for (int n = 0; n < num_segs(s); n++) {
    seg g = get_seg(s, n);
    for (int i = 0; i < g.tq; i++) {
      const int ic = (i + g.tk - g.tq) / s->BS;
      for (int h = 0; h < s->H; h++) {
        const size_t r = (size_t)(g.q0 + i) * s->H + h;
        int keep = s->S;
        if (s->block_counts) {
          keep = s->block_counts[r];
          assert(keep >= 0 && keep <= s->S && "block_counts out of [0, S]");
        }
        importance(s, &g, i, h, ic, q, k_cmp, lse_cmp, w.prob);
        choose_blocks(w.prob, ic, imin(keep, ic + 1), s->S, w.mark,
                      block_indices + r * s->S);
      }
    }
  }
  scratch_free(&w);
}

/* ---------------------------------------------------------------- forward */

/* Every intermediate of a forward pass, owned here. */
typedef struct fwd_state {
  double *k_cmp, *v_cmp, *o_cmp, *lse_cmp, *o_slc, *lse_slc, *o_swa, *lse_swa;
  int *bi;
} fwd_state;

static void fwd_run(const ref_shape *s, const ref_inputs *in, fwd_state *f) {
  check_shape(s);
  const size_t nc = (size_t)ref_num_cmp(s) * s->H * (size_t)s->B;
  const size_t nr = (size_t)s->B * s->TQ * s->HQ;
  const size_t nbi = (size_t)s->B * s->TQ * s->H * s->S;
  f->k_cmp = xcalloc(nc * s->DK, sizeof(double));
  f->v_cmp = xcalloc(nc * s->DV, sizeof(double));
  f->o_cmp = xcalloc(nr * s->DV, sizeof(double));
  f->lse_cmp = xcalloc(nr, sizeof(double));
  f->o_slc = xcalloc(nr * s->DV, sizeof(double));
  f->lse_slc = xcalloc(nr, sizeof(double));
  f->o_swa = xcalloc(nr * s->DV, sizeof(double));
  f->lse_swa = xcalloc(nr, sizeof(double));
  f->bi = xcalloc(nbi, sizeof(int));
  /* Compression always runs: it is an output and, without caller indices,
   * the source of the selection even when g_cmp is absent. */
  ref_pool(s, in->k, in->v, f->k_cmp, f->v_cmp);
  ref_compressed(s, in->q, f->k_cmp, f->v_cmp, f->o_cmp, f->lse_cmp);
  if (in->block_indices)
    memcpy(f->bi, in->block_indices, nbi * sizeof(int));
  else
    ref_topk(s, in->q, f->k_cmp, f->lse_cmp, f->bi);
  ref_selected(s, in->q, in->k, in->v, f->bi, f->o_slc, f->lse_slc);
  if (s->W > 0) ref_window(s, in->q, in->k, in->v, f->o_swa, f->lse_swa);
}

static void fwd_free(fwd_state *f) {
  free(f->k_cmp);
  free(f->v_cmp);
  free(f->o_cmp);
  free(f->lse_cmp);
  free(f->o_slc);
  free(f->lse_slc);
  free(f->o_swa);
  free(f->lse_swa);
  free(f->bi);
}

static void keep(void *dst, const void *src, size_t bytes) {
  if (dst) memcpy(dst, src, bytes);
}

static void save_state(const ref_shape *s, const fwd_state *f, ref_saved *sv) {
  const size_t nc = (size_t)ref_num_cmp(s) * s->H * (size_t)s->B;
  const size_t nr = (size_t)s->B * s->TQ * s->HQ, D = sizeof(double);
  keep(sv->k_cmp, f->k_cmp, nc * s->DK * D);
  keep(sv->v_cmp, f->v_cmp, nc * s->DV * D);
  keep(sv->o_cmp, f->o_cmp, nr * s->DV * D);
  keep(sv->lse_cmp, f->lse_cmp, nr * D);
  keep(sv->o_slc, f->o_slc, nr * s->DV * D);
  keep(sv->lse_slc, f->lse_slc, nr * D);
  keep(sv->block_indices, f->bi, (size_t)s->B * s->TQ * s->H * s->S * sizeof(int));
  if (s->W > 0) {
    keep(sv->o_swa, f->o_swa, nr * s->DV * D);
    keep(sv->lse_swa, f->lse_swa, nr * D);
  }
}

void ref_forward(const ref_shape *s, const ref_inputs *in, double *o,
                 ref_saved *saved) {
  fwd_state f;
  fwd_run(s, in, &f);
  const size_t nr = (size_t)s->B * s->TQ * s->HQ;
  const int DV = s->DV;
  for (size_t r = 0; r < nr; r++) {
    const double ws = in->g_slc ? in->g_slc[r] : 1.0;
    for (int d = 0; d < DV; d++) {
      double acc = ws * f.o_slc[r * DV + d];
      if (in->g_cmp) acc += in->g_cmp[r] * f.o_cmp[r * DV + d];
      if (in->g_swa && s->W > 0) acc += in->g_swa[r] * f.o_swa[r * DV + d];
      o[r * DV + d] = acc;
    }
  }
  if (saved) save_state(s, &f, saved);
  fwd_free(&f);
}

/* ---------------------------------------------------------------- backward */

static void zero(double *p, size_t n) {
  if (p) memset(p, 0, n * sizeof *p);
}

void ref_backward(const ref_shape *s, const ref_inputs *in, const double *d_o,
                  ref_grads *g) {
  assert(g->dq && g->dk && g->dv);
  fwd_state f;
  fwd_run(s, in, &f); /* recompute; indices are then held constant */
  const size_t nr = (size_t)s->B * s->TQ * s->HQ;
  const size_t nkv = (size_t)s->B * s->TK * s->H;
  const size_t nc = (size_t)ref_num_cmp(s) * s->H * (size_t)s->B;
  zero(g->dq, nr * s->DK);
  zero(g->dk, nkv * s->DK);
  zero(g->dv, nkv * s->DV);
  zero(g->dg_cmp, nr); /* stays 0 for a branch that is off */
  zero(g->dg_slc, nr);
  zero(g->dg_swa, nr);

  branch_bwd(s, BR_SLC, in->q, in->k, in->v, f.bi, f.o_slc, f.lse_slc,
             in->g_slc, d_o, g->dq, g->dk, g->dv, in->g_slc ? g->dg_slc : NULL);
  if (in->g_cmp) { /* the compressed branch reaches k, v through the pooling */
    double *dkc = xcalloc(nc * s->DK, sizeof(double));
    double *dvc = xcalloc(nc * s->DV, sizeof(double));
    branch_bwd(s, BR_CMP, in->q, f.k_cmp, f.v_cmp, NULL, f.o_cmp, f.lse_cmp,
               in->g_cmp, d_o, g->dq, dkc, dvc, g->dg_cmp);
    unpool_grad(s, dkc, dvc, g->dk, g->dv);
    free(dkc);
    free(dvc);
  }
  if (in->g_swa && s->W > 0)
    branch_bwd(s, BR_SWA, in->q, in->k, in->v, NULL, f.o_swa, f.lse_swa,
               in->g_swa, d_o, g->dq, g->dk, g->dv, g->dg_swa);
  fwd_free(&f);
}
