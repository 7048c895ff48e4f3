/* Per-device tunables. Kernels carry standalone defaults (#ifndef NAME / #define NAME);
 * the host picks values per vendor/architecture here and passes them as -D options.
 * CLNSA_TUNE="NAME=VALUE,..." appends overrides for experiments. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define VENDOR_NVIDIA 0x10DEu
#define VENDOR_AMD 0x1002u
#define VENDOR_INTEL 0x8086u

/* Rows of a flash tile and keys staged per step, chosen so that the local arrays of
 * cl/attend.cl (q tile, k tile, v tile, score tile, all f32) fit the device. */
attend_tuning tuning_attend(const clnsa_context *ctx, int dk, int dv, int rows_hint) {
  attend_tuning t;
  const device_info *info = &ctx->info;
  bool cpu = (info->type & CL_DEVICE_TYPE_CPU) != 0;
  t.rows = rows_hint > 0 ? rows_hint : 16;
  t.key_tile = 32;
  t.threads = cpu ? 64 : 128;
  if (info->vendor_id == VENDOR_NVIDIA || info->vendor_id == VENDOR_AMD) t.threads = 128;
  size_t budget = info->local_mem ? (size_t)info->local_mem - 1024 : 32768;
  for (;;) {
    size_t need = sizeof(float) * ((size_t)t.rows * dk + (size_t)t.key_tile * (dk + 1) +
                                   (size_t)t.key_tile * dv + (size_t)t.rows * (t.key_tile + 1) +
                                   3 * (size_t)t.rows);
    if (need <= budget || (t.key_tile <= 8 && t.rows <= 1)) break;
    if (t.key_tile > 8)
      t.key_tile /= 2;
    else
      t.rows /= 2;
  }
  while ((size_t)t.threads > info->max_wg && t.threads > 1) t.threads /= 2;
  return t;
}

void tuning_env_override(build_options *o) {
  const char *env = getenv("CLNSA_TUNE");
  if (!env || !*env) return;
  char buf[512];
  strncpy(buf, env, sizeof buf - 1);
  buf[sizeof buf - 1] = '\0';
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
    if (strchr(tok, '=')) options_add(o, " -D%s", tok);
}

int tuning_env_int(const char *name, int fallback, int min) {
  const char *s = getenv("CLNSA_TUNE");
  size_t n = strlen(name);
  while (s && *s) {
    if (!strncmp(s, name, n) && s[n] == '=') {
      char *end;
      long v = strtol(s + n + 1, &end, 10);
      bool whole = end != s + n + 1 && (*end == ',' || *end == '\0');
      return whole && v >= min && v <= (1 << 20) ? (int)v : fallback;
    }
    s = strchr(s, ',');
    if (s) s++;
  }
  return fallback;
}
