/* Device discovery: the selector grammar and the facts tuning and caching need. */
#include <ctype.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#ifndef CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV
#define CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV 0x4000
#define CL_DEVICE_COMPUTE_CAPABILITY_MINOR_NV 0x4001
#endif

static bool has_extension(cl_device_id device, const char *ext) {
  size_t n = 0;
  if (clGetDeviceInfo(device, CL_DEVICE_EXTENSIONS, 0, NULL, &n) != CL_SUCCESS || n == 0)
    return false;
  char *s = malloc(n + 1);
  if (!s) return false;
  bool found = false;
  if (clGetDeviceInfo(device, CL_DEVICE_EXTENSIONS, n, s, NULL) == CL_SUCCESS) {
    s[n] = '\0';
    size_t len = strlen(ext);
    for (const char *p = strstr(s, ext); p; p = strstr(p + 1, ext))
      if ((p == s || p[-1] == ' ') && (p[len] == ' ' || p[len] == '\0')) found = true;
  }
  free(s);
  return found;
}

clnsa_status device_info_query(cl_device_id device, device_info *info) {
  memset(info, 0, sizeof *info);
  cl_platform_id platform;
  cl_int err = clGetDeviceInfo(device, CL_DEVICE_VENDOR_ID, sizeof info->vendor_id,
                               &info->vendor_id, NULL);
  if (err != CL_SUCCESS) return CLNSA_ERR_INVALID_HANDLE;
  clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof info->type, &info->type, NULL);
  clGetDeviceInfo(device, CL_DEVICE_LOCAL_MEM_SIZE, sizeof info->local_mem, &info->local_mem,
                  NULL);
  clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof info->max_alloc,
                  &info->max_alloc, NULL);
  clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof info->max_wg, &info->max_wg,
                  NULL);
  clGetDeviceInfo(device, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof info->compute_units,
                  &info->compute_units, NULL);
  clGetDeviceInfo(device, CL_DEVICE_NAME, sizeof info->name - 1, info->name, NULL);
  clGetDeviceInfo(device, CL_DRIVER_VERSION, sizeof info->driver - 1, info->driver, NULL);
  if (clGetDeviceInfo(device, CL_DEVICE_PLATFORM, sizeof platform, &platform, NULL) ==
      CL_SUCCESS) {
    clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof info->platform_name - 1,
                      info->platform_name, NULL);
    clGetPlatformInfo(platform, CL_PLATFORM_VERSION, sizeof info->platform_version - 1,
                      info->platform_version, NULL);
  }
  info->fp64 = has_extension(device, "cl_khr_fp64");
  if (has_extension(device, "cl_nv_device_attribute_query")) {
    clGetDeviceInfo(device, CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV, sizeof info->cc_major,
                    &info->cc_major, NULL);
    clGetDeviceInfo(device, CL_DEVICE_COMPUTE_CAPABILITY_MINOR_NV, sizeof info->cc_minor,
                    &info->cc_minor, NULL);
  }
  return CLNSA_SUCCESS;
}

/* Case-insensitive substring search. */
static bool contains_ci(const char *hay, const char *needle) {
  size_t n = strlen(needle);
  for (; *hay; hay++) {
    size_t i = 0;
    while (i < n && hay[i] &&
           tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i]))
      i++;
    if (i == n) return true;
  }
  return n == 0;
}

static bool is_index(const char *s) {
  if (!*s) return false;
  for (; *s; s++)
    if (!isdigit((unsigned char)*s)) return false;
  return true;
}

static clnsa_status select_device(const char *selector, cl_platform_id *platform_out,
                                  cl_device_id *device_out, char *message,
                                  size_t message_size);

/* Device discovery is serialized: PoCL 3.1 initializes its devices on the first
 * clGetDeviceIDs, and a second thread arriving meanwhile is told the platform has no
 * device (tests/test_threads.c). The lock guards the driver, not clnsa state. */
static pthread_mutex_t discovery_lock = PTHREAD_MUTEX_INITIALIZER;

clnsa_status clnsa_select_device(const char *selector, cl_platform_id *platform_out,
                                 cl_device_id *device_out, char *message,
                                 size_t message_size) {
  pthread_mutex_lock(&discovery_lock);
  clnsa_status st = select_device(selector, platform_out, device_out, message, message_size);
  pthread_mutex_unlock(&discovery_lock);
  return st;
}

static clnsa_status select_device(const char *selector, cl_platform_id *platform_out,
                                  cl_device_id *device_out, char *message,
                                  size_t message_size) {
  char dummy[8];
  if (!message) {
    message = dummy;
    message_size = sizeof dummy;
  }
  message[0] = '\0';
  if (!selector || !*selector) selector = getenv("CLNSA_DEVICE");
  if (selector && !*selector) selector = NULL;

  cl_platform_id platforms[16];
  cl_uint np = 0;
  if (clGetPlatformIDs(16, platforms, &np) != CL_SUCCESS || np == 0) {
    snprintf(message, message_size, "no OpenCL platform found (is an ICD installed?)");
    return CLNSA_ERR_NO_DEVICE;
  }
  if (np > 16) np = 16;
  long want_index = selector && is_index(selector) ? strtol(selector, NULL, 10) : -1;
  long index = 0;
  cl_platform_id first_p = NULL, gpu_p = NULL;
  cl_device_id first_d = NULL, gpu_d = NULL;
  for (cl_uint p = 0; p < np; p++) {
    cl_device_id devices[64];
    cl_uint nd = 0;
    if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, 64, devices, &nd) != CL_SUCCESS)
      continue;
    if (nd > 64) nd = 64;
    char pname[256] = "";
    clGetPlatformInfo(platforms[p], CL_PLATFORM_NAME, sizeof pname - 1, pname, NULL);
    for (cl_uint i = 0; i < nd; i++, index++) {
      char dname[256] = "", full[600];
      clGetDeviceInfo(devices[i], CL_DEVICE_NAME, sizeof dname - 1, dname, NULL);
      snprintf(full, sizeof full, "%s / %s", pname, dname);
      cl_device_type type = 0;
      clGetDeviceInfo(devices[i], CL_DEVICE_TYPE, sizeof type, &type, NULL);
      bool match = selector ? (want_index >= 0 ? index == want_index : contains_ci(full, selector))
                            : false;
      if (match) {
        *platform_out = platforms[p];
        *device_out = devices[i];
        return CLNSA_SUCCESS;
      }
      if (!first_d) first_p = platforms[p], first_d = devices[i];
      if (!gpu_d && (type & CL_DEVICE_TYPE_GPU)) gpu_p = platforms[p], gpu_d = devices[i];
    }
  }
  if (selector) {
    snprintf(message, message_size, "no OpenCL device matches \"%s\" (try `clnsa devices`)",
             selector);
    return CLNSA_ERR_NO_DEVICE;
  }
  if (!first_d) {
    snprintf(message, message_size, "OpenCL platforms exist but list no device");
    return CLNSA_ERR_NO_DEVICE;
  }
  *platform_out = gpu_d ? gpu_p : first_p;
  *device_out = gpu_d ? gpu_d : first_d;
  return CLNSA_SUCCESS;
}
