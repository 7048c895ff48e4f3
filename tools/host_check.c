/* A compact float64 NSA forward on the host, for `clnsa demo` to check the device on a
 * slice of queries. It follows the semantics section by section (pool, compressed
 * attention, top-k, selected attention, gated sum) and shares no code with the library. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

bool host_nsa_init(host_nsa *h, const host_problem *p) {
  memset(h, 0, sizeof *h);
  h->p = *p;
  int NB = h->NB = (p->T + p->BS - 1) / p->BS, H = p->H, D = p->D;
  size_t n = (size_t)NB * (size_t)H * (size_t)D + 1;
  h->k_cmp = calloc(n, sizeof(double));
  h->v_cmp = calloc(n, sizeof(double));
  h->prob = calloc((size_t)NB + 1, sizeof(double));
  h->seen = calloc((size_t)NB + 1, 1);
  if (!h->k_cmp || !h->v_cmp || !h->prob || !h->seen) {
    host_nsa_free(h);
    return false;
  }
  /* 1. Mean pooling: block c covers [c*BS, min((c+1)*BS, T)), divided by its true length. */
  for (int c = 0; c < NB; c++) {
    int t0 = c * p->BS, t1 = t0 + p->BS < p->T ? t0 + p->BS : p->T;
    for (int kh = 0; kh < H; kh++)
      for (int d = 0; d < D; d++) {
        double sk = 0, sv = 0;
        for (int t = t0; t < t1; t++) {
          sk += p->k[((size_t)t * H + kh) * D + d];
          sv += p->v[((size_t)t * H + kh) * D + d];
        }
        h->k_cmp[((size_t)c * H + kh) * D + d] = sk / (t1 - t0);
        h->v_cmp[((size_t)c * H + kh) * D + d] = sv / (t1 - t0);
      }
  }
  return true;
}

void host_nsa_free(host_nsa *h) {
  free(h->k_cmp);
  free(h->v_cmp);
  free(h->prob);
  free(h->seen);
  memset(h, 0, sizeof *h);
}

static double dot(const float *a, const double *b, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}

static double dot_ff(const float *a, const float *b, int n) {
  double s = 0;
  for (int i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
  return s;
}

/* 2. Compressed attention of query p, head hq over the complete past blocks c < (p+1)/BS:
 * fills h->prob[c] and o_cmp[D] (zero when there is no such block). Returns their count. */
static int compressed(host_nsa *h, int p, int hq, double *o_cmp) {
  const host_problem *P = &h->p;
  int nc = (p + 1) / P->BS, kh = hq / (P->HQ / P->H), D = P->D;
  const float *q = P->q + ((size_t)p * P->HQ + hq) * D;
  memset(o_cmp, 0, sizeof(double) * (size_t)D);
  double m = -INFINITY, sum = 0;
  for (int c = 0; c < nc; c++) {
    h->prob[c] = P->scale * dot(q, h->k_cmp + ((size_t)c * P->H + kh) * D, D);
    if (h->prob[c] > m) m = h->prob[c];
  }
  for (int c = 0; c < nc; c++) sum += h->prob[c] = exp(h->prob[c] - m);
  for (int c = 0; c < nc; c++) {
    h->prob[c] /= sum;
    const double *vc = h->v_cmp + ((size_t)c * P->H + kh) * D;
    for (int d = 0; d < D; d++) o_cmp[d] += h->prob[c] * vc[d];
  }
  return nc;
}

/* 3. Top-k: forced IC, IC-1, 0 first; then the highest importance, the lower index on ties. */
void host_select(host_nsa *h, int p, int kvh, int *sel, double *imp) {
  const host_problem *P = &h->p;
  int G = P->HQ / P->H, ic = p / P->BS, n = P->S < ic + 1 ? P->S : ic + 1;
  double scratch[CLNSA_MAX_HEAD_DIM];
  for (int c = 0; c < ic; c++) imp[c] = 0;
  for (int g = 0; g < G; g++) {
    compressed(h, p, kvh * G + g, scratch);
    for (int c = 0; c < ic; c++) imp[c] += h->prob[c]; /* ic <= (p+1)/BS: all computed */
  }
  memset(h->seen, 0, (size_t)ic + 1);
  int taken = 0;
  const int forced[3] = {ic, ic - 1, 0};
  for (int f = 0; f < 3 && taken < n; f++)
    if (forced[f] >= 0 && !h->seen[forced[f]]) h->seen[forced[f]] = 1, taken++;
  for (; taken < n; taken++) {
    int best = -1;
    for (int c = 0; c < ic; c++)
      if (!h->seen[c] && (best < 0 || imp[c] > imp[best])) best = c;
    h->seen[best] = 1;
  }
  int j = 0;
  for (int c = 0; c <= ic; c++)
    if (h->seen[c]) sel[j++] = c;
  while (j < P->S) sel[j++] = -1;
}

static bool listed(const int *sel, int S, int c) {
  for (int s = 0; s < S; s++)
    if (sel[s] == c) return true;
  return false;
}

int host_compare_selection(const host_nsa *h, int p, const int *dev, const int *ref,
                           const double *imp, double rel_tol) {
  int S = h->p.S, ic = p / h->p.BS;
  double lowest_extra = INFINITY, highest_missing = -INFINITY;
  bool same = true;
  for (int s = 0; s < S; s++) {
    if (dev[s] < -1 || dev[s] > ic || (s > 0 && dev[s] >= 0 && dev[s] <= dev[s - 1]))
      return -1;                                 /* out of range, not ascending, or a duplicate */
    if ((dev[s] < 0) != (ref[s] < 0)) return -1; /* a different count */
    if (dev[s] >= 0 && !listed(ref, S, dev[s])) {
      if (dev[s] >= ic - 1 || dev[s] == 0) return -1; /* forced blocks are never extra */
      lowest_extra = fmin(lowest_extra, imp[dev[s]]);
      same = false;
    }
    if (ref[s] >= 0 && !listed(dev, S, ref[s])) {
      if (ref[s] >= ic - 1 || ref[s] == 0) return -1; /* a forced block is missing */
      highest_missing = fmax(highest_missing, imp[ref[s]]);
    }
  }
  if (same) return 0;
  return highest_missing - lowest_extra <= rel_tol * highest_missing ? 1 : -1;
}

/* 4. Selected attention over the listed blocks' tokens j <= p, then 6. the gated sum. */
void host_output(host_nsa *h, int p, int hq, const int *sel, double *o) {
  const host_problem *P = &h->p;
  int ic = p / P->BS, kh = hq / (P->HQ / P->H), D = P->D;
  const float *q = P->q + ((size_t)p * P->HQ + hq) * D;
  double o_cmp[CLNSA_MAX_HEAD_DIM], m = -INFINITY, sum = 0;
  memset(o, 0, sizeof(double) * (size_t)D);
  memset(h->seen, 0, (size_t)ic + 1);
  for (int s = 0; s < P->S; s++)
    if (sel[s] >= 0 && sel[s] <= ic) h->seen[sel[s]] = 1; /* a block listed twice counts once */
  for (int pass = 0; pass < 2; pass++) /* pass 0: the maximum score; pass 1: softmax */
    for (int c = 0; c <= ic; c++) {
      if (!h->seen[c]) continue;
      int j1 = (c + 1) * P->BS - 1 < p ? (c + 1) * P->BS - 1 : p;
      for (int j = c * P->BS; j <= j1; j++) {
        double s = P->scale * dot_ff(q, P->k + ((size_t)j * P->H + kh) * D, D);
        if (pass == 0) {
          m = fmax(m, s);
          continue;
        }
        double w = exp(s - m);
        sum += w;
        for (int d = 0; d < D; d++) o[d] += w * P->v[((size_t)j * P->H + kh) * D + d];
      }
    }
  double g_slc = P->g_slc ? P->g_slc[(size_t)p * P->HQ + hq] : 1.0;
  for (int d = 0; d < D; d++) o[d] = sum > 0 ? g_slc * o[d] / sum : 0.0;
  if (!P->g_cmp) return;
  compressed(h, p, hq, o_cmp);
  for (int d = 0; d < D; d++) o[d] += P->g_cmp[(size_t)p * P->HQ + hq] * o_cmp[d];
}
