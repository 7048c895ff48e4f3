/* The whole forward pass (clnsa_forward) against the float64 reference (ref_forward),
 * over a sweep of shapes, gates, windows, packings and dtypes. Besides o, each case
 * checks the block indices the workspace recorded (as sets per query and kv head), that
 * nothing outside o's view and the workspace's bytes was written, and the event chain.
 *
 * Kernel builds are cached per option string, so the cases share a few (DK, DV, BS)
 * classes; the rest varies freely. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* cmocka.h needs the standard headers above. */
#include <cmocka.h>

#include "harness.h"
#include "reference.h"

enum { G_CMP = 1, G_SLC = 2, G_SWA = 4, G_ALL = 7 };

typedef struct shape_class {
  int DK, DV, BS;
} shape_class;
/* Class 3 serves CLNSA_FLAG_TF32 only (test_forward_tf32): D = 128; classes 4 and 5 the
 * kv-block-major selected attention (test_forward_kvm): head dims in 32-wide chunks, and
 * in class 5 a block of several staged key tiles (kept over the passes: KVM_RES). */
static const shape_class classes[] = {
    {16, 24, 8}, {32, 16, 4}, {48, 32, 16}, {128, 128, 32}, {64, 32, 8}, {64, 32, 64}};

typedef struct fcase {
  int B, TQ, TK, H, G, cls, S, W;
  int nseq;
  int cu_q[8], cu_k[8]; /* cu_k[nseq] == 0: same as cu_q */
  unsigned gates;       /* G_* bits */
  bool caller_idx, counts, padded;
  clnsa_dtype dt; /* q, k, v, gates and o, unless mixed */
  bool mixed;     /* q f16, k bf16, v f32, gates f32, o bf16 */
  bool misalign;  /* workspace offset 4 bytes past a multiple of 256 */
} fcase;

static clnsa_context *ctx;
static cl_mem arena; /* every case's workspace lives somewhere in here */
static size_t arena_bytes;
static int tie_rows;
static size_t last_need; /* the forward workspace bytes of the last case run */

static double *rand_array(rng *r, size_t n, double lo, double hi) {
  double *x = malloc(sizeof(double) * (n ? n : 1));
  rng_fill(r, x, n, lo, hi);
  return x;
}

/* ---- one independent sequence, as the reference splits the batch ---- */
typedef struct segment {
  int q0, c0, tq, tk;
} segment;

static int nsegments(const ref_shape *s) {
  return s->nseq ? s->nseq : s->B;
}

static segment get_segment(const ref_shape *s, int n) {
  segment g;
  if (!s->nseq) {
    int nb = (s->TK + s->BS - 1) / s->BS;
    g.q0 = n * s->TQ, g.c0 = n * nb, g.tq = s->TQ, g.tk = s->TK;
    return g;
  }
  const int *ck = s->cu_k ? s->cu_k : s->cu_q;
  g.q0 = s->cu_q[n], g.tq = s->cu_q[n + 1] - s->cu_q[n], g.tk = ck[n + 1] - ck[n], g.c0 = 0;
  for (int m = 0; m < n; m++) g.c0 += (ck[m + 1] - ck[m] + s->BS - 1) / s->BS;
  return g;
}

/* Importance of block c for query row (global token row) qr of kv head h. */
static double importance(const ref_shape *s, const double *q, const double *k_cmp,
                         const double *lse_cmp, int qr, int c0, int h, int c) {
  const int G = s->HQ / s->H;
  double sum = 0;
  for (int hq = h * G; hq < (h + 1) * G; hq++) {
    const double *qv = q + ((size_t)qr * s->HQ + hq) * s->DK;
    const double *kv = k_cmp + ((size_t)(c0 + c) * s->H + h) * s->DK;
    double dot = 0;
    for (int d = 0; d < s->DK; d++) dot += qv[d] * kv[d];
    sum += exp(s->scale * dot - lse_cmp[(size_t)qr * s->HQ + hq]);
  }
  return sum;
}

static bool row_has(const int *row, int S, int c) {
  for (int i = 0; i < S; i++)
    if (row[i] == c) return true;
  return false;
}

/* Compares the device's block indices with the reference's as sets. A row may differ
 * only by swapping blocks whose importances tie within `tie` (relative: 1e-4 for f32
 * rounding); returns how many rows did, or -1 on a real mismatch. */
static int compare_indices(const ref_shape *s, const double *q, const ref_saved *sv, const int *dev,
                           double tie) {
  int ties = 0;
  for (int n = 0; n < nsegments(s); n++) {
    segment g = get_segment(s, n);
    for (int i = 0; i < g.tq; i++) {
      const int qr = g.q0 + i, ic = (i + g.tk - g.tq) / s->BS;
      for (int h = 0; h < s->H; h++) {
        const int *dr = dev + ((size_t)qr * s->H + h) * s->S;
        const int *rr = sv->block_indices + ((size_t)qr * s->H + h) * s->S;
        int nd = 0, nr = 0;
        bool same = true;
        for (int j = 0; j < s->S; j++) {
          if (dr[j] < -1 || dr[j] > ic) {
            print_error("token %d head %d: index %d outside [-1, %d]\n", qr, h, dr[j], ic);
            return -1;
          }
          for (int m = 0; m < j; m++)
            if (dr[j] >= 0 && dr[m] == dr[j]) {
              print_error("token %d head %d: block %d twice\n", qr, h, dr[j]);
              return -1;
            }
          nd += dr[j] >= 0;
          nr += rr[j] >= 0;
          if (rr[j] >= 0 && !row_has(dr, s->S, rr[j])) same = false;
        }
        if (nd != nr) {
          print_error("token %d head %d: %d blocks, reference %d\n", qr, h, nd, nr);
          return -1;
        }
        if (same) continue;
        for (int x = 0; x < s->S; x++) {
          if (dr[x] < 0 || row_has(rr, s->S, dr[x])) continue;
          for (int y = 0; y < s->S; y++) {
            if (rr[y] < 0 || row_has(dr, s->S, rr[y])) continue;
            bool forced = dr[x] >= ic - 1 || dr[x] == 0 || rr[y] >= ic - 1 || rr[y] == 0;
            double a = importance(s, q, sv->k_cmp, sv->lse_cmp, qr, g.c0, h, dr[x]);
            double b = importance(s, q, sv->k_cmp, sv->lse_cmp, qr, g.c0, h, rr[y]);
            if (forced || fabs(a - b) > tie * fmax(a, b) + 1e-7) {
              print_error(
                  "token %d head %d: block %d (importance %.9g) chosen instead of %d "
                  "(%.9g)\n",
                  qr, h, dr[x], a, rr[y], b);
              return -1;
            }
          }
        }
        ties++;
      }
    }
  }
  return ties;
}

/* Caller-given indices: random blocks (some beyond the query's own block, which the
 * pass must ignore), -1 holes and duplicates. */
static int *random_indices(const ref_shape *s, rng *r) {
  size_t n = (size_t)s->B * s->TQ * s->H * s->S;
  int *x = malloc(sizeof(int) * (n ? n : 1));
  const int nbmax = (s->TK + s->BS - 1) / s->BS;
  for (size_t i = 0; i < n; i++) {
    int u = rng_int(r, 0, 9);
    x[i] = u < 2 ? -1 : u < 4 && i % (size_t)s->S ? x[i - 1] : rng_int(r, 0, nbmax + 1);
  }
  return x;
}

/* Element indices a dense-order walk of t addresses. */
static bool addressed(const clnsa_tensor *t, size_t e) {
  if (e < t->offset) return false;
  size_t rel = e - t->offset;
  for (int i = 0; i < t->ndim; i++) {
    size_t idx = t->strides[i] ? rel / (size_t)t->strides[i] : 0;
    if (i == t->ndim - 1) return idx < (size_t)t->shape[i] && rel == idx;
    if (idx >= (size_t)t->shape[i]) return false;
    rel -= idx * (size_t)t->strides[i];
  }
  return false;
}

static void check_gaps(const dev_tensor *o) {
  size_t bytes;
  unsigned char *raw = dev_raw(ctx, o, &bytes);
  const size_t es = clnsa_dtype_size(o->t.dtype);
  for (size_t e = 0; e < bytes / es; e++) {
    if (addressed(&o->t, e)) continue;
    for (size_t b = 0; b < es; b++)
      if (raw[e * es + b] != 0xff) fail_msg("o: element %zu outside the view was written", e);
  }
  free(raw);
}

static void check_arena(size_t off, size_t bytes) {
  unsigned char *raw = malloc(arena_bytes);
  assert_int_equal(clEnqueueReadBuffer(clnsa_context_queue(ctx), arena, CL_TRUE, 0, arena_bytes,
                                       raw, 0, NULL, NULL),
                   CL_SUCCESS);
  for (size_t i = 0; i < arena_bytes; i++)
    if ((i < off || i >= off + bytes) && raw[i] != 0xff)
      fail_msg("byte %zu outside the workspace [%zu, %zu) was written", i, off, off + bytes);
  free(raw);
}

static void prepare_arena(size_t need) {
  if (need > arena_bytes) {
    if (arena) clReleaseMemObject(arena);
    arena_bytes = need + need / 2;
    cl_int err;
    arena = clCreateBuffer(clnsa_context_cl(ctx), CL_MEM_READ_WRITE, arena_bytes, NULL, &err);
    assert_int_equal(err, CL_SUCCESS);
  }
  const unsigned char ff = 0xff; /* NaN in every float format */
  assert_int_equal(
      clEnqueueFillBuffer(clnsa_context_queue(ctx), arena, &ff, 1, 0, arena_bytes, 0, NULL, NULL),
      CL_SUCCESS);
  clFinish(clnsa_context_queue(ctx)); /* the forward waits only on its own list */
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* One forward with params.flags = flags (0, CLNSA_FLAG_TF32 or CLNSA_FLAG_CMP_16BIT). */
static void run_case(const fcase *fc, unsigned flags, rng *r) {
  const double t0 = now();
  const shape_class *sc = &classes[fc->cls];
  ref_shape s = {0};
  s.B = fc->B, s.TQ = fc->TQ, s.TK = fc->TK, s.H = fc->H, s.HQ = fc->H * fc->G;
  s.DK = sc->DK, s.DV = sc->DV, s.BS = sc->BS, s.S = fc->S, s.W = fc->W;
  s.nseq = fc->nseq;
  if (fc->nseq) {
    s.cu_q = fc->cu_q;
    s.cu_k = fc->cu_k[fc->nseq] ? fc->cu_k : fc->cu_q;
    s.TQ = s.cu_q[s.nseq];
    s.TK = s.cu_k[s.nseq];
  }
  s.scale = 1.0 / sqrt((double)s.DK);
  const clnsa_dtype dq = fc->mixed ? CLNSA_F16 : fc->dt, dk = fc->mixed ? CLNSA_BF16 : fc->dt,
                    dv = fc->mixed ? CLNSA_F32 : fc->dt, dg = fc->mixed ? CLNSA_F32 : fc->dt,
                    dout = fc->mixed ? CLNSA_BF16 : fc->dt;
  const bool cmp16 = (flags & CLNSA_FLAG_CMP_16BIT) != 0;
  if (cmp16) { /* the reference pools into the same rounded values */
    s.round_k_cmp = dtype_rounder(dk);
    s.round_v_cmp = dtype_rounder(dv);
  }

  const size_t nq = (size_t)s.B * s.TQ * s.HQ, nk = (size_t)s.B * s.TK * s.H;
  const size_t nidx = (size_t)s.B * s.TQ * s.H * s.S, ncnt = (size_t)s.B * s.TQ * s.H;
  /* A wide spread of q makes the compressed softmax peaked, so top-k ties are rare. */
  double *q = rand_array(r, nq * s.DK, -3, 3), *k = rand_array(r, nk * s.DK, -1, 1);
  double *v = rand_array(r, nk * s.DV, -1, 1);
  double *g[3] = {NULL, NULL, NULL};
  for (int i = 0; i < 3; i++)
    if (fc->gates & (1u << i)) g[i] = rand_array(r, nq, -1.5, 1.5);
  int *idx = fc->caller_idx ? random_indices(&s, r) : NULL;
  int *cnt = NULL;
  if (fc->counts) {
    cnt = malloc(sizeof(int) * (ncnt ? ncnt : 1));
    for (size_t i = 0; i < ncnt; i++) cnt[i] = rng_int(r, 0, s.S);
  }

  const int64_t shq[4] = {s.B, s.TQ, s.HQ, s.DK}, shk[4] = {s.B, s.TK, s.H, s.DK};
  const int64_t shv[4] = {s.B, s.TK, s.H, s.DV}, sho[4] = {s.B, s.TQ, s.HQ, s.DV};
  const int64_t shg[3] = {s.B, s.TQ, s.HQ}, shi[4] = {s.B, s.TQ, s.H, s.S};
  const int64_t shc[3] = {s.B, s.TQ, s.H};
  dev_tensor tq = dev_upload(ctx, dq, 4, shq, q, fc->padded);
  dev_tensor tk = dev_upload(ctx, dk, 4, shk, k, false);
  dev_tensor tv = dev_upload(ctx, dv, 4, shv, v, fc->padded);
  dev_tensor tg[3], ti = {0}, tc = {0};
  for (int i = 0; i < 3; i++)
    if (g[i]) tg[i] = dev_upload(ctx, dg, 3, shg, g[i], fc->padded && i == 1);
  if (idx) ti = dev_upload_int(ctx, 4, shi, idx);
  if (cnt) tc = dev_upload_int(ctx, 3, shc, cnt);
  dev_tensor to = dev_output(ctx, dout, 4, sho, fc->padded);

  clnsa_params p = clnsa_params_default();
  p.block_size = s.BS, p.block_count = s.S, p.window = s.W;
  p.flags = flags;
  /* TF32 runs where a tensor-core path and the shapes allow it (src/attend.c): aligned f32
   * rows, DK a multiple of 16, DV of 32. Its lse_cmp, rounded like the scores, feeds top-k:
   * importances then move by up to ~1e-3, so near-ties are judged at 1e-2. */
  const bool tf32 = (flags & CLNSA_FLAG_TF32) && !fc->mixed && fc->dt == CLNSA_F32 && !fc->padded &&
                    !fc->misalign && s.DK % 16 == 0 && s.DV % 32 == 0 && s.DK <= 128 &&
                    s.DV <= 128 && clnsa_context_tensor_cores(ctx) != CLNSA_MMA_NONE;
  clnsa_seqs *seqs = NULL;
  if (s.nseq)
    assert_int_equal(clnsa_seqs_create(ctx, &p, s.nseq, s.cu_q, s.cu_k, &seqs), CLNSA_SUCCESS);
  clnsa_inputs in = {&tq.t,
                     &tk.t,
                     &tv.t,
                     g[0] ? &tg[0].t : NULL,
                     g[1] ? &tg[1].t : NULL,
                     g[2] ? &tg[2].t : NULL,
                     idx ? &ti.t : NULL,
                     cnt ? &tc.t : NULL,
                     seqs};
  size_t need = 0, need_bwd = 0;
  assert_int_equal(clnsa_forward_workspace_size(ctx, &p, &in, &need), CLNSA_SUCCESS);
  assert_int_equal(clnsa_backward_workspace_size(ctx, &p, &in, &need_bwd), CLNSA_SUCCESS);
  assert_true(need_bwd >= need);
  last_need = need;
  if (cmp16) { /* the 16-bit k_cmp (and v_cmp) regions are half their f32 size */
    clnsa_params p32 = p;
    p32.flags &= ~CLNSA_FLAG_CMP_16BIT;
    size_t need32 = 0;
    assert_int_equal(clnsa_forward_workspace_size(ctx, &p32, &in, &need32), CLNSA_SUCCESS);
    if (dk != CLNSA_F32 || dv != CLNSA_F32) assert_true(need < need32);
  }
  const size_t off = 256 * (size_t)rng_int(r, 0, 3) + (fc->misalign ? 4 : 0);
  prepare_arena(off + need + 64);
  clnsa_workspace *ws = NULL;
  assert_int_equal(clnsa_workspace_create(ctx, arena, off, need, &ws), CLNSA_SUCCESS);

  /* The chain must wait for the caller's events; without an event out, the caller
   * finishes the queue. */
  static int calls;
  const bool with_events = ++calls % 3 != 0;
  cl_int err;
  cl_event gate = clCreateUserEvent(clnsa_context_cl(ctx), &err), done = NULL;
  assert_int_equal(err, CL_SUCCESS);
  clnsa_status st = with_events ? clnsa_forward(ctx, &p, &in, &to.t, ws, 1, &gate, &done)
                                : clnsa_forward(ctx, &p, &in, &to.t, ws, 0, NULL, NULL);
  if (st != CLNSA_SUCCESS) print_error("%s\n", clnsa_last_message(ctx));
  assert_int_equal(st, CLNSA_SUCCESS);
  clSetUserEventStatus(gate, CL_COMPLETE);
  if (with_events) {
    assert_non_null(done);
    assert_int_equal(clWaitForEvents(1, &done), CL_SUCCESS);
    clReleaseEvent(done);
  } else {
    clFinish(clnsa_context_queue(ctx));
  }
  clReleaseEvent(gate);

  double *ref = malloc(sizeof(double) * (nq * s.DV + 1));
  const size_t nc = (size_t)s.B * ref_num_cmp(&s) * s.H;
  ref_saved sv = {0};
  sv.k_cmp = malloc(sizeof(double) * (nc * s.DK + 1));
  sv.lse_cmp = malloc(sizeof(double) * (nq + 1));
  sv.block_indices = malloc(sizeof(int) * (nidx + 1));
  s.block_counts = cnt;
  ref_inputs rin = {q, k, v, g[0], g[1], g[2], idx};
  ref_forward(&s, &rin, ref, &sv);

  int ties = 0;
  clnsa_tensor view;
  clnsa_status vst = clnsa_forward_block_indices(ws, &view);
  if (idx) {
    assert_int_equal(vst, CLNSA_ERR_INVALID_ARGUMENT);
  } else {
    assert_int_equal(vst, CLNSA_SUCCESS);
    assert_true(view.buffer == arena && view.dtype == CLNSA_I32 && view.ndim == 4);
    for (int i = 0; i < 4; i++) assert_int_equal(view.shape[i], shi[i]);
    dev_tensor tv_idx = {0};
    tv_idx.t = view;
    tv_idx.count = nidx;
    int *dev_idx = dev_download_int(ctx, &tv_idx);
    /* cmp16: the device rounds its f32 block mean, the reference its f64 one, so an
     * element within f32 rounding of a 16-bit rounding midpoint can land one 16-bit ulp
     * (2^-8 relative for bf16) apart: a score then moves by ~1e-4, hence 1e-3 for ties */
    ties = compare_indices(&s, q, &sv, dev_idx, tf32 ? 1e-2 : cmp16 ? 1e-3 : 1e-4);
    if (ties < 0) fail_msg("block indices differ from the reference");
    if (ties > 0) { /* near-tie: the device's (equally valid) choice defines the reference */
      rin.block_indices = dev_idx;
      ref_forward(&s, &rin, ref, NULL);
      tie_rows += ties;
    }
    free(dev_idx);
  }

  double e = rel_error(dev_download(ctx, &to), ref, nq * s.DV);
  printf(
      "# B=%d TQ=%d TK=%d H=%d G=%d DK=%d DV=%d BS=%d S=%d W=%d nseq=%d gates=%c%c%c%s%s "
      "%s%s%s%s%s: o %.2e%s (%.1f s)\n",
      s.B, s.TQ, s.TK, s.H, fc->G, s.DK, s.DV, s.BS, s.S, s.W, s.nseq,
      fc->gates & G_CMP ? 'c' : '-', fc->gates & G_SLC ? 's' : '-', fc->gates & G_SWA ? 'w' : '-',
      idx ? " caller-indices" : "", cnt ? " counts" : "", fc->mixed ? "mixed" : dtype_label(fc->dt),
      fc->padded ? " padded" : "", fc->misalign ? " misaligned-ws" : "",
      tf32                      ? " tf32"
      : flags & CLNSA_FLAG_TF32 ? " tf32-flag exact"
                                : "",
      cmp16 ? " cmp16" : "", e, ties ? " (index ties)" : "", now() - t0);
  /* TF32: the semantics' 1e-2 for tf32 matrix units, and an error above the exact path's
   * 1e-5 (v alone is rounded by ~1e-4) shows that the TF32 kernels ran */
  assert_true(e < (tf32 ? 1e-2 : dtype_tolerance(dout)));
  if (tf32) assert_true(e > 1e-5);
  if (fc->padded) check_gaps(&to);
  check_arena(off, need);

  clnsa_workspace_destroy(ws);
  clnsa_seqs_destroy(seqs);
  dev_free(&tq), dev_free(&tk), dev_free(&tv), dev_free(&to);
  for (int i = 0; i < 3; i++)
    if (g[i]) dev_free(&tg[i]);
  if (idx) dev_free(&ti);
  if (cnt) dev_free(&tc);
  free(q), free(k), free(v), free(g[0]), free(g[1]), free(g[2]), free(idx), free(cnt), free(ref);
  free(sv.k_cmp), free(sv.lse_cmp), free(sv.block_indices);
}

/* The cases every run covers (data random, structure fixed). Kernels are specialised
 * per shape class, G, dtype and alignment, so each class keeps one dtype and the G values
 * that matter to it: G in {1, 2, 3} with (16, 24, 8) f32, {5, 16} with (32, 16, 4) f16,
 * {2, 32} with (48, 32, 16) bf16. */
/* clang-format off */
static const fcase fixed_cases[] = {
    /* B TQ  TK  H  G cls S  W  nseq cu_q cu_k gates caller counts padded dtype mixed misalign */
    {2, 37, 37, 2, 1, 0, 3, 0, 0, {0}, {0}, G_SLC, false, false, true, CLNSA_F32, false, false},
    /* T < BS, T = BS - 1 */
    {1, 5, 5, 1, 2, 0, 2, 4, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F32, false, false},
    {1, 7, 7, 2, 3, 0, 4, 0, 0, {0}, {0}, 0, false, false, false, CLNSA_F32, false, true},
    /* queries shorter than keys */
    {2, 9, 45, 2, 2, 0, 3, 8, 0, {0}, {0}, G_ALL, false, false, true, CLNSA_F32, false, false},
    /* no queries at all */
    {2, 0, 3, 1, 2, 0, 2, 4, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F32, false, false},
    /* varlen with an empty and a length-1 sequence */
    {1, 0, 0, 1, 3, 0, 3, 6, 5, {0, 13, 13, 14, 40, 57}, {0}, G_ALL, false, false, false,
     CLNSA_F32, false, false},
    /* caller-given indices (-1, duplicates, blocks past the query's own) */
    {2, 40, 40, 2, 2, 0, 5, 0, 0, {0}, {0}, G_SLC | G_CMP, true, false, true, CLNSA_F32, false,
     false},
    /* g_swa without a window: no window term */
    {1, 20, 20, 1, 2, 0, 2, 0, 0, {0}, {0}, G_SWA | G_CMP, false, false, false, CLNSA_F32, false,
     false},
    /* a dtype per tensor */
    {2, 19, 26, 1, 3, 0, 3, 5, 0, {0}, {0}, G_ALL, false, true, true, CLNSA_F32, true, false},

    {2, 61, 61, 1, 5, 1, 5, 9, 0, {0}, {0}, G_CMP | G_SWA, false, true, false, CLNSA_F16, false,
     false},
    {1, 50, 50, 2, 16, 1, 6, 16, 0, {0}, {0}, G_ALL, false, true, true, CLNSA_F16, false, false},
    /* decode: one query against a long cache */
    {3, 1, 70, 1, 5, 1, 4, 16, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F16, false, true},
    /* varlen, queries shorter than keys, an empty and a length-1 sequence */
    {1, 0, 0, 1, 16, 1, 4, 5, 4, {0, 5, 5, 6, 16}, {0, 20, 20, 21, 45}, G_SLC | G_SWA, false,
     true, false, CLNSA_F16, false, false},
    /* caller-given indices without the compressed branch */
    {1, 29, 29, 3, 5, 1, 4, 7, 0, {0}, {0}, G_SWA, true, false, false, CLNSA_F16, false, false},
    /* dense causal attention through the window */
    {1, 24, 24, 2, 5, 1, 3, 100, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F16, false,
     false},

    {1, 33, 33, 1, 32, 2, 2, 0, 0, {0}, {0}, G_SLC | G_CMP, false, false, false, CLNSA_BF16,
     false, false},
    {1, 0, 0, 1, 2, 2, 3, 0, 3, {0, 1, 17, 30}, {0}, 0, true, true, false, CLNSA_BF16, false,
     false},
    {2, 47, 47, 2, 2, 2, 3, 20, 0, {0}, {0}, G_ALL, false, true, false, CLNSA_BF16, false, false},
    {1, 35, 35, 1, 32, 2, 4, 12, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_BF16, false,
     false},
};
/* clang-format on */

static void test_forward_fixed(void **state) {
  (void)state;
  rng r = {harness_seed("forward fixed")};
  for (size_t i = 0; i < sizeof fixed_cases / sizeof fixed_cases[0]; i++)
    run_case(&fixed_cases[i], 0, &r);
}

/* Random structure on top: lengths, heads, packing, gates, indices and counts drawn
 * from the seed. The build-relevant choices (shape class, G, dtypes, padding, workspace
 * alignment, whether a window runs) are copied from a fixed case, so that these cases reuse its
 * kernels. */
static void test_forward_random(void **state) {
  (void)state;
  rng r = {harness_seed("forward random")};
  const int nfixed = (int)(sizeof fixed_cases / sizeof fixed_cases[0]);
  for (int n = 0; n < 12; n++) {
    const fcase *like = &fixed_cases[rng_int(&r, 0, nfixed - 1)];
    fcase fc;
    memset(&fc, 0, sizeof fc);
    fc.cls = like->cls, fc.G = like->G, fc.dt = like->dt, fc.mixed = like->mixed;
    fc.padded = like->padded, fc.misalign = like->misalign;
    fc.H = rng_int(&r, 1, fc.G >= 16 ? 2 : 3);
    fc.S = rng_int(&r, 1, 6);
    fc.W = like->W ? rng_int(&r, 1, 40) : 0;
    fc.gates = (unsigned)rng_int(&r, 0, 7);
    fc.caller_idx = rng_int(&r, 0, 3) == 0;
    fc.counts = rng_int(&r, 0, 2) == 0;
    if (rng_int(&r, 0, 2) == 0) { /* packed sequences, some empty or of length 1 */
      fc.B = 1;
      fc.nseq = rng_int(&r, 1, 6);
      const bool shorter_q = rng_int(&r, 0, 1);
      for (int i = 0; i < fc.nseq; i++) {
        const int u = rng_int(&r, 0, 5);
        const int lk = u == 0 ? 0 : u == 1 ? 1 : rng_int(&r, 2, 60);
        fc.cu_q[i + 1] = fc.cu_q[i] + (shorter_q ? rng_int(&r, 0, lk) : lk);
        fc.cu_k[i + 1] = fc.cu_k[i] + lk;
      }
      if (!shorter_q) fc.cu_k[fc.nseq] = 0; /* marks cu_k as "same as cu_q" */
    } else {
      fc.B = rng_int(&r, 1, 3);
      fc.TK = rng_int(&r, 1, 80);
      fc.TQ = rng_int(&r, 0, 2) ? fc.TK : rng_int(&r, 1, fc.TK);
    }
    run_case(&fc, 0, &r);
  }
}

/* CLNSA_FLAG_TF32 with f32 inputs: compressed, selected and window attention on the TF32
 * kernels (cl/attend_tf32.cl) where the context has a tensor-core path (NVIDIA, or
 * CLNSA_TUNE=MMA=2 through `test_forward tensor-cores`), the exact path elsewhere and for
 * rows it does not take (the padded case); top-k stays exact (on the rounded lse_cmp).
 * D = 128 with G = 16 and a long window, G = 3 with per-token counts, varlen with an empty
 * and a length-1 sequence, caller indices with TQ < TK. */
/* clang-format off */
static const fcase tf32_cases[] = {
    /* B TQ  TK  H  G cls S  W  nseq cu_q cu_k gates caller counts padded dtype mixed misalign */
    {1, 48, 48, 1, 16, 3, 3, 40, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F32, false, false},
    {2, 47, 47, 2, 3, 2, 3, 20, 0, {0}, {0}, G_ALL, false, true, false, CLNSA_F32, false, false},
    {1, 0, 0, 2, 2, 2, 4, 12, 5, {0, 20, 20, 21, 60, 75}, {0}, G_ALL, false, false, false,
     CLNSA_F32, false, false},
    {1, 9, 60, 1, 5, 2, 3, 16, 0, {0}, {0}, G_SLC | G_SWA, true, false, false, CLNSA_F32, false,
     false},
    {1, 30, 30, 1, 2, 2, 3, 8, 0, {0}, {0}, G_ALL, false, false, true, CLNSA_F32, false, false},
};
/* clang-format on */

/* A table of cases with params.flags = flags, seeded by `name`, saying which path runs. */
static void run_path_cases(const char *name, const fcase *cases, size_t n, unsigned flags) {
  rng r = {harness_seed(name)};
  printf("# tensor-core path: %d\n", (int)clnsa_context_tensor_cores(ctx));
  for (size_t i = 0; i < n; i++) run_case(&cases[i], flags, &r);
}

static void test_forward_tf32(void **state) {
  (void)state;
  run_path_cases("forward tf32", tf32_cases, sizeof tf32_cases / sizeof tf32_cases[0],
                 CLNSA_FLAG_TF32);
}

/* f16 / bf16 with G <= 4 on the tensor-core path: the selected branch runs kv-block-major
 * (src/selected_kvm.c: chunks of the tokens that selected each block, partial results per
 * slot, merged by lse) for all of them (the default KVM_MAX_G = 4, which
 * `test_forward tensor-cores` also sets). Block 0 is every token's, so its chunks take several
 * passes of rows; G = 1, 2, 3, 4, per-token counts, varlen, caller indices with duplicates
 * and blocks past the query's own, a window beside it, a misaligned workspace, and blocks
 * of 64 keys whose staged tiles serve every pass of a chunk. */
/* clang-format off */
static const fcase kvm_cases[] = {
    /* B TQ  TK  H  G cls S  W  nseq cu_q cu_k gates caller counts padded dtype mixed misalign */
    {1, 160, 160, 2, 1, 4, 4, 0, 0, {0}, {0}, G_SLC | G_CMP, false, false, false, CLNSA_BF16,
     false, false},
    {2, 77, 77, 1, 3, 4, 5, 0, 0, {0}, {0}, G_SLC | G_CMP, false, true, false, CLNSA_F16, false,
     false},
    {1, 0, 0, 2, 2, 4, 3, 6, 4, {0, 50, 50, 51, 130}, {0}, G_ALL, false, false, false,
     CLNSA_BF16, false, false},
    {1, 90, 90, 1, 4, 4, 6, 0, 0, {0}, {0}, G_SLC, true, false, false, CLNSA_BF16, false, false},
    {1, 64, 64, 1, 1, 4, 2, 0, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_F16, false, true},
    {1, 300, 300, 1, 1, 5, 3, 0, 0, {0}, {0}, G_SLC | G_CMP, false, false, false, CLNSA_BF16,
     false, false},
};
/* clang-format on */

static void test_forward_kvm(void **state) {
  (void)state;
  run_path_cases("forward kvm", kvm_cases, sizeof kvm_cases / sizeof kvm_cases[0], 0);
}

/* The kv-block-major forward in launches over ranges of 13 tokens (CLNSA_TUNE KVM_RANGE,
 * what the host does where the partials of all tokens do not fit one buffer): ranges end
 * inside mask words, inside sequences and across batch and varlen boundaries, and each
 * chunk lists only its range's tokens. The workspace then holds one range's partials. */
static void test_forward_kvm_ranges(void **state) {
  (void)state;
  rng r = {harness_seed("forward kvm ranges")};
  run_case(&kvm_cases[0], 0, &r);
  const size_t whole = last_need;
  harness_tune_extend("KVM_RANGE=13");
  const size_t picks[] = {0, 1, 2, 3}; /* G = 1; B = 2, G = 3; varlen G = 2; G = 4, caller */
  for (size_t i = 0; i < sizeof picks / sizeof picks[0]; i++) {
    run_case(&kvm_cases[picks[i]], 0, &r);
    if (i == 0) {
      printf("# forward workspace: %zu bytes, %zu with ranges of 13 tokens\n", whole, last_need);
      /* on a tensor-core path the partials are reserved, for a range at a time */
      if (clnsa_context_tensor_cores(ctx) != CLNSA_MMA_NONE)
        assert_true(last_need < whole);
      else
        assert_true(last_need == whole);
    }
  }
  harness_tune_teardown(NULL);
}

/* CLNSA_FLAG_CMP_16BIT: the forward keeps k_cmp, v_cmp in the dtypes of k, v (the
 * reference rounds its pooled means the same way). With D in 32-wide chunks the
 * tensor-core compressed attention and top-k take the 16-bit k_cmp as it is (`test_forward
 * tensor-cores`): bf16 with G = 16, f16 with G = 3 (whose f32 k_cmp has no tensor-core
 * path), varlen; and the mixed dtypes (k_cmp bf16, v_cmp f32) on the portable kernels. */
/* clang-format off */
static const fcase cmp16_cases[] = {
    /* B TQ  TK  H  G cls S  W  nseq cu_q cu_k gates caller counts padded dtype mixed misalign */
    {1, 100, 100, 1, 16, 4, 3, 0, 0, {0}, {0}, G_ALL, false, false, false, CLNSA_BF16, false,
     false},
    {2, 70, 70, 2, 3, 4, 4, 16, 0, {0}, {0}, G_SLC | G_CMP, false, true, false, CLNSA_F16, false,
     false},
    {1, 0, 0, 1, 4, 4, 3, 0, 4, {0, 50, 50, 51, 130}, {0}, G_ALL, false, false, false,
     CLNSA_BF16, false, false},
    {2, 19, 26, 1, 3, 0, 3, 5, 0, {0}, {0}, G_ALL, false, true, true, CLNSA_F32, true, false},
};
/* clang-format on */

static void test_forward_cmp16(void **state) {
  (void)state;
  run_path_cases("forward cmp16", cmp16_cases, sizeof cmp16_cases / sizeof cmp16_cases[0],
                 CLNSA_FLAG_CMP_16BIT);
}

/* The stages of one forward must be ordered by events alone: the same cases on an
 * out-of-order queue. */
static void test_forward_out_of_order(void **state) {
  (void)state;
  clnsa_context *in_order = ctx;
  cl_device_id dev = clnsa_context_device(in_order);
  cl_command_queue q = clCreateCommandQueue(clnsa_context_cl(in_order), dev,
                                            CL_QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE, NULL);
  if (!q) {
    printf("# out-of-order queues are not supported here\n");
    skip();
  }
  clnsa_context *ooo = NULL;
  assert_int_equal(clnsa_context_create(clnsa_context_cl(in_order), dev, q, &ooo), CLNSA_SUCCESS);
  clReleaseCommandQueue(q); /* the context holds its own reference */
  ctx = ooo;
  rng r = {harness_seed("forward out-of-order")};
  const int picks[] = {1, 5, 10, 17};
  for (size_t i = 0; i < sizeof picks / sizeof picks[0]; i++)
    run_case(&fixed_cases[picks[i]], 0, &r);
  ctx = in_order;
  clnsa_context_destroy(ooo);
}

int main(int argc, char **argv) {
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ctx = harness_context();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_forward_fixed),
      cmocka_unit_test(test_forward_random),
      cmocka_unit_test(test_forward_out_of_order),
      cmocka_unit_test(test_forward_tf32),
      cmocka_unit_test(test_forward_kvm),
      cmocka_unit_test_teardown(test_forward_kvm_ranges, harness_tune_teardown),
      cmocka_unit_test(test_forward_cmp16),
  };
  /* `test_forward tensor-cores`: the TF32, kv-block-major and 16-bit k_cmp cases, on the
   * tensor-core path */
  const struct CMUnitTest tc_only[] = {
      cmocka_unit_test(test_forward_tf32), cmocka_unit_test(test_forward_kvm),
      cmocka_unit_test_teardown(test_forward_kvm_ranges, harness_tune_teardown),
      cmocka_unit_test(test_forward_cmp16)};
  const bool tc = harness_tensor_cores_mode(ctx, argc, argv);
  if (tc) harness_tune_append("KVM_MAX_G=4"); /* the default; kept so G 3, 4 stay covered */
  int rc = tc ? cmocka_run_group_tests(tc_only, NULL, NULL) : cmocka_run_group_tests(tests, NULL, NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("# forward: %.1f s, %d rows decided by near-ties\n",
         (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec), tie_rows);
  if (arena) clReleaseMemObject(arena);
  clnsa_context_destroy(ctx);
  return rc;
}
