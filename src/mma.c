/* Whether a context may use the tensor-core kernels (cl/warp_ops.cl and its callers).
 *
 * Hardware path: NVIDIA devices only, and only after cl/mma_probe.cl built and gave the
 * results the PTX fragment layouts predict, for f16 and for bf16. The probe runs once per
 * context, at its first use of a kernel with a tensor-core variant.
 * Emulated path (CLNSA_TUNE=MMA=2): the same kernels with the warp instructions emulated
 * through local memory, on any device; slow, for the tests that keep the fast path's
 * layouts checked on CPUs. CLNSA_TUNE=MMA=0 turns the fast path off.
 * On Hopper the kernels that have a wgmma variant (cl/wgmma_ops.cl) take it after a
 * second probe, cl/wgmma_probe.cl (wgmma_enabled).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define VENDOR_NVIDIA 0x10DEu

static float probe_a(int r, int k) { return (float)((r * 3 + k * 5) % 7 - 3); }
static float probe_b(int k, int n) { return (float)((k * 2 + n * 3) % 5 - 2); }

/* Bits of a float that is exact in the 16-bit type (the probe's values all are). */
static uint32_t bits16(float x, clnsa_dtype dt) {
  if (dt == CLNSA_BF16) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u >> 16;
  }
  if (x == 0.0f) return 0;
  uint32_t sign = x < 0 ? 0x8000u : 0u;
  int e;
  float m = frexpf(fabsf(x), &e); /* |x| = m 2^e, m in [0.5, 1) */
  return sign | (uint32_t)(e - 1 + 15) << 10 | (uint32_t)((m * 2.0f - 1.0f) * 1024.0f);
}

#define PROBE_OUT 12 /* floats a lane (cl/mma_probe.cl) */

static bool probe_matches(const float *out, clnsa_dtype dt) {
  for (int lane = 0; lane < 32; lane++) {
    const int gid = lane >> 2, tig = lane & 3;
    const float *o = out + PROBE_OUT * lane;
    for (int i = 0; i < 4; i++) {
      const int row = gid + 8 * (i >> 1), col = 2 * tig + (i & 1);
      float want = (float)(i + 1);
      for (int k = 0; k < 16; k++) want += probe_a(row, k) * probe_b(k, col);
      if (o[i] != want) return false;
    }
    uint32_t t, p;
    memcpy(&t, &o[4], sizeof t);
    memcpy(&p, &o[6], sizeof p);
    const uint32_t t_want = bits16((float)(2 * tig * 8 + gid), dt) |
                            bits16((float)((2 * tig + 1) * 8 + gid), dt) << 16;
    const uint32_t p_want = bits16(1.5f, dt) | bits16(-2.0f, dt) << 16;
    if (t != t_want || o[5] != (float)(lane ^ 5) || p != p_want) return false;
    /* ldmatrix .trans: word i holds elements (2tig, gid), (2tig + 1, gid) of matrix i,
     * whose element (r, j) is 64 i + 8 r + j */
    for (int i = 0; i < 4; i++) {
      uint32_t m;
      memcpy(&m, &o[8 + i], sizeof m);
      const uint32_t m_want = bits16((float)(64 * i + 16 * tig + gid), dt) |
                              bits16((float)(64 * i + 16 * tig + 8 + gid), dt) << 16;
      if (m != m_want) return false;
    }
  }
  return true;
}

/* Builds and runs the probe for one 16-bit type; *ok tells whether it matched. Errors of
 * the OpenCL calls are reported as such; a probe that does not build is just "not ok". */
static clnsa_status probe_run(clnsa_context *ctx, clnsa_dtype dt, bool emulate, bool *ok) {
  build_options opt = {{0}, 0};
  options_add(&opt, "-DMMA_DT=%d -DWARP_EMULATE=%d", (int)dt, emulate ? 1 : 0);
  cl_kernel kern;
  *ok = false;
  if (program_kernel(ctx, "warp_ops.cl+mma_probe.cl", opt.text, "mma_probe", &kern) !=
      CLNSA_SUCCESS)
    return CLNSA_SUCCESS;
  float out[32 * PROBE_OUT];
  cl_int err;
  cl_mem buf = clCreateBuffer(ctx->cl, CL_MEM_WRITE_ONLY, sizeof out, NULL, &err);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clCreateBuffer(mma probe)");
  size_t global = 32, local = 32;
  err = clSetKernelArg(kern, 0, sizeof buf, &buf);
  if (err == CL_SUCCESS)
    err = clEnqueueNDRangeKernel(ctx->queue, kern, 1, NULL, &global, &local, 0, NULL, NULL);
  if (err == CL_SUCCESS)
    err = clEnqueueReadBuffer(ctx->queue, buf, CL_TRUE, 0, sizeof out, out, 0, NULL, NULL);
  clReleaseMemObject(buf);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "running the mma probe");
  *ok = probe_matches(out, dt);
  return CLNSA_SUCCESS;
}

clnsa_status mma_mode(clnsa_context *ctx, int *mode) {
  const int want = tuning_env_int("MMA", -1, 0);
  /* mma.m16n8k16 with bf16 (and m16n8k8 .tf32) need compute capability 8.0: an older
   * NVIDIA GPU skips the probe's build (it would fail there anyway) */
  const bool old_nvidia = ctx->info.cc_major > 0 && ctx->info.cc_major < 8;
  if (want == 0 || (want < 0 && (ctx->info.vendor_id != VENDOR_NVIDIA || old_nvidia))) {
    *mode = MMA_OFF;
    return CLNSA_SUCCESS;
  }
  const bool emulate = want == 2;
  int *state = emulate ? &ctx->mma_emulated : &ctx->mma_hardware;
  if (*state == 0) {
    bool f16 = false, bf16 = false;
    CHECK_STATUS(probe_run(ctx, CLNSA_F16, emulate, &f16));
    if (f16) CHECK_STATUS(probe_run(ctx, CLNSA_BF16, emulate, &bf16));
    *state = f16 && bf16 ? 1 : -1;
  }
  *mode = *state > 0 ? (emulate ? MMA_EMULATED : MMA_HARDWARE) : MMA_OFF;
  return CLNSA_SUCCESS;
}

/* ---- wgmma (cl/wgmma_ops.cl) ---- */
static float wgp_a(int r, int k) { return (float)((r * 3 + k * 5) % 7 - 3); }
static float wgp_bk(int k, int n) { return (float)((k * 2 + n * 3) % 5 - 2); }
static float wgp_bt(int k, int n) { return (float)((k * 5 + n) % 9 - 4); }

/* Every lane's accumulators of cl/wgmma_probe.cl against the closed forms: per 8 columns
 * nt, d[4 nt + i] = C[16 warp + gid + 8 (i / 2)][8 nt + 2 tig + i % 2]. */
static bool wgmma_probe_matches(const float *out, int lanes) {
  for (int lid = 0; lid < lanes; lid++) {
    const int warp = lid >> 5, gid = (lid & 31) >> 2, tig = lid & 3;
    for (int j = 0; j < 48; j++) {
      const bool kmaj = j < 16;
      const int e = kmaj ? j : j - 16, i = e & 3;
      const int row = 16 * warp + gid + 8 * (i >> 1), col = 8 * (e >> 2) + 2 * tig + (i & 1);
      float want = kmaj ? (float)j : 0.0f;
      for (int k = 0; k < 16; k++)
        want += wgp_a(row, k) * (kmaj ? wgp_bk(k, col) : wgp_bt(k, col));
      if (out[48 * lid + j] != want) return false;
    }
  }
  return true;
}

static clnsa_status wgmma_probe_run(clnsa_context *ctx, bool emulate, bool *ok) {
  const int lanes = emulate ? 32 : 128;
  build_options opt = {{0}, 0};
  options_add(&opt, "-DMMA_DT=%d -DWARP_EMULATE=%d -DWG=%d -DWG_N_S=32 -DWG_N_V=64",
              (int)CLNSA_BF16, emulate ? 1 : 0, lanes);
  cl_kernel kern;
  *ok = false;
  if (program_kernel(ctx, "warp_ops.cl+wgmma_ops.cl+wgmma_probe.cl", opt.text, "wgmma_probe",
                     &kern) != CLNSA_SUCCESS)
    return CLNSA_SUCCESS;
  float out[128 * 48];
  cl_int err;
  cl_mem buf = clCreateBuffer(ctx->cl, CL_MEM_WRITE_ONLY, sizeof out, NULL, &err);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clCreateBuffer(wgmma probe)");
  size_t global = (size_t)lanes, local = (size_t)lanes;
  err = clSetKernelArg(kern, 0, sizeof buf, &buf);
  if (err == CL_SUCCESS)
    err = clEnqueueNDRangeKernel(ctx->queue, kern, 1, NULL, &global, &local, 0, NULL, NULL);
  if (err == CL_SUCCESS)
    err = clEnqueueReadBuffer(ctx->queue, buf, CL_TRUE, 0, sizeof(float) * 48 * (size_t)lanes,
                              out, 0, NULL, NULL);
  clReleaseMemObject(buf);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "running the wgmma probe");
  *ok = wgmma_probe_matches(out, lanes);
  return CLNSA_SUCCESS;
}

/* Whether the kernels may use wgmma under tensor-core path `mode`: only with
 * CLNSA_TUNE=WGMMA=1, and on hardware only with compute capability 9.x (Hopper; the
 * instructions are sm_90a's alone) once the probe passed. Off by default: within the 48 KiB
 * of local memory NVIDIA's OpenCL gives a work-group, a staged tile holds 32 or 64 keys,
 * and wgmma of that width (m64n32/n64, A from registers) ran the compressed and dense
 * attention 1.05-1.6x slower than the mma.sync kernels on the H100 (docs/PERFORMANCE.md). */
clnsa_status wgmma_enabled(clnsa_context *ctx, int mode, bool *on) {
  const int want = tuning_env_int("WGMMA", 0, 0);
  *on = false;
  if (mode == MMA_OFF || want != 1 || (mode == MMA_HARDWARE && ctx->info.cc_major != 9))
    return CLNSA_SUCCESS;
  const bool emulate = mode == MMA_EMULATED;
  int *state = emulate ? &ctx->wgmma_emulated : &ctx->wgmma_hardware;
  if (*state == 0) {
    bool ok = false;
    CHECK_STATUS(wgmma_probe_run(ctx, emulate, &ok));
    *state = ok ? 1 : -1;
  }
  *on = *state > 0;
  return CLNSA_SUCCESS;
}

clnsa_mma clnsa_context_tensor_cores(clnsa_context *ctx) {
  int mode = MMA_OFF;
  if (!ctx || mma_mode(ctx, &mode) != CLNSA_SUCCESS) return CLNSA_MMA_NONE;
  return mode == MMA_HARDWARE ? CLNSA_MMA_NVIDIA : mode == MMA_EMULATED ? CLNSA_MMA_EMULATED
                                                                          : CLNSA_MMA_NONE;
}

int clnsa_context_wgmma(clnsa_context *ctx) {
  int mode = MMA_OFF;
  bool on = false;
  if (!ctx || mma_mode(ctx, &mode) != CLNSA_SUCCESS || wgmma_enabled(ctx, mode, &on) != CLNSA_SUCCESS)
    return 0;
  return on ? 1 : 0;
}
