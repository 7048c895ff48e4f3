/* Top-k block selection on the device against the float64 reference.
 *
 * Block index sets are compared per (query token, kv head); order inside the row must
 * be ascending and the padding -1 must start exactly after n entries. Where the device
 * picks a different set, every swapped pair must be a near-tie: reference importances
 * within TIE_REL of each other (counted and printed). */
/* cmocka.h needs the headers before it. */
// clang-format off
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
// clang-format on

#include "harness.h"
#include "reference.h"

#define TIE_REL 1e-4

static clnsa_context *ctx;

typedef struct topk_case {
  int B, TQ, TK, HQ, H, DK, BS, S;
  int nseq;             /* 0: no seqs (then TK = TQ) */
  int cu_q[6], cu_k[6]; /* [nseq+1] each */
  bool counts;          /* per-token block counts: 0, S, out of range, or drawn in [0, S] */
  bool ties;            /* compressed rows repeat with period 5: exact importance ties */
  clnsa_dtype qdt, kdt;
  bool padded;
} topk_case;

/* Sequence n of a case: first query row, query count, key count, first compressed row. */
typedef struct seq_view {
  int q0, tq, tk, c0;
} seq_view;

static seq_view seq_of(const topk_case *tc, int n) {
  seq_view v;
  if (tc->nseq == 0) {
    int nb = (tc->TQ + tc->BS - 1) / tc->BS; /* without seqs, TK = TQ */
    v.q0 = n * tc->TQ, v.tq = tc->TQ, v.tk = tc->TQ, v.c0 = n * nb;
    return v;
  }
  v.q0 = tc->cu_q[n], v.tq = tc->cu_q[n + 1] - tc->cu_q[n], v.tk = tc->cu_k[n + 1] - tc->cu_k[n];
  v.c0 = 0;
  for (int m = 0; m < n; m++) v.c0 += (tc->cu_k[m + 1] - tc->cu_k[m] + tc->BS - 1) / tc->BS;
  return v;
}

/* Importance of blocks c < ic for one (row, kv head), as the reference defines it. */
static void importances(const topk_case *tc, const seq_view *sv, int row, int h, int ic,
                        const double *q, const double *kc, const double *lse, double *imp) {
  const int G = tc->HQ / tc->H, DK = tc->DK;
  const double scale = 1.0 / sqrt((double)DK);
  for (int c = 0; c < ic; c++) {
    const double *k = kc + ((size_t)(sv->c0 + c) * tc->H + h) * DK;
    imp[c] = 0;
    for (int hq = h * G; hq < (h + 1) * G; hq++) {
      const double *qr = q + ((size_t)row * tc->HQ + hq) * DK;
      double s = 0;
      for (int d = 0; d < DK; d++) s += qr[d] * k[d];
      imp[c] += exp(scale * s - lse[(size_t)row * tc->HQ + hq]);
    }
  }
}

static bool near_tie(double a, double b) {
  return fabs(a - b) <= TIE_REL * fmax(fabs(a), fabs(b));
}

/* Checks one row of S slots; returns 0 (same set), 1 (near-tie swap) or -1 (wrong). */
static int check_row(const int *dev, const int *ref, int S, int n, int ic, const double *imp,
                     unsigned char *in_dev, unsigned char *in_ref) {
  for (int j = 0; j < S; j++) {
    if (j >= n && dev[j] != -1) return -1;
    if (j < n && (dev[j] < 0 || dev[j] > ic || (j > 0 && dev[j] <= dev[j - 1]))) return -1;
  }
  memset(in_dev, 0, (size_t)ic + 1);
  memset(in_ref, 0, (size_t)ic + 1);
  for (int j = 0; j < n; j++) in_dev[dev[j]] = 1, in_ref[ref[j]] = 1;
  const int forced[3] = {ic, ic - 1, 0};
  for (int f = 0, kept = 0; f < 3 && kept < n; f++) {
    if (forced[f] < 0 || (f == 2 && ic == 1)) continue; /* 0 already counted as ic - 1 */
    if (!in_dev[forced[f]]) return -1;
    kept++;
  }
  bool same = true;
  for (int c = 0; c <= ic; c++) same &= in_dev[c] == in_ref[c];
  if (same) return 0;
  for (int x = 0; x <= ic; x++) { /* x chosen by the device only, y by the reference only */
    if (!in_dev[x] || in_ref[x]) continue;
    for (int y = 0; y < ic; y++)
      if (in_ref[y] && !in_dev[y] && !near_tie(imp[x], imp[y])) return -1;
  }
  return 1;
}

/* Bytes of a padded view's gaps must keep their poison. */
static void assert_gaps_untouched(const dev_tensor *t, const unsigned char *raw, size_t bytes) {
  unsigned char *inside = calloc(bytes, 1);
  for (size_t i = 0; i < t->count; i++) {
    size_t e = t->t.offset, f = i;
    for (int a = t->t.ndim - 1; a >= 0; a--) {
      e += (f % (size_t)t->t.shape[a]) * (size_t)t->t.strides[a];
      f /= (size_t)t->t.shape[a];
    }
    memset(inside + 4 * e, 1, 4);
  }
  for (size_t b = 0; b < bytes; b++)
    if (!inside[b]) assert_int_equal(raw[b], 0x7f);
  free(inside);
}

static void run_case(const topk_case *tc, rng *r, int *ties_total) {
  ref_shape s = {0};
  s.B = tc->B, s.TQ = tc->TQ, s.TK = tc->nseq ? tc->TK : tc->TQ, s.HQ = tc->HQ, s.H = tc->H;
  s.DK = tc->DK, s.DV = 1, s.BS = tc->BS, s.S = tc->S, s.nseq = tc->nseq;
  s.cu_q = tc->cu_q, s.cu_k = tc->cu_k, s.scale = 1.0 / sqrt((double)tc->DK);
  clnsa_params p = clnsa_params_default();
  p.block_size = tc->BS;
  p.block_count = tc->S;
  clnsa_seqs *seqs = NULL;
  if (tc->nseq)
    assert_int_equal(clnsa_seqs_create(ctx, &p, tc->nseq, tc->cu_q, tc->cu_k, &seqs), 0);

  const int nb = ref_num_cmp(&s);
  const size_t nq = (size_t)s.B * s.TQ * s.HQ * s.DK, nk = (size_t)s.B * s.TK * s.H * s.DK;
  const size_t nv = (size_t)s.B * s.TK * s.H, nkc = (size_t)s.B * nb * s.H * s.DK;
  const size_t nrow = (size_t)s.B * s.TQ * s.HQ, nsel = (size_t)s.B * s.TQ * s.H;
  double *q = malloc(sizeof(double) * (nq + 1)), *k = malloc(sizeof(double) * (nk + 1));
  double *v = calloc(nv + 1, sizeof(double)), *kc = malloc(sizeof(double) * (nkc + 1));
  double *vc = malloc(sizeof(double) * ((size_t)s.B * nb * s.H + 1));
  double *oc = malloc(sizeof(double) * (nrow + 1)), *lse = malloc(sizeof(double) * (nrow + 1));
  int *counts = malloc(sizeof(int) * (nsel + 1));
  int *ref = malloc(sizeof(int) * (nsel * s.S + 1));
  rng_fill(r, q, nq, -3, 3); /* a wide spread keeps importances apart */
  rng_fill(r, k, nk, -1, 1);
  ref_pool(&s, k, v, kc, vc);
  if (tc->ties) /* rows c >= 5 copy row c % 5 of their sequence (B = 1, one sequence) */
    for (int c = 5; c < nb; c++)
      memcpy(kc + (size_t)c * s.H * s.DK, kc + (size_t)(c % 5) * s.H * s.DK,
             sizeof(double) * s.H * s.DK);

  int64_t shq[4] = {s.B, s.TQ, s.HQ, s.DK}, shkc[4] = {s.B, nb, s.H, s.DK};
  int64_t shl[3] = {s.B, s.TQ, s.HQ}, shc[3] = {s.B, s.TQ, s.H}, shi[4] = {s.B, s.TQ, s.H, s.S};
  dev_tensor dq = dev_upload(ctx, tc->qdt, 4, shq, q, tc->padded); /* rounds q, kc in place */
  dev_tensor dkc = dev_upload(ctx, tc->kdt, 4, shkc, kc, tc->padded);
  ref_compressed(&s, q, kc, vc, oc, lse);
  dev_tensor dl = dev_upload(ctx, CLNSA_F32, 3, shl, lse, tc->padded); /* rounds lse to f32 */
  dev_tensor dc = {0};
  if (tc->counts) {
    /* Out-of-range counts are clamped into [0, S] by the kernel (the reference gets the
     * clamped values). */
    const int special[4] = {0, s.S, -3, s.S + 5};
    for (size_t i = 0; i < nsel; i++) counts[i] = i % 7 < 4 ? special[i % 7] : rng_int(r, 0, s.S);
    dc = dev_upload_int(ctx, 3, shc, counts);
    for (size_t i = 0; i < nsel; i++)
      counts[i] = counts[i] < 0 ? 0 : counts[i] > s.S ? s.S : counts[i];
    s.block_counts = counts;
  }
  dev_tensor di = dev_output(ctx, CLNSA_I32, 4, shi, tc->padded);
  ref_topk(&s, q, kc, lse, ref);

  cl_event ev;
  clnsa_status st = clnsa_topk(ctx, &p, seqs, &dq.t, &dkc.t, &dl.t, tc->counts ? &dc.t : NULL,
                               &di.t, 0, NULL, &ev);
  if (st) printf("%s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  clWaitForEvents(1, &ev);
  clReleaseEvent(ev);
  int *dev = dev_download_int(ctx, &di);
  size_t raw_bytes;
  unsigned char *raw = dev_raw(ctx, &di, &raw_bytes);
  assert_gaps_untouched(&di, raw, raw_bytes);

  const int nseg = tc->nseq ? tc->nseq : tc->B;
  double *imp = malloc(sizeof(double) * ((size_t)nb + 1));
  unsigned char *m1 = malloc((size_t)nb + 1), *m2 = malloc((size_t)nb + 1);
  int ties = 0, bad = 0;
  for (int g = 0; g < nseg; g++) {
    seq_view sv = seq_of(tc, g);
    for (int i = 0; i < sv.tq; i++) {
      const int row = sv.q0 + i, ic = (i + sv.tk - sv.tq) / s.BS;
      for (int h = 0; h < s.H; h++) {
        const size_t rh = (size_t)row * s.H + h;
        int keep = tc->counts ? counts[rh] : s.S;
        int n = keep < ic + 1 ? keep : ic + 1;
        int nref = 0;
        while (nref < s.S && ref[rh * s.S + nref] >= 0) nref++;
        assert_int_equal(nref, n);
        importances(tc, &sv, row, h, ic, q, kc, lse, imp);
        int res = check_row(dev + rh * s.S, ref + rh * s.S, s.S, n, ic, imp, m1, m2);
        if (tc->ties && res == 1) res = -1; /* exact ties must go to the lower index */
        if (res < 0 && bad < 5) {
          printf("# mismatch row %d head %d (ic %d, n %d):\n#  dev", row, h, ic, n);
          for (int j = 0; j < s.S; j++) printf(" %d", dev[rh * s.S + j]);
          printf("\n#  ref");
          for (int j = 0; j < s.S; j++) printf(" %d", ref[rh * s.S + j]);
          printf("\n");
        }
        ties += res == 1;
        bad += res < 0;
      }
    }
  }
  printf(
      "# topk B=%d TQ=%d TK=%d HQ=%d H=%d DK=%d BS=%d S=%d nseq=%d counts=%d ties=%d q=%s k=%s%s: "
      "%zu rows, %d near-tie swaps, %d wrong\n",
      s.B, s.TQ, s.TK, s.HQ, s.H, s.DK, s.BS, s.S, s.nseq, tc->counts, tc->ties,
      dtype_label(tc->qdt), dtype_label(tc->kdt), tc->padded ? " padded" : "", nsel, ties, bad);
  assert_int_equal(bad, 0);
  *ties_total += ties;
  free(imp), free(m1), free(m2), free(dev), free(raw);
  dev_free(&dq), dev_free(&dkc), dev_free(&dl), dev_free(&di);
  if (tc->counts) dev_free(&dc);
  free(q), free(k), free(v), free(kc), free(vc), free(oc), free(lse), free(counts), free(ref);
  clnsa_seqs_destroy(seqs);
}

#define F32 CLNSA_F32
#define F16 CLNSA_F16
#define BF16 CLNSA_BF16

static void test_topk_sweep(void **state) {
  (void)state;
  rng r = {harness_seed("topk")};
  /* B, TQ, TK, HQ, H, DK, BS, S, nseq, cu_q, cu_k, counts, ties, q dtype, k_cmp dtype,
   * padded */
  // clang-format off
  const topk_case cases[] = {
      /* odd T, small G, several candidates per row */
      {2, 37, 0, 4, 2, 32, 4, 3, 0, {0}, {0}, false, false, F32, F32, false},
      /* several tiles and a full list of 16, counts 0..S */
      {1, 300, 0, 1, 1, 32, 4, 16, 0, {0}, {0}, true, false, F32, F32, true},
      /* T < BS and T = BS - 1 */
      {2, 5, 0, 6, 2, 32, 8, 2, 0, {0}, {0}, false, false, F32, F32, false},
      {1, 15, 0, 5, 1, 32, 16, 1, 0, {0}, {0}, false, false, F32, F32, false},
      /* BS = 64, G = 16 */
      {1, 300, 0, 32, 2, 32, 64, 3, 0, {0}, {0}, true, false, F32, F32, false},
      /* G = 32 with DK = 192: the query rows stream in chunks under 48 KiB */
      {1, 90, 0, 32, 1, 192, 8, 16, 0, {0}, {0}, false, false, F32, F32, false},
      /* DK = 16, bf16, S = 128 with lists longer than a tile */
      {1, 700, 0, 2, 1, 16, 4, 128, 0, {0}, {0}, true, false, BF16, BF16, false},
      /* DK = 60, f16, padded views */
      {2, 77, 0, 6, 2, 60, 8, 16, 0, {0}, {0}, true, false, F16, F16, true},
      /* DK = 100, mixed dtypes, G = 1 */
      {1, 61, 0, 3, 3, 100, 4, 2, 0, {0}, {0}, false, false, BF16, F16, false},
      /* varlen with an empty and a length-1 sequence */
      {1, 40, 40, 4, 2, 32, 4, 3, 4, {0, 17, 17, 18, 40}, {0, 17, 17, 18, 40}, true, false, F32,
       F32, true},
      /* varlen with TQ_s < TK_s */
      {1, 14, 104, 10, 2, 32, 4, 16, 4, {0, 5, 5, 6, 14}, {0, 40, 43, 44, 104}, false, false, F32,
       F32, false},
      /* TQ < TK through seqs with one sequence */
      {1, 9, 200, 16, 1, 32, 8, 16, 1, {0, 9}, {0, 200}, true, false, F32, F32, false},
      /* exact ties: equal importance goes to the lower block index */
      {1, 120, 0, 2, 1, 32, 4, 8, 0, {0}, {0}, false, true, F32, F32, false},
      /* G = 64, DK = 256: many query chunks */
      {1, 70, 0, 64, 1, 256, 4, 16, 0, {0}, {0}, false, false, BF16, BF16, false},
  };
  // clang-format on
  int ties = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r, &ties);
  printf("# topk: %d near-tie swaps accepted in all\n", ties);
}

/* Shapes the tensor-core top-k (cl/topk_mma.cl) takes: G = 1, 2, 4, 8, 16, q f16 or bf16,
 * k_cmp of q's type or f32 with bf16 q, DK a multiple of 32, unpadded rows. Wherever the
 * context has a tensor-core path these run on it (`test_topk tensor-cores` requires it). */
static void test_topk_tensor_cores(void **state) {
  (void)state;
  rng r = {harness_seed("topk tensor cores")};
  // clang-format off
  const topk_case cases[] = {
      /* G = 16, bf16 q with f32 k_cmp (the whole forward's), counts */
      {1, 300, 0, 32, 2, 64, 8, 5, 0, {0}, {0}, true, false, BF16, F32, false},
      /* G = 1, f16, several warps' worth of tokens, long lists */
      {2, 150, 0, 2, 2, 32, 4, 16, 0, {0}, {0}, false, false, F16, F16, false},
      /* G = 2 and 4 and 8, bf16 */
      {1, 90, 0, 4, 2, 32, 4, 8, 0, {0}, {0}, true, false, BF16, BF16, false},
      {1, 77, 0, 4, 1, 96, 8, 4, 0, {0}, {0}, false, false, BF16, F32, false},
      {1, 64, 0, 16, 2, 32, 4, 6, 0, {0}, {0}, false, false, F16, F16, false},
      /* varlen with an empty and a length-1 sequence; TQ_s < TK_s */
      {1, 40, 40, 4, 2, 32, 4, 3, 4, {0, 17, 17, 18, 40}, {0, 17, 17, 18, 40}, true, false, BF16,
       BF16, false},
      {1, 14, 104, 8, 2, 32, 4, 16, 4, {0, 5, 5, 6, 14}, {0, 40, 43, 44, 104}, false, false, F16,
       F16, false},
      /* exact ties go to the lower block index; S = 128 */
      {1, 120, 0, 2, 1, 32, 4, 8, 0, {0}, {0}, false, true, BF16, BF16, false},
      {1, 600, 0, 1, 1, 32, 4, 128, 0, {0}, {0}, true, false, BF16, BF16, false},
  };
  // clang-format on
  int ties = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &r, &ties);
  printf("# topk tensor cores: %d near-tie swaps accepted in all\n", ties);
}

/* The tensor-core top-k with fewer tokens per warp than 16 / G (what the host picks when
 * TPW x CAP importances per warp outgrow local memory, e.g. G = 1 at T = 65536), forced
 * through CLNSA_TUNE=TOPK_TPW: the warp's rows from TPW G on are idle, and tokens advance
 * by TPW per warp. Many groups, own blocks well above S (candidates compete), and idle rows
 * both inside the first 8 rows (G = 1, TPW = 4) and as the whole second half (G = 4,
 * TPW = 2). Then the number of 16-row m-tiles a warp (CLNSA_TUNE=TOPK_MT; G = 16 takes
 * two by default, 32 rows of two tokens): one at G = 16, two at G = 4 (eight tokens).
 * Then the selection where the host would not take it (CLNSA_TUNE=TOPK_LIST_G): register
 * lists at G = 16, importance arrays at G = 2.
 * Only where the tensor-core path is on (elsewhere the knobs change nothing). */
static void test_topk_tensor_cores_tpw(void **state) {
  (void)state;
  if (clnsa_context_tensor_cores(ctx) == CLNSA_MMA_NONE) {
    printf("# topk TPW: no tensor-core path, nothing to test\n");
    return;
  }
  rng r = {harness_seed("topk tensor cores TPW")};
  // clang-format off
  const char *tunes[] = {"TOPK_TPW=4", "TOPK_TPW=2", "TOPK_TPW=2", "TOPK_MT=1", "TOPK_MT=2",
                         "TOPK_LIST_G=16", "TOPK_LIST_G=0"};
  const topk_case cases[] = {
      /* G = 1, TPW = 4 of 16: 38 groups per head, own blocks up to 37 with S = 6 */
      {1, 150, 0, 2, 2, 32, 4, 6, 0, {0}, {0}, false, false, BF16, F32, false},
      /* G = 4, TPW = 2 of 4: rows 8..15 idle; counts */
      {1, 90, 0, 8, 2, 64, 4, 5, 0, {0}, {0}, true, false, BF16, BF16, false},
      /* varlen: an empty, a length-1 and a TQ_s < TK_s sequence, the last warp of each
       * running past its end; the build of the case before (same G, TPW, DK, CAP = 23 and
       * dtypes), as kernel builds take most of this test's time on PoCL */
      {1, 95, 130, 8, 2, 64, 4, 4, 4, {0, 33, 33, 34, 95}, {0, 33, 40, 41, 130}, false, false,
       BF16, BF16, false},
      /* G = 16 with one m-tile a warp (its default is two: MT = 2), f32 k_cmp */
      {1, 70, 0, 32, 2, 64, 4, 5, 0, {0}, {0}, false, false, BF16, F32, false},
      /* G = 4, MT = 2: eight tokens a warp (four register lists a lane); counts */
      {1, 90, 0, 8, 2, 32, 4, 5, 0, {0}, {0}, true, false, BF16, BF16, false},
      /* register lists at G = 16 (two m-tiles, every lane owning one slot a step), f32
       * k_cmp, exact ties */
      {1, 110, 0, 32, 2, 64, 4, 7, 0, {0}, {0}, false, true, BF16, F32, false},
      /* importance arrays at G = 2 (lists by default), counts */
      {1, 90, 0, 4, 2, 32, 4, 8, 0, {0}, {0}, true, false, BF16, BF16, false},
  };
  // clang-format on
  int ties = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    printf("# CLNSA_TUNE += %s\n", tunes[i]);
    harness_tune_extend(tunes[i]);
    run_case(&cases[i], &r, &ties);
    harness_tune_teardown(NULL);
  }
  printf("# topk tensor cores TPW: %d near-tie swaps accepted in all\n", ties);
}

/* Invalid arguments are refused before anything is enqueued: the output keeps its poison. */
static void test_topk_errors(void **state) {
  (void)state;
  clnsa_params p = clnsa_params_default();
  p.block_size = 4;
  p.block_count = 3;
  const int T = 10, H = 2, HQ = 4, DK = 8, NB = 3;
  double q[10 * 4 * 8] = {0}, kc[3 * 2 * 8] = {0}, lse[10 * 4] = {0};
  int64_t shq[4] = {1, T, HQ, DK}, shkc[4] = {1, NB, H, DK}, shl[3] = {1, T, HQ};
  int64_t shi[4] = {1, T, H, 3}, shkc_long[4] = {1, NB + 1, H, DK}, shq_bad[4] = {1, T, 3, DK};
  dev_tensor dq = dev_upload(ctx, F32, 4, shq, q, false);
  dev_tensor dqb = dev_upload(ctx, F32, 4, shq_bad, q, false);
  dev_tensor dkc = dev_upload(ctx, F32, 4, shkc, kc, false);
  dev_tensor dkl = dev_output(ctx, F32, 4, shkc_long, false);
  dev_tensor dl = dev_upload(ctx, F32, 3, shl, lse, false);
  dev_tensor dl16 = dev_output(ctx, F16, 3, shl, false);
  dev_tensor di = dev_output(ctx, CLNSA_I32, 4, shi, false);
  struct {
    const clnsa_tensor *q, *kc, *lse, *bi;
    clnsa_status want;
  } bad[] = {
      {&dq.t, &dkl.t, &dl.t, &di.t, CLNSA_ERR_SHAPE_MISMATCH}, /* TQ < TK needs seqs */
      {&dqb.t, &dkc.t, &dl.t, &di.t, CLNSA_ERR_GROUP_SIZE},
      {&dq.t, &dkc.t, &dl16.t, &di.t, CLNSA_ERR_DTYPE},
      {&dq.t, &dkc.t, &dl.t, &dl.t, CLNSA_ERR_DTYPE},
      {NULL, &dkc.t, &dl.t, &di.t, CLNSA_ERR_NULL_ARGUMENT},
      {&dq.t, &dkc.t, &dl.t, NULL, CLNSA_ERR_NULL_ARGUMENT},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    assert_int_equal(
        clnsa_topk(ctx, &p, NULL, bad[i].q, bad[i].kc, bad[i].lse, NULL, bad[i].bi, 0, NULL, NULL),
        bad[i].want);
  p.block_count = CLNSA_MAX_BLOCK_COUNT + 1;
  assert_int_equal(clnsa_topk(ctx, &p, NULL, &dq.t, &dkc.t, &dl.t, NULL, &di.t, 0, NULL, NULL),
                   CLNSA_ERR_BLOCK_COUNT);
  size_t bytes;
  unsigned char *raw = dev_raw(ctx, &di, &bytes);
  for (size_t b = 0; b < bytes; b++) assert_int_equal(raw[b], 0x7f);
  free(raw);
  dev_free(&dq), dev_free(&dqb), dev_free(&dkc), dev_free(&dkl), dev_free(&dl), dev_free(&dl16);
  dev_free(&di);
}

int main(int argc, char **argv) {
  ctx = harness_context();
  if (harness_tensor_cores_mode(ctx, argc, argv)) {
    const struct CMUnitTest only[] = {
        cmocka_unit_test(test_topk_tensor_cores),
        cmocka_unit_test_teardown(test_topk_tensor_cores_tpw, harness_tune_teardown)};
    int rc = cmocka_run_group_tests(only, NULL, NULL);
    clnsa_context_destroy(ctx);
    return rc;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_topk_sweep), cmocka_unit_test(test_topk_tensor_cores),
      cmocka_unit_test_teardown(test_topk_tensor_cores_tpw, harness_tune_teardown),
      cmocka_unit_test(test_topk_errors)};
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  clnsa_context_destroy(ctx);
  return rc;
}
