/* Shared declarations of the `clnsa` command-line tool (tools/clnsa.c dispatches to
 * the cmd_*.c files; cli_util.c holds what several subcommands need). */
#ifndef CLNSA_TOOLS_CLI_H
#define CLNSA_TOOLS_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "clnsa.h"

/* Exit statuses: 0 success, 1 a failure (bad input, library error, check failed),
 * 2 a usage error (unknown or missing option). */
#define CLI_EXIT_FAIL 1
#define CLI_EXIT_USAGE 2

/* Subcommands: argv[0] is the subcommand's name. Each returns the process exit status. */
int cmd_devices(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_bench(int argc, char **argv); /* cmd_bench.c */

/* Usage text of each subcommand, printed by `clnsa help` and on usage errors. */
void usage_devices(FILE *f);
void usage_run(FILE *f);
void usage_demo(FILE *f);
void usage_bench(FILE *f);

/* ---- option values (cli_util.c) ---- */
/* Parses a whole string as an int in [lo, hi]; false (and *out untouched) otherwise. */
bool cli_parse_int(const char *s, long lo, long hi, int *out);
bool cli_parse_float(const char *s, float *out);
/* "f32", "f16", "bf16" (also "float32", "float16", "bfloat16"). */
bool cli_parse_dtype(const char *s, clnsa_dtype *out);
const char *cli_dtype_name(clnsa_dtype t);
/* The tolerance on ||out - ref|| / ||ref|| for a storage type (docs: semantics). */
double cli_dtype_tolerance(clnsa_dtype t);

/* ---- host-side storage conversions, both round to nearest even ---- */
uint16_t cli_f32_to_f16(float f);
uint16_t cli_f32_to_bf16(float f);
float cli_f16_to_f32(uint16_t h);
float cli_bf16_to_f32(uint16_t h);
/* The value x has after a round trip through dtype t (x itself for f32). */
float cli_round_to(clnsa_dtype t, float x);

/* ---- device helpers ---- */
/* Opens a context on the device `selector` names (NULL: CLNSA_DEVICE, then the default).
 * On failure prints "<prog>: <status>: <reason>" to stderr and returns NULL. */
clnsa_context *cli_open_context(const char *prog, const char *selector);
/* Prints "<prog>: <status string>: <clnsa_last_message>" to stderr. */
void cli_report(const char *prog, clnsa_context *ctx, clnsa_status st);
/* A read-only buffer holding n floats converted to dtype t (n may be 0). NULL with a
 * message printed on failure. */
cl_mem cli_upload_floats(const char *prog, clnsa_context *ctx, clnsa_dtype t, const float *x,
                         size_t n);
cl_mem cli_upload_ints(const char *prog, clnsa_context *ctx, const int32_t *x, size_t n);
cl_mem cli_alloc(const char *prog, clnsa_context *ctx, size_t bytes);
/* Blocking read of a (strided) tensor into dense C-order host memory: floats of any
 * storage type become float, i32 stays int32_t. Returns false with a message printed. */
bool cli_download(const char *prog, clnsa_context *ctx, const clnsa_tensor *t, void *out);
/* Elements of a tensor's shape. */
size_t cli_tensor_count(const clnsa_tensor *t);

/* ---- float64 host NSA forward for a slice of queries (host_check.c) ----
 * Written from the semantics, independent of the library's kernels, for `clnsa demo`.
 * One sequence (B = 1, TQ = TK = T), DK = DV = D, no window branch; inputs are dense
 * C-order host copies holding exactly the values the device sees. */
typedef struct host_problem {
  int T, HQ, H, D, BS, S;
  double scale;
  const float *q, *k, *v;     /* [T,HQ,D], [T,H,D], [T,H,D] */
  const float *g_cmp, *g_slc; /* [T,HQ]; NULL = absent */
} host_problem;

typedef struct host_nsa {
  host_problem p;
  int NB;
  double *k_cmp, *v_cmp; /* [NB,H,D] mean-pooled */
  double *prob;          /* scratch: compressed-attention probabilities [NB] */
  unsigned char *seen;   /* scratch: blocks already counted [NB] */
} host_nsa;

bool host_nsa_init(host_nsa *h, const host_problem *p);
void host_nsa_free(host_nsa *h);
/* Top-k selection of the query at position p for kv head kvh: sel[S] (ascending, then
 * -1) and the importance imp[c] of each candidate c < p / BS (imp needs NB slots). */
void host_select(host_nsa *h, int p, int kvh, int *sel, double *imp);
/* How a device selection compares with the host's: 0 the same set, 1 a different set
 * explained by importances equal within rel_tol (a near tie), -1 wrong. */
int host_compare_selection(const host_nsa *h, int p, const int *dev, const int *ref,
                           const double *imp, double rel_tol);
/* o[D] of the query at position p, head hq, attending to the blocks listed in sel. */
void host_output(host_nsa *h, int p, int hq, const int *sel, double *o);

#endif /* CLNSA_TOOLS_CLI_H */
