/* The API's error paths: every entry point refuses bad arguments with the exact status,
 * explains why in clnsa_last_message, and writes nothing (no byte of any buffer changes).
 *
 * Validation must not build kernels: the test points CLNSA_CACHE_DIR at an empty
 * directory and checks at the end that no compiled program was stored there. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* cmocka.h needs the standard headers above. */
#include <cmocka.h>

#include "harness.h"

/* The base problem: valid for every entry point. */
enum { B = 2, T = 10, HQ = 4, H = 2, DK = 8, DV = 12, BS = 4, S = 3, W = 4, NB = 3 };

/* clang-format off */
typedef enum role {
  R_Q, R_K, R_V, R_GC, R_GS, R_GW, R_IDX, R_CNT, R_KC, R_VC, R_OC, R_LC, R_OS, R_LS,
  R_OW, R_LW, R_O, NROLES
} role;

static const char *role_name[NROLES] = {"q",     "k",       "v",     "g_cmp", "g_slc",
                                        "g_swa", "indices", "counts", "k_cmp", "v_cmp",
                                        "o_cmp", "lse_cmp", "o_slc", "lse_slc", "o_swa",
                                        "lse_swa", "o"};

typedef enum entry { E_FORWARD, E_POOL, E_CMP, E_TOPK, E_SLC, E_SWA, NENTRIES } entry;
static const char *entry_name[NENTRIES] = {"clnsa_forward", "clnsa_pool",
                                           "clnsa_compressed_attention", "clnsa_topk",
                                           "clnsa_selected_attention", "clnsa_window_attention"};

/* Roles each entry takes, one character per role in the order of enum role:
 * 'r' required, 'o' optional and given in the base call, 'm' optional and left out of
 * the base call (a case that mutates it passes it), '-' not an argument. */
static const char *entry_roles[NENTRIES] = {
    /*            qkvGGGicKVOLOLOLo */
    [E_FORWARD] = "rrrooomo--------r",
    [E_POOL] = "-rr-----rr-------",
    [E_CMP] = "r-------rrro-----",
    [E_TOPK] = "r-----ror--r-----",
    [E_SLC] = "rrr---r-----ro---",
    [E_SWA] = "rrr-----------ro-",
};
/* clang-format on */

static clnsa_context *ctx, *ctx_other; /* ctx_other shares ctx's cl_context */
static cl_context cl_foreign;          /* a second cl_context on the same device */
static dev_tensor base[NROLES];
static cl_mem ws_buf;
static clnsa_workspace *ws_ok, *ws_small, *ws_other;
static size_t ws_bytes;
static unsigned char *snap[NROLES + 1];
static size_t snap_n[NROLES + 1];
static char sentinel_text[256]; /* the message reset_message leaves */
static int ncases;

/* One call's arguments, all mutable. */
typedef struct args {
  clnsa_context *ctx;
  clnsa_params params;
  const clnsa_params *pp;
  clnsa_seqs *seqs;
  clnsa_tensor t[NROLES];
  const clnsa_tensor *p[NROLES];
  clnsa_workspace *ws;
  cl_uint nwait;
} args;

static bool takes(entry e, role r) {
  return entry_roles[e][r] != '-';
}
static bool required(entry e, role r) {
  return entry_roles[e][r] == 'r';
}
static bool in_base(entry e, role r) {
  return entry_roles[e][r] == 'r' || entry_roles[e][r] == 'o';
}

static args base_args(entry e) {
  args a;
  memset(&a, 0, sizeof a);
  a.ctx = ctx;
  a.params = clnsa_params_default();
  a.params.block_size = BS;
  a.params.block_count = S;
  a.params.window = W;
  a.pp = &a.params;
  a.ws = ws_ok;
  for (int r = 0; r < NROLES; r++) {
    a.t[r] = base[r].t;
    a.p[r] = in_base(e, (role)r) ? &a.t[r] : NULL;
  }
  return a;
}

/* Pointers into a copy must be re-aimed after the struct moved. */
static void fix_pointers(args *a) {
  a->pp = a->pp ? &a->params : NULL;
  for (int r = 0; r < NROLES; r++)
    if (a->p[r]) a->p[r] = &a->t[r];
}

static clnsa_status call(entry e, args *a) {
  fix_pointers(a);
  const clnsa_tensor *const *p = a->p;
  cl_event ev = NULL;
  clnsa_status st = CLNSA_SUCCESS;
  switch (e) {
    case E_FORWARD: {
      clnsa_inputs in = {p[R_Q],  p[R_K],   p[R_V],   p[R_GC], p[R_GS],
                         p[R_GW], p[R_IDX], p[R_CNT], a->seqs};
      st = clnsa_forward(a->ctx, a->pp, &in, p[R_O], a->ws, a->nwait, NULL, &ev);
      break;
    }
    case E_POOL:
      st = clnsa_pool(a->ctx, a->pp, a->seqs, p[R_K], p[R_V], p[R_KC], p[R_VC], 0, NULL, &ev);
      break;
    case E_CMP:
      st = clnsa_compressed_attention(a->ctx, a->pp, a->seqs, p[R_Q], p[R_KC], p[R_VC], p[R_OC],
                                      p[R_LC], 0, NULL, &ev);
      break;
    case E_TOPK:
      st = clnsa_topk(a->ctx, a->pp, a->seqs, p[R_Q], p[R_KC], p[R_LC], p[R_CNT], p[R_IDX], 0, NULL,
                      &ev);
      break;
    case E_SLC:
      st = clnsa_selected_attention(a->ctx, a->pp, a->seqs, p[R_Q], p[R_K], p[R_V], p[R_IDX],
                                    p[R_OS], p[R_LS], 0, NULL, &ev);
      break;
    case E_SWA:
      st = clnsa_window_attention(a->ctx, a->pp, a->seqs, p[R_Q], p[R_K], p[R_V], p[R_OW], p[R_LW],
                                  0, NULL, &ev);
      break;
    default:
      break;
  }
  if (st != CLNSA_SUCCESS && ev != NULL)
    fail_msg("%s returned an event with a failure", entry_name[e]);
  if (ev) clReleaseEvent(ev);
  return st;
}

/* ---- what every case checks ---- */
static void reset_message(void) {
  int32_t cu[2] = {0, 1};
  clnsa_seqs *s = NULL;
  clnsa_params p = clnsa_params_default();
  assert_int_equal(clnsa_seqs_create(ctx, &p, -5, cu, NULL, &s), CLNSA_ERR_CU_SEQLENS);
  snprintf(sentinel_text, sizeof sentinel_text, "%s", clnsa_last_message(ctx));
}

static void snapshot_all(void) {
  clFinish(clnsa_context_queue(ctx));
  for (int r = 0; r < NROLES; r++) snap[r] = dev_raw(ctx, &base[r], &snap_n[r]);
  dev_tensor w = {0};
  w.t.buffer = ws_buf;
  snap[NROLES] = dev_raw(ctx, &w, &snap_n[NROLES]);
}

static void check_untouched(const char *what) {
  clFinish(clnsa_context_queue(ctx));
  for (int r = 0; r <= NROLES; r++) {
    size_t n;
    dev_tensor w = {0};
    w.t.buffer = r < NROLES ? base[r].t.buffer : ws_buf;
    unsigned char *now = dev_raw(ctx, &w, &n);
    if (n != snap_n[r] || memcmp(now, snap[r], n) != 0)
      fail_msg("%s: buffer of %s changed", what, r < NROLES ? role_name[r] : "workspace");
    free(now);
  }
}

/* Checks one failed call: exact status, a fresh message, nothing written. */
static void expect(clnsa_status got, clnsa_status want, clnsa_context *c, const char *what) {
  ncases++;
  if (got != want)
    fail_msg("%s: got %s (%d), expected %s (%d); message: %s", what, clnsa_status_string(got),
             (int)got, clnsa_status_string(want), (int)want, c ? clnsa_last_message(c) : "-");
  if (c) {
    const char *m = clnsa_last_message(c);
    if (!m || !*m || (c == ctx && strcmp(m, sentinel_text) == 0))
      fail_msg("%s: no message explains %s", what, clnsa_status_string(want));
  }
  check_untouched(what);
  reset_message();
}

static void expect_call(entry e, args a, clnsa_status want, const char *fmt, ...) {
  char what[256];
  va_list ap;
  va_start(ap, fmt);
  int n = snprintf(what, sizeof what, "%s: ", entry_name[e]);
  vsnprintf(what + n, sizeof what - (size_t)n, fmt, ap);
  va_end(ap);
  clnsa_status st = call(e, &a);
  expect(st, want, a.ctx, what);
}

/* ---- fixture ---- */
static void role_shape(role r, int64_t *shape, int *ndim, clnsa_dtype *dt) {
  int64_t s4[4] = {B, T, HQ, DV};
  *dt = CLNSA_F32;
  *ndim = 4;
  switch (r) {
    case R_Q:
      s4[3] = DK;
      break;
    case R_K:
      s4[2] = H, s4[3] = DK;
      break;
    case R_V:
      s4[2] = H;
      break;
    case R_GC:
    case R_GS:
    case R_GW:
    case R_LC:
    case R_LS:
    case R_LW:
      *ndim = 3;
      break;
    case R_IDX:
      s4[2] = H, s4[3] = S, *dt = CLNSA_I32;
      break;
    case R_CNT:
      s4[2] = H, *ndim = 3, *dt = CLNSA_I32;
      break;
    case R_KC:
      s4[1] = NB, s4[2] = H, s4[3] = DK;
      break;
    case R_VC:
      s4[1] = NB, s4[2] = H;
      break;
    default:
      break;
  }
  memcpy(shape, s4, sizeof s4);
}

static size_t tensor_count(const clnsa_tensor *t) {
  size_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
  return n;
}

static cl_mem make_buffer(cl_context c, size_t bytes) {
  cl_int err;
  cl_mem m = clCreateBuffer(c, CL_MEM_READ_WRITE, bytes, NULL, &err);
  assert_int_equal(err, CL_SUCCESS);
  return m;
}

static void setup_fixture(void) {
  rng g = {1234};
  for (int r = 0; r < NROLES; r++) {
    int64_t shape[4];
    int nd;
    clnsa_dtype dt;
    role_shape((role)r, shape, &nd, &dt);
    size_t n = 1;
    for (int i = 0; i < nd; i++) n *= (size_t)shape[i];
    if (dt == CLNSA_I32) {
      int *x = malloc(n * sizeof *x);
      for (size_t i = 0; i < n; i++) x[i] = r == R_CNT ? 2 : (i % S == 0 ? 0 : -1);
      base[r] = dev_upload_int(ctx, nd, shape, x);
      free(x);
    } else {
      double *x = malloc(n * sizeof *x);
      rng_fill(&g, x, n, -1, 1);
      base[r] = dev_upload(ctx, dt, nd, shape, x, r == R_Q || r == R_O);
      base[r].host = NULL;
      free(x);
    }
  }
  args a = base_args(E_FORWARD);
  fix_pointers(&a);
  clnsa_inputs in = {a.p[R_Q],  a.p[R_K], a.p[R_V], a.p[R_GC], a.p[R_GS],
                     a.p[R_GW], NULL,     NULL,     NULL};
  assert_int_equal(clnsa_forward_workspace_size(ctx, &a.params, &in, &ws_bytes), CLNSA_SUCCESS);
  ws_buf = make_buffer(clnsa_context_cl(ctx), ws_bytes + 256);
  unsigned char *fill = malloc(ws_bytes + 256);
  memset(fill, 0x5a, ws_bytes + 256);
  clEnqueueWriteBuffer(clnsa_context_queue(ctx), ws_buf, CL_TRUE, 0, ws_bytes + 256, fill, 0, NULL,
                       NULL);
  free(fill);
  assert_int_equal(clnsa_workspace_create(ctx, ws_buf, 256, ws_bytes, &ws_ok), CLNSA_SUCCESS);
  assert_int_equal(clnsa_workspace_create(ctx, ws_buf, 0, ws_bytes - 4, &ws_small), CLNSA_SUCCESS);
  assert_int_equal(clnsa_workspace_create(ctx_other, ws_buf, 0, ws_bytes, &ws_other),
                   CLNSA_SUCCESS);
  snapshot_all();
  reset_message();
}

/* ---- per-tensor mutations, applied to every role of every entry ---- */
static void tensor_cases(entry e, role r) {
  const clnsa_dtype dt = base[r].t.dtype;
  const char *n = role_name[r];
  args a;
  if (required(e, r)) {
    a = base_args(e);
    a.p[r] = NULL;
    expect_call(e, a, CLNSA_ERR_NULL_ARGUMENT, "%s NULL", n);
  }
  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].buffer = NULL;
  expect_call(e, a, CLNSA_ERR_NULL_ARGUMENT, "%s buffer NULL", n);

  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].dtype = (clnsa_dtype)7;
  expect_call(e, a, CLNSA_ERR_DTYPE, "%s dtype 7", n);
  a.t[r].dtype = dt == CLNSA_I32 ? CLNSA_F32 : CLNSA_I32;
  expect_call(e, a, CLNSA_ERR_DTYPE, "%s dtype %s", n, dtype_label(a.t[r].dtype));

  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].shape[0] = B - 1;
  expect_call(e, a, CLNSA_ERR_SHAPE_MISMATCH, "%s batch %d", n, B - 1);
  a = base_args(e);
  a.p[r] = &a.t[r];
  if (a.t[r].ndim == 4) {
    a.t[r].ndim = 3;
  } else {
    a.t[r].ndim = 4;
    a.t[r].shape[3] = 1;
    a.t[r].strides[3] = 1;
  }
  expect_call(e, a, CLNSA_ERR_SHAPE_MISMATCH, "%s rank %d", n, a.t[r].ndim);

  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].strides[1] = -1;
  expect_call(e, a, CLNSA_ERR_STRIDE, "%s negative stride", n);
  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].strides[a.t[r].ndim - 1] = 2;
  expect_call(e, a, CLNSA_ERR_STRIDE, "%s last stride 2", n);

  /* A dense buffer 4 bytes short of what the view addresses. */
  a = base_args(e);
  a.p[r] = &a.t[r];
  int64_t shape[4];
  memcpy(shape, a.t[r].shape, sizeof shape);
  a.t[r] = clnsa_tensor_make(NULL, 0, dt, a.t[r].ndim, shape);
  size_t need = tensor_count(&a.t[r]) * clnsa_dtype_size(dt);
  a.t[r].buffer = make_buffer(clnsa_context_cl(ctx), need - 4);
  expect_call(e, a, CLNSA_ERR_BUFFER_TOO_SMALL, "%s buffer 4 bytes short", n);
  clReleaseMemObject(a.t[r].buffer);
  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].offset = tensor_count(&a.t[r]) + 1;
  expect_call(e, a, CLNSA_ERR_BUFFER_TOO_SMALL, "%s offset too large", n);
  a.t[r].offset = (size_t)1 << 62;
  expect_call(e, a, CLNSA_ERR_BUFFER_TOO_SMALL, "%s offset 2^62", n);

  a = base_args(e);
  a.p[r] = &a.t[r];
  a.t[r].buffer = make_buffer(cl_foreign, need + 64);
  expect_call(e, a, CLNSA_ERR_INVALID_HANDLE, "%s buffer of another cl_context", n);
  clReleaseMemObject(a.t[r].buffer);
}

/* Head dimensions of the tensors that define DK and DV. */
static void head_dim_cases(entry e) {
  const role defining[] = {R_Q, R_K, R_V, R_KC, R_VC};
  for (size_t i = 0; i < sizeof defining / sizeof defining[0]; i++) {
    role r = defining[i];
    if (!takes(e, r) || (e == E_POOL && (r == R_KC || r == R_VC))) continue;
    const int64_t dims[2] = {CLNSA_MAX_HEAD_DIM + 1, 0};
    for (int j = 0; j < 2; j++) {
      args a = base_args(e);
      a.t[r].shape[3] = dims[j];
      expect_call(e, a, CLNSA_ERR_HEAD_DIM, "%s head dim %lld", role_name[r], (long long)dims[j]);
    }
  }
}

static void param_cases(entry e) {
  args a = base_args(e);
  a.ctx = NULL;
  expect_call(e, a, CLNSA_ERR_NULL_ARGUMENT, "context NULL");
  a = base_args(e);
  a.pp = NULL;
  expect_call(e, a, CLNSA_ERR_NULL_ARGUMENT, "params NULL");
  const int counts[2] = {0, CLNSA_MAX_BLOCK_COUNT + 1};
  for (int i = 0; i < 2; i++) {
    a = base_args(e);
    a.params.block_count = counts[i];
    expect_call(e, a, CLNSA_ERR_BLOCK_COUNT, "block_count %d", counts[i]);
  }
  a = base_args(e);
  a.params.block_size = 0;
  expect_call(e, a, CLNSA_ERR_BLOCK_COUNT, "block_size 0");
  a = base_args(e);
  a.params.cmp_block_size = 2 * BS;
  expect_call(e, a, CLNSA_ERR_UNSUPPORTED, "cmp_block_size != block_size");
  a = base_args(e);
  a.params.compress = CLNSA_COMPRESS_LINEAR;
  expect_call(e, a, CLNSA_ERR_UNSUPPORTED, "linear compression");
  clnsa_paged_kv paged = {NULL, 16};
  a = base_args(e);
  a.params.paged_kv = &paged;
  expect_call(e, a, CLNSA_ERR_UNSUPPORTED, "paged_kv");
  if (takes(e, R_Q)) {
    a = base_args(e);
    a.t[R_Q].shape[2] = 3; /* 3 query heads over 2 kv heads */
    expect_call(e, a, CLNSA_ERR_GROUP_SIZE, "HQ 3, H 2");
  }
}

/* Packed sequences whose totals disagree with the tensors (B = 1 views of the base). */
static void varlen_cases(entry e) {
  clnsa_params p = base_args(e).params;
  struct {
    int32_t q[3], k[3];
    int bs, batch;
    bool needs_q;
    const char *what;
  } cases[] = {
      {{0, 4, 8}, {0, 4, 10}, BS, 1, true, "cu_seqlens_q total 8 != TQ 10"},
      {{0, 4, 9}, {0, 4, 9}, BS, 1, false, "cu_seqlens totals 9 != T 10"},
      {{0, 4, 10}, {0, 4, 10}, 2 * BS, 1, false, "seqs made for another block size"},
      {{0, 4, 10}, {0, 4, 10}, BS, B, false, "seqs with B = 2"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    if (cases[i].needs_q && !takes(e, R_Q)) continue;
    clnsa_seqs *seqs = NULL;
    p.block_size = cases[i].bs;
    assert_int_equal(clnsa_seqs_create(ctx, &p, 2, cases[i].q, cases[i].k, &seqs), 0);
    args a = base_args(e);
    a.seqs = seqs;
    for (int r = 0; r < NROLES; r++) a.t[r].shape[0] = cases[i].batch;
    expect_call(e, a, CLNSA_ERR_CU_SEQLENS, "%s", cases[i].what);
    clnsa_seqs_destroy(seqs);
  }
}

static void test_entries(void **state) {
  (void)state;
  for (int e = 0; e < NENTRIES; e++) {
    int before = ncases;
    param_cases((entry)e);
    for (int r = 0; r < NROLES; r++)
      if (takes((entry)e, (role)r)) tensor_cases((entry)e, (role)r);
    head_dim_cases((entry)e);
    varlen_cases((entry)e);
    printf("# %s: %d cases\n", entry_name[e], ncases - before);
  }
}

static void test_forward_workspace(void **state) {
  (void)state;
  args a = base_args(E_FORWARD);
  a.ws = NULL;
  expect_call(E_FORWARD, a, CLNSA_ERR_WORKSPACE, "workspace NULL");
  a.ws = ws_small;
  expect_call(E_FORWARD, a, CLNSA_ERR_WORKSPACE, "workspace 4 bytes too small");
  a.ws = ws_other;
  expect_call(E_FORWARD, a, CLNSA_ERR_WORKSPACE, "workspace of another clnsa context");
  a = base_args(E_FORWARD);
  a.nwait = 1; /* with a NULL list */
  expect_call(E_FORWARD, a, CLNSA_ERR_NULL_ARGUMENT, "1 event in a NULL wait list");
  {
    /* The window regions are reserved only when the window branch runs. */
    clnsa_inputs in = {&base[R_Q].t, &base[R_K].t, &base[R_V].t, NULL, NULL,
                       NULL,         NULL,         NULL,         NULL};
    size_t need = 0;
    assert_int_equal(clnsa_forward_workspace_size(ctx, &a.params, &in, &need), CLNSA_SUCCESS);
    assert_true(need < ws_bytes);
  }

  /* Size queries validate like the forward. */
  size_t bytes = 0;
  clnsa_inputs in = {&base[R_Q].t, &base[R_K].t, &base[R_V].t, NULL, NULL, NULL, NULL, NULL, NULL};
  clnsa_params p = base_args(E_FORWARD).params;
  expect(clnsa_forward_workspace_size(NULL, &p, &in, &bytes), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "workspace_size: context NULL");
  expect(clnsa_forward_workspace_size(ctx, &p, NULL, &bytes), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "workspace_size: inputs NULL");
  expect(clnsa_forward_workspace_size(ctx, &p, &in, NULL), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "workspace_size: bytes NULL");
  expect(clnsa_backward_workspace_size(ctx, NULL, &in, &bytes), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "backward_workspace_size: params NULL");
  clnsa_tensor q3 = base[R_Q].t;
  q3.shape[2] = 3;
  in.q = &q3;
  expect(clnsa_forward_workspace_size(ctx, &p, &in, &bytes), CLNSA_ERR_GROUP_SIZE, ctx,
         "workspace_size: HQ 3");
  expect(clnsa_backward_workspace_size(ctx, &p, &in, &bytes), CLNSA_ERR_GROUP_SIZE, ctx,
         "backward_workspace_size: HQ 3");
  in.q = &base[R_Q].t;
  clnsa_tensor g = base[R_GC].t;
  g.dtype = CLNSA_I32;
  in.g_cmp = &g;
  expect(clnsa_forward_workspace_size(ctx, &p, &in, &bytes), CLNSA_ERR_DTYPE, ctx,
         "workspace_size: I32 gate");

  /* Workspace handles. */
  clnsa_workspace *w = NULL;
  expect(clnsa_workspace_create(NULL, ws_buf, 0, 16, &w), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "workspace_create: context NULL");
  expect(clnsa_workspace_create(ctx, NULL, 0, 16, &w), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "workspace_create: buffer NULL");
  expect(clnsa_workspace_create(ctx, ws_buf, 0, 16, NULL), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "workspace_create: out NULL");
  expect(clnsa_workspace_create(ctx, ws_buf, 2, 16, &w), CLNSA_ERR_INVALID_ARGUMENT, ctx,
         "workspace_create: offset 2");
  expect(clnsa_workspace_create(ctx, ws_buf, 256, ws_bytes + 4, &w), CLNSA_ERR_BUFFER_TOO_SMALL,
         ctx, "workspace_create: past the buffer's end");
  cl_mem foreign = make_buffer(cl_foreign, 4096);
  expect(clnsa_workspace_create(ctx, foreign, 0, 16, &w), CLNSA_ERR_INVALID_HANDLE, ctx,
         "workspace_create: buffer of another cl_context");
  clReleaseMemObject(foreign);
  assert_null(w);
  clnsa_workspace_destroy(NULL);

  clnsa_tensor view;
  expect(clnsa_forward_block_indices(NULL, &view), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "forward_block_indices: workspace NULL");
  expect(clnsa_forward_block_indices(ws_ok, NULL), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "forward_block_indices: out NULL");
  expect(clnsa_forward_block_indices(ws_ok, &view), CLNSA_ERR_WORKSPACE, ctx,
         "forward_block_indices: no forward yet");

  /* Backward refuses a workspace without a forward (and anything malformed first). */
  clnsa_grads gr = {&base[R_Q].t, &base[R_K].t, &base[R_V].t, NULL, NULL, NULL};
  expect(clnsa_backward(NULL, &p, &in, &base[R_O].t, &gr, ws_ok, 0, NULL, NULL),
         CLNSA_ERR_NULL_ARGUMENT, NULL, "backward: context NULL");
  in.g_cmp = NULL;
  expect(clnsa_backward(ctx, &p, &in, NULL, &gr, ws_ok, 0, NULL, NULL), CLNSA_ERR_NULL_ARGUMENT,
         ctx, "backward: d_o NULL");
  expect(clnsa_backward(ctx, &p, &in, &base[R_O].t, NULL, ws_ok, 0, NULL, NULL),
         CLNSA_ERR_NULL_ARGUMENT, ctx, "backward: grads NULL");
  expect(clnsa_backward(ctx, &p, &in, &base[R_O].t, &gr, ws_ok, 0, NULL, NULL), CLNSA_ERR_WORKSPACE,
         ctx, "backward: no forward recorded");
  expect(clnsa_backward(ctx, &p, &in, &base[R_O].t, &gr, NULL, 0, NULL, NULL), CLNSA_ERR_WORKSPACE,
         ctx, "backward: workspace NULL");
}

static void test_seqs_create(void **state) {
  (void)state;
  clnsa_params p = clnsa_params_default();
  const int32_t ok[3] = {0, 3, 7};
  clnsa_seqs *s = NULL;
  expect(clnsa_seqs_create(NULL, &p, 2, ok, NULL, &s), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "seqs_create: context NULL");
  expect(clnsa_seqs_create(ctx, NULL, 2, ok, NULL, &s), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "seqs_create: params NULL");
  expect(clnsa_seqs_create(ctx, &p, 2, NULL, NULL, &s), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "seqs_create: cu_seqlens_q NULL");
  expect(clnsa_seqs_create(ctx, &p, 2, ok, NULL, NULL), CLNSA_ERR_NULL_ARGUMENT, ctx,
         "seqs_create: out NULL");
  clnsa_params bad = p;
  bad.block_count = 0;
  expect(clnsa_seqs_create(ctx, &bad, 2, ok, NULL, &s), CLNSA_ERR_BLOCK_COUNT, ctx,
         "seqs_create: block_count 0");
  bad = p;
  bad.block_size = 0;
  expect(clnsa_seqs_create(ctx, &bad, 2, ok, NULL, &s), CLNSA_ERR_BLOCK_COUNT, ctx,
         "seqs_create: block_size 0");
  struct {
    int n;
    int32_t q[4], k[4];
    bool k_given;
    const char *what;
  } cases[] = {
      {2, {1, 3, 7}, {0}, false, "cu_seqlens_q[0] = 1"},
      {2, {0, -2, 7}, {0}, false, "negative cu_seqlens_q"},
      {3, {0, 5, 3, 7}, {0}, false, "decreasing cu_seqlens_q"},
      {2, {0, 3, 7}, {0, -1, 7}, true, "negative cu_seqlens_k"},
      {2, {0, 3, 7}, {1, 3, 7}, true, "cu_seqlens_k[0] = 1"},
      {2, {0, 3, 7}, {0, 2, 8}, true, "a sequence with more queries than keys"},
      {0, {0}, {0}, false, "no sequences"},
      {-1, {0}, {0}, false, "negative count"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    s = NULL;
    expect(clnsa_seqs_create(ctx, &p, cases[i].n, cases[i].q, cases[i].k_given ? cases[i].k : NULL,
                             &s),
           CLNSA_ERR_CU_SEQLENS, ctx, cases[i].what);
    assert_null(s);
  }
}

static void test_context_create(void **state) {
  (void)state;
  cl_context c = clnsa_context_cl(ctx);
  cl_device_id d = clnsa_context_device(ctx);
  cl_command_queue q = clnsa_context_queue(ctx);
  clnsa_context *out = NULL;
  expect(clnsa_context_create(NULL, d, q, &out), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "context_create: cl_context NULL");
  expect(clnsa_context_create(c, NULL, q, &out), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "context_create: device NULL");
  expect(clnsa_context_create(c, d, NULL, &out), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "context_create: queue NULL");
  expect(clnsa_context_create(c, d, q, NULL), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "context_create: out NULL");
  cl_int err;
  cl_command_queue fq = clCreateCommandQueue(cl_foreign, d, 0, &err);
  assert_int_equal(err, CL_SUCCESS);
  expect(clnsa_context_create(c, d, fq, &out), CLNSA_ERR_INVALID_HANDLE, NULL,
         "context_create: queue of another cl_context");
  assert_null(out);
  clReleaseCommandQueue(fq);
  expect(clnsa_context_create_from_selector(NULL, NULL), CLNSA_ERR_NULL_ARGUMENT, NULL,
         "context_create_from_selector: out NULL");
  expect(clnsa_context_create_from_selector("no such device, surely", &out), CLNSA_ERR_NO_DEVICE,
         NULL, "context_create_from_selector: unknown device");
  clnsa_context_destroy(NULL);
  assert_string_equal(clnsa_last_message(NULL), "no context");
}

static void test_status_strings(void **state) {
  (void)state;
  const clnsa_status all[] = {
#define CLNSA_STATUS_LIST_(name, value, text) name,
      CLNSA_STATUS_TABLE(CLNSA_STATUS_LIST_)
#undef CLNSA_STATUS_LIST_
  };
  const size_t n = sizeof all / sizeof all[0];
  for (size_t i = 0; i < n; i++) {
    const char *s = clnsa_status_string(all[i]);
    assert_non_null(s);
    assert_true(strlen(s) > 0);
    assert_string_not_equal(s, "unknown status");
    for (size_t j = 0; j < i; j++) assert_string_not_equal(s, clnsa_status_string(all[j]));
  }
  assert_string_equal(clnsa_status_string((clnsa_status)12345), "unknown status");
}

static char cache_dir[] = "/tmp/clnsa-errors-XXXXXX";

static void test_nothing_built(void **state) {
  (void)state;
  DIR *dir = opendir(cache_dir);
  assert_non_null(dir);
  int files = 0;
  struct dirent *de;
  while ((de = readdir(dir)) != NULL)
    if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) files++;
  closedir(dir);
  printf("# %d cases; %d programs built by validation\n", ncases, files);
  assert_int_equal(files, 0);
}

int main(void) {
  for (int e = 0; e < NENTRIES; e++)
    if (strlen(entry_roles[e]) != NROLES) {
      fprintf(stderr, "entry_roles[%d] has %zu roles\n", e, strlen(entry_roles[e]));
      return 1;
    }
  /* Any kernel build would leave a cached program in this empty directory. */
  if (!mkdtemp(cache_dir)) return 1;
  setenv("CLNSA_CACHE_DIR", cache_dir, 1);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  ctx = harness_context();
  cl_device_id dev = clnsa_context_device(ctx);
  cl_int err;
  cl_foreign = clCreateContext(NULL, 1, &dev, NULL, NULL, &err);
  if (err != CL_SUCCESS) return 1;
  if (clnsa_context_create(clnsa_context_cl(ctx), dev, clnsa_context_queue(ctx), &ctx_other))
    return 1;
  setup_fixture();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_status_strings),    cmocka_unit_test(test_context_create),
      cmocka_unit_test(test_seqs_create),       cmocka_unit_test(test_entries),
      cmocka_unit_test(test_forward_workspace), cmocka_unit_test(test_nothing_built),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("# errors: %.2f s\n",
         (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
  clnsa_workspace_destroy(ws_ok);
  clnsa_workspace_destroy(ws_small);
  clnsa_workspace_destroy(ws_other);
  clReleaseMemObject(ws_buf);
  for (int r = 0; r < NROLES; r++) {
    dev_free(&base[r]);
    free(snap[r]);
  }
  free(snap[NROLES]);
  clnsa_context_destroy(ctx_other);
  clnsa_context_destroy(ctx);
  clReleaseContext(cl_foreign);
  rmdir(cache_dir);
  return rc;
}
