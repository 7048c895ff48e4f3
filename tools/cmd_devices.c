/* `clnsa devices`: every OpenCL device, numbered as --device and CLNSA_DEVICE count them
 * (all devices of all platforms, in platform order), with what tuning depends on. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#ifndef CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV
#define CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV 0x4000
#define CL_DEVICE_COMPUTE_CAPABILITY_MINOR_NV 0x4001
#endif

#define MAX_PLATFORMS 16 /* the same caps clnsa_select_device uses */
#define MAX_DEVICES 64

void usage_devices(FILE *f) {
  fprintf(f,
          "usage: clnsa devices\n\n"
          "Lists every OpenCL device of every platform. The number in brackets is what\n"
          "--device and CLNSA_DEVICE accept; \"(default)\" marks the device a run takes\n"
          "when neither is given (CLNSA_DEVICE, else the first GPU, else the first device).\n");
}

/* A device info string, or "?" when the query fails. */
static void info_string(cl_device_id d, cl_device_info what, char *out, size_t n) {
  if (clGetDeviceInfo(d, what, n - 1, out, NULL) != CL_SUCCESS) snprintf(out, n, "?");
  out[n - 1] = '\0';
}

static bool has_extension(const char *list, const char *ext) {
  size_t len = strlen(ext);
  for (const char *p = strstr(list, ext); p; p = strstr(p + 1, ext))
    if ((p == list || p[-1] == ' ') && (p[len] == ' ' || p[len] == '\0')) return true;
  return false;
}

static const char *type_name(cl_device_type t) {
  if (t & CL_DEVICE_TYPE_GPU) return "GPU";
  if (t & CL_DEVICE_TYPE_CPU) return "CPU";
  if (t & CL_DEVICE_TYPE_ACCELERATOR) return "accelerator";
  return "other";
}

static void print_device(long index, const char *platform, cl_device_id d, bool is_default) {
  char name[256], version[128], driver[128];
  info_string(d, CL_DEVICE_NAME, name, sizeof name);
  info_string(d, CL_DEVICE_OPENCL_C_VERSION, version, sizeof version);
  info_string(d, CL_DRIVER_VERSION, driver, sizeof driver);
  cl_uint vendor = 0, units = 0;
  cl_device_type type = 0;
  cl_ulong local = 0, global = 0;
  size_t max_wg = 0, ext_len = 0;
  clGetDeviceInfo(d, CL_DEVICE_VENDOR_ID, sizeof vendor, &vendor, NULL);
  clGetDeviceInfo(d, CL_DEVICE_TYPE, sizeof type, &type, NULL);
  clGetDeviceInfo(d, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof units, &units, NULL);
  clGetDeviceInfo(d, CL_DEVICE_LOCAL_MEM_SIZE, sizeof local, &local, NULL);
  clGetDeviceInfo(d, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof global, &global, NULL);
  clGetDeviceInfo(d, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof max_wg, &max_wg, NULL);
  char *ext = NULL;
  if (clGetDeviceInfo(d, CL_DEVICE_EXTENSIONS, 0, NULL, &ext_len) == CL_SUCCESS &&
      (ext = calloc(ext_len + 1, 1)) != NULL)
    clGetDeviceInfo(d, CL_DEVICE_EXTENSIONS, ext_len, ext, NULL);
  const char *exts = ext ? ext : "";

  printf("[%ld] %s / %s%s\n", index, platform, name, is_default ? "  (default)" : "");
  printf("    type            %s\n", type_name(type));
  printf("    vendor id       0x%04x\n", (unsigned)vendor);
  printf("    OpenCL C        %s\n", version);
  printf("    driver          %s\n", driver);
  printf("    compute units   %u\n", (unsigned)units);
  printf("    global memory   %llu MiB\n", (unsigned long long)(global >> 20));
  printf("    local memory    %llu KiB\n", (unsigned long long)(local >> 10));
  printf("    max work-group  %zu\n", max_wg);
  printf("    fp64            %s\n", has_extension(exts, "cl_khr_fp64") ? "yes" : "no");
  printf("    cl_khr_fp16     %s\n", has_extension(exts, "cl_khr_fp16") ? "yes" : "no");
  if (has_extension(exts, "cl_nv_device_attribute_query")) {
    cl_uint major = 0, minor = 0;
    clGetDeviceInfo(d, CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV, sizeof major, &major, NULL);
    clGetDeviceInfo(d, CL_DEVICE_COMPUTE_CAPABILITY_MINOR_NV, sizeof minor, &minor, NULL);
    printf("    compute cap.    %u.%u\n", (unsigned)major, (unsigned)minor);
  }
  free(ext);
  /* Only NVIDIA devices have a hardware tensor-core path; asking builds and runs its probe. */
  const char *mma = "no (portable kernels)";
  char sel[32];
  snprintf(sel, sizeof sel, "%ld", index);
  clnsa_context *ctx = NULL;
  const char *wg = "off (opt-in: CLNSA_TUNE=WGMMA=1 on compute capability 9.x)";
  if (vendor == 0x10DE && clnsa_context_create_from_selector(sel, &ctx) == CLNSA_SUCCESS) {
    mma = clnsa_context_tensor_cores(ctx) == CLNSA_MMA_NVIDIA ? "yes (mma.sync probe passed)"
                                                              : "no (mma.sync probe failed)";
    if (clnsa_context_wgmma(ctx)) wg = "on (CLNSA_TUNE=WGMMA=1, wgmma probe passed)";
  }
  clnsa_context_destroy(ctx);
  printf("    tensor cores    %s\n", mma);
  printf("    wgmma           %s\n", wg);
}

int cmd_devices(int argc, char **argv) {
  if (argc > 1) {
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
      usage_devices(stdout);
      return 0;
    }
    fprintf(stderr, "clnsa devices: unexpected argument '%s'\n\n", argv[1]);
    usage_devices(stderr);
    return CLI_EXIT_USAGE;
  }
  cl_platform_id platforms[MAX_PLATFORMS];
  cl_uint np = 0;
  if (clGetPlatformIDs(MAX_PLATFORMS, platforms, &np) != CL_SUCCESS || np == 0) {
    fprintf(stderr,
            "clnsa devices: no OpenCL device found: no OpenCL platform (is an ICD "
            "installed?)\n");
    return CLI_EXIT_FAIL;
  }
  if (np > MAX_PLATFORMS) np = MAX_PLATFORMS;

  cl_platform_id def_p = NULL;
  cl_device_id def_d = NULL;
  char why[512] = "";
  clnsa_status def_st = clnsa_select_device(NULL, &def_p, &def_d, why, sizeof why);
  const char *env = getenv("CLNSA_DEVICE");

  long index = 0;
  for (cl_uint p = 0; p < np; p++) {
    char pname[256] = "?", pversion[256] = "?";
    clGetPlatformInfo(platforms[p], CL_PLATFORM_NAME, sizeof pname - 1, pname, NULL);
    clGetPlatformInfo(platforms[p], CL_PLATFORM_VERSION, sizeof pversion - 1, pversion, NULL);
    cl_device_id devices[MAX_DEVICES];
    cl_uint nd = 0;
    if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, MAX_DEVICES, devices, &nd) != CL_SUCCESS)
      nd = 0;
    if (nd > MAX_DEVICES) nd = MAX_DEVICES;
    printf("platform %u: %s (%s), %u device%s\n", (unsigned)p, pname, pversion, (unsigned)nd,
           nd == 1 ? "" : "s");
    for (cl_uint i = 0; i < nd; i++, index++)
      print_device(index, pname, devices[i], def_st == CLNSA_SUCCESS && devices[i] == def_d);
  }
  if (index == 0) {
    fprintf(stderr, "clnsa devices: no OpenCL device found: platforms list no device\n");
    return CLI_EXIT_FAIL;
  }
  if (def_st != CLNSA_SUCCESS)
    printf("\ndefault: none: %s\n", why);
  else if (env && *env)
    printf("\ndefault chosen by CLNSA_DEVICE=\"%s\"\n", env);
  return 0;
}
