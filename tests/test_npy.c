/*
 * Unit tests for tools/npy.c, the .npy reader/writer of the clnsa tool.
 *
 * Files "produced by numpy" are embedded as bytes (generated once with numpy 1.24, see
 * each comment) so that no Python is needed at test time; the values they must decode
 * to are recomputed here from the formula that generated them, not copied. Malformed
 * files are built by make_npy() from a header text, which keeps each rejection case
 * to one readable line.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* mkstemp; meson passes it for the whole project */
#endif

/* cmocka.h needs these four first, in this order. */
/* clang-format off */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
/* clang-format on */

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../tools/npy.h"

/* ------------------------------------------------------------------------- */
/* Bytes written by numpy                                                     */
/* ------------------------------------------------------------------------- */

/* np.save(f, (np.arange(6).reshape(2, 3) * 1.5 - 3).astype('<f4'))
   header: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_F32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x40, 0xc0, 0x00, 0x00, 0xc0, 0xbf, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x3f,
    0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x90, 0x40,
};

/* the same as '<f8'
   header: {'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_F64[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0xbf,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x3f,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12, 0x40,
};

/* the same as '<f2'
   header: {'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_F16[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x32, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0xc2, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x42, 0x80, 0x44,
};

/* np.save(f, (np.arange(6).reshape(2, 3) - 3).astype('<i4'))
   header: {'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_I32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x69, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0xfd, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
};

/* the same as '<i8'
   header: {'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_I64[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x69, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
};

/* np.lib.format.write_array(f, (np.arange(5) * 1.5 - 3).astype('<f4'), version=(2, 0))
   header: {'descr': '<f4', 'fortran_order': False, 'shape': (5,), } */
static const unsigned char NP_V2_F32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x02, 0x00, 0x74, 0x00, 0x00, 0x00, 0x7b, 0x27, 0x64,
    0x65, 0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27,
    0x66, 0x6f, 0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a,
    0x20, 0x46, 0x61, 0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27,
    0x3a, 0x20, 0x28, 0x35, 0x2c, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a, 0x00, 0x00, 0x40, 0xc0, 0x00, 0x00, 0xc0,
    0xbf, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x40, 0x40,
};

/* np.lib.format.write_array(f, (np.arange(4) - 3).astype('<i8').reshape(1, 4, 1), version=(3, 0))
   header: {'descr': '<i8', 'fortran_order': False, 'shape': (1, 4, 1), } */
static const unsigned char NP_V3_I64[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x03, 0x00, 0x74, 0x00, 0x00, 0x00, 0x7b, 0x27, 0x64, 0x65,
    0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x69, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f,
    0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61,
    0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x31,
    0x2c, 0x20, 0x34, 0x2c, 0x20, 0x31, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
};

/* np.save(f, np.array(2.5))
   header: {'descr': '<f8', 'fortran_order': False, 'shape': (), } */
static const unsigned char NP_SCALAR_F64[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x38, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x29, 0x2c, 0x20,
    0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x40,
};

/* np.save(f, np.zeros((0, 3), dtype='<i4'))
   header: {'descr': '<i4', 'fortran_order': False, 'shape': (0, 3), } */
static const unsigned char NP_EMPTY_I32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x69, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x30, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
};

/* np.save(f, np.asfortranarray(NP_F32's array))
   header: {'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), } */
static const unsigned char NP_FORTRAN_F32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x54, 0x72, 0x75, 0x65,
    0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20, 0x33,
    0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0x00, 0x00, 0x40, 0xc0, 0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0xc0, 0xbf, 0x00, 0x00, 0x40, 0x40,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x90, 0x40,
};

/* np.save(f, NP_F32's array .astype('>f4'))
   header: {'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), } */
static const unsigned char NP_BIG_F32[] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27, 0x64, 0x65, 0x73, 0x63,
    0x72, 0x27, 0x3a, 0x20, 0x27, 0x3e, 0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74,
    0x72, 0x61, 0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20,
    0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a,
    0xc0, 0x40, 0x00, 0x00, 0xbf, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3f, 0xc0, 0x00, 0x00,
    0x40, 0x40, 0x00, 0x00, 0x40, 0x90, 0x00, 0x00,
};

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */
/* ------------------------------------------------------------------------- */

#define ERRLEN 256

/* xorshift64*: reproducible random data without depending on rand(). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rng(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}

/* A fresh temporary path; the file exists (empty) until the test removes it. */
static void temp_path(char *path, size_t n) {
  const char *dir = getenv("TMPDIR");
  int fd;
  snprintf(path, n, "%s/npy_test_XXXXXX", dir && *dir ? dir : "/tmp");
  fd = mkstemp(path);
  assert_true(fd >= 0);
  close(fd);
}

static size_t read_whole(const char *path, unsigned char *buf, size_t cap) {
  FILE *f = fopen(path, "rb");
  size_t n;
  assert_non_null(f);
  n = fread(buf, 1, cap, f);
  fclose(f);
  return n;
}

static void write_whole(const char *path, const unsigned char *buf, size_t n) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(buf, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

/* Builds a .npy file: magic, version major.0, header length, `dict` padded with
 * spaces to a 64-byte boundary plus '\n', then data_len bytes 0, 1, 2, ...
 * Returns the file length. */
static size_t make_npy(unsigned char *buf, size_t cap, int major, const char *dict,
                       size_t data_len) {
  size_t pre = major == 1 ? 10 : 12, dl = strlen(dict), hlen = dl + 1, i;
  while ((pre + hlen) % 64) hlen++;
  assert_true(pre + hlen + data_len <= cap);
  memcpy(buf, "\x93NUMPY", 6);
  buf[6] = (unsigned char)major;
  buf[7] = 0;
  for (i = 0; i < pre - 8; i++) buf[8 + i] = (unsigned char)(hlen >> (8 * i));
  memcpy(buf + pre, dict, dl);
  memset(buf + pre + dl, ' ', hlen - dl - 1);
  buf[pre + hlen - 1] = '\n';
  for (i = 0; i < data_len; i++) buf[pre + hlen + i] = (unsigned char)i;
  return pre + hlen + data_len;
}

static void assert_has(const char *err, const char *word) {
  if (!strstr(err, word)) fail_msg("message \"%s\" does not contain \"%s\"", err, word);
}

/* Parses buf, expects failure with `word` in the message and a zeroed output. */
static void expect_reject_buf(const unsigned char *buf, size_t len, size_t max_bytes,
                              const char *word) {
  npy_array a;
  char err[ERRLEN] = "";
  memset(&a, 0xab, sizeof a); /* must be zeroed on failure */
  assert_int_equal(npy_parse(buf, len, max_bytes, &a, err, sizeof err), -1);
  assert_null(a.data);
  assert_int_equal(a.count, 0);
  assert_has(err, word);
}

/* The same for a file built from a header dict with data_len data bytes. */
static void expect_reject(const char *dict, size_t data_len, const char *word) {
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, dict, data_len);
  expect_reject_buf(buf, n, 1 << 20, word);
}

static void expect_parse(const unsigned char *buf, size_t len, npy_array *a) {
  char err[ERRLEN] = "";
  if (npy_parse(buf, len, 1 << 20, a, err, sizeof err) != 0) fail_msg("parse: %s", err);
}

static void assert_shape(const npy_array *a, npy_type type, int ndim, const int64_t *shape,
                         size_t count) {
  int d;
  assert_int_equal(a->type, type);
  assert_int_equal(a->ndim, ndim);
  for (d = 0; d < ndim; d++) assert_int_equal(a->shape[d], shape[d]);
  assert_int_equal(a->count, count);
  assert_non_null(a->data);
}

/* Checks a float array decodes to start + step * i, exactly. */
static void assert_f32_ramp(const npy_array *a, float start, float step) {
  char err[ERRLEN] = "";
  float *f = npy_to_f32(a, err, sizeof err);
  size_t i;
  if (!f) fail_msg("npy_to_f32: %s", err);
  for (i = 0; i < a->count; i++) assert_true(f[i] == start + step * (float)i);
  free(f);
}

static void assert_i32_ramp(const npy_array *a, int32_t start) {
  char err[ERRLEN] = "";
  int32_t *v = npy_to_i32(a, err, sizeof err);
  size_t i;
  if (!v) fail_msg("npy_to_i32: %s", err);
  for (i = 0; i < a->count; i++) assert_int_equal(v[i], start + (int32_t)i);
  free(v);
}

/* ------------------------------------------------------------------------- */
/* Round trips                                                                */
/* ------------------------------------------------------------------------- */

typedef struct shape_case {
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
} shape_case;

static const shape_case SHAPES[] = {
    {0, {0}},    {1, {1}},          {1, {7}},
    {2, {3, 5}}, {4, {2, 3, 1, 7}}, {8, {1, 2, 1, 3, 1, 1, 2, 1}},
    {2, {0, 3}}, {3, {5, 0, 0}},    {1, {1000}},
};

/* The writer's layout: version 1.0, data at a multiple of 64, header ending '\n'. */
static void assert_layout(const char *path, size_t data_bytes) {
  static unsigned char buf[1 << 16];
  size_t n = read_whole(path, buf, sizeof buf), off;
  assert_true(n >= 10);
  assert_memory_equal(buf, "\x93NUMPY\x01\x00", 8);
  off = 10 + (size_t)(buf[8] | buf[9] << 8);
  assert_int_equal(off % 64, 0);
  assert_int_equal(buf[off - 1], '\n');
  assert_int_equal(n, off + data_bytes);
}

static void roundtrip(npy_type type, size_t itemsize, const shape_case *sc) {
  char path[256], err[ERRLEN] = "";
  size_t count = 1, i;
  unsigned char *data;
  npy_array a;
  int d;
  for (d = 0; d < sc->ndim; d++) count *= (size_t)sc->shape[d];
  data = malloc(count * itemsize + 1);
  assert_non_null(data);
  for (i = 0; i < count * itemsize; i++) data[i] = (unsigned char)rng();
  temp_path(path, sizeof path);
  if (npy_write_file(path, type, sc->ndim, sc->shape, data, err, sizeof err) != 0)
    fail_msg("write: %s", err);
  assert_layout(path, count * itemsize);
  if (npy_read_file(path, 1 << 20, &a, err, sizeof err) != 0) fail_msg("read: %s", err);
  assert_shape(&a, type, sc->ndim, sc->shape, count);
  if (count) assert_memory_equal(a.data, data, count * itemsize);
  npy_free(&a);
  free(data);
  remove(path);
}

/* Random bit patterns (NaNs included) must come back byte for byte. */
static void test_roundtrip_f32(void **state) {
  size_t s;
  (void)state;
  for (s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++) roundtrip(NPY_F32, 4, &SHAPES[s]);
}

static void test_roundtrip_i32(void **state) {
  size_t s;
  (void)state;
  for (s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++) roundtrip(NPY_I32, 4, &SHAPES[s]);
}

static void test_roundtrip_other_types(void **state) {
  size_t s;
  (void)state;
  for (s = 0; s < 5; s++) {
    roundtrip(NPY_F64, 8, &SHAPES[s]);
    roundtrip(NPY_F16, 2, &SHAPES[s]);
    roundtrip(NPY_I64, 8, &SHAPES[s]);
  }
}

/* The written header must be exactly what numpy writes, modulo padding. */
static void test_writer_header_text(void **state) {
  static const struct {
    int ndim;
    int64_t shape[3];
    const char *dict;
  } cases[] = {
      {0, {0}, "{'descr': '<i4', 'fortran_order': False, 'shape': (), }"},
      {1, {5}, "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }"},
      {3, {2, 0, 9}, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 0, 9), }"},
  };
  const int32_t zero[10] = {0};
  unsigned char buf[256];
  char path[256], err[ERRLEN];
  size_t i, n;
  (void)state;
  for (i = 0; i < 3; i++) {
    temp_path(path, sizeof path);
    assert_int_equal(
        npy_write_file(path, NPY_I32, cases[i].ndim, cases[i].shape, zero, err, sizeof err), 0);
    n = read_whole(path, buf, sizeof buf);
    assert_true(n >= 10 + strlen(cases[i].dict));
    assert_memory_equal(buf + 10, cases[i].dict, strlen(cases[i].dict));
    remove(path);
  }
}

/* ------------------------------------------------------------------------- */
/* Files written by numpy                                                     */
/* ------------------------------------------------------------------------- */

static void test_numpy_each_type(void **state) {
  static const int64_t shape[2] = {2, 3};
  static const struct {
    const unsigned char *bytes;
    size_t len;
    npy_type type;
  } files[] = {
      {NP_F32, sizeof NP_F32, NPY_F32}, {NP_F64, sizeof NP_F64, NPY_F64},
      {NP_F16, sizeof NP_F16, NPY_F16}, {NP_I32, sizeof NP_I32, NPY_I32},
      {NP_I64, sizeof NP_I64, NPY_I64},
  };
  size_t i;
  (void)state;
  for (i = 0; i < sizeof files / sizeof files[0]; i++) {
    npy_array a;
    expect_parse(files[i].bytes, files[i].len, &a);
    assert_shape(&a, files[i].type, 2, shape, 6);
    if (files[i].type == NPY_I32 || files[i].type == NPY_I64)
      assert_i32_ramp(&a, -3); /* np.arange(6) - 3 */
    else
      assert_f32_ramp(&a, -3.0f, 1.5f); /* np.arange(6) * 1.5 - 3 */
    npy_free(&a);
  }
}

static void test_numpy_v2_v3(void **state) {
  static const int64_t s5[1] = {5}, s141[3] = {1, 4, 1};
  npy_array a;
  (void)state;
  expect_parse(NP_V2_F32, sizeof NP_V2_F32, &a);
  assert_int_equal(NP_V2_F32[6], 2);
  assert_shape(&a, NPY_F32, 1, s5, 5);
  assert_f32_ramp(&a, -3.0f, 1.5f);
  npy_free(&a);
  expect_parse(NP_V3_I64, sizeof NP_V3_I64, &a);
  assert_int_equal(NP_V3_I64[6], 3);
  assert_shape(&a, NPY_I64, 3, s141, 4);
  assert_i32_ramp(&a, -3);
  npy_free(&a);
}

static void test_numpy_scalar_and_empty(void **state) {
  static const int64_t s03[2] = {0, 3};
  npy_array a;
  double v;
  (void)state;
  expect_parse(NP_SCALAR_F64, sizeof NP_SCALAR_F64, &a);
  assert_shape(&a, NPY_F64, 0, NULL, 1);
  memcpy(&v, a.data, sizeof v);
  assert_true(v == 2.5);
  npy_free(&a);
  expect_parse(NP_EMPTY_I32, sizeof NP_EMPTY_I32, &a);
  assert_shape(&a, NPY_I32, 2, s03, 0);
  assert_i32_ramp(&a, 0);
  npy_free(&a);
}

/* Header spellings that Python's dict syntax allows and numpy accepts. */
static void test_header_variants(void **state) {
  static const char *const dicts[] = {
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
      "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2,3)}",
      "{'fortran_order':False,'shape':(2,3,),'descr':'<f4',}",
      "{ 'descr' : '<f4' ,\n\t'fortran_order' : False ,\r\n 'shape' : ( 2 , 3 ) , }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 1,)}",
  };
  unsigned char buf[1024];
  size_t i, n;
  (void)state;
  for (i = 0; i < sizeof dicts / sizeof dicts[0]; i++) {
    npy_array a;
    n = make_npy(buf, sizeof buf, i % 2 ? 1 : 2, dicts[i], 24);
    expect_parse(buf, n, &a);
    assert_int_equal(a.type, NPY_F32);
    assert_int_equal(a.count, 6);
    assert_memory_equal(a.data, buf + n - 24, 24);
    npy_free(&a);
  }
}

/* numpy reads data at any offset, not only multiples of 64 (old files used 16). */
static void test_unaligned_header_and_1d(void **state) {
  static const unsigned char f[] =
      "\x93NUMPY\x01\x00\x38\x00" /* 55 + 1 */
      "{'descr': '<i4', 'fortran_order': False, 'shape': (1,)}"
      "\n\x07\x00\x00\x00";
  static const int64_t s1[1] = {1};
  npy_array a;
  int32_t v;
  (void)state;
  expect_parse(f, sizeof f - 1, &a);
  assert_shape(&a, NPY_I32, 1, s1, 1);
  memcpy(&v, a.data, sizeof v);
  assert_int_equal(v, 7);
  npy_free(&a);
}

/* ------------------------------------------------------------------------- */
/* Rejections                                                                 */
/* ------------------------------------------------------------------------- */

#define D(descr) "{'descr': '" descr "', 'fortran_order': False, 'shape': (2, 3), }"
#define S(shape) "{'descr': '<f4', 'fortran_order': False, 'shape': " shape ", }"

static void test_reject_prefix(void **state) {
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, D("<f4"), 24);
  (void)state;
  expect_reject_buf((const unsigned char *)"", 0, 100, "truncated");
  expect_reject_buf(buf, 5, 100, "truncated");
  expect_reject_buf((const unsigned char *)"PK\x03\x04", 4, 100, "magic");
  expect_reject_buf((const unsigned char *)"\x93NUMPZ\x01\x00", 8, 100, "magic");
  expect_reject_buf(buf, 9, 100, "truncated");
  buf[6] = 4;
  expect_reject_buf(buf, n, 100, "version");
  buf[6] = 0;
  expect_reject_buf(buf, n, 100, "version");
  buf[6] = 1;
  buf[7] = 1;
  expect_reject_buf(buf, n, 100, "version");
  buf[7] = 0;
  buf[6] = 2; /* a v2 length field needs 4 bytes */
  expect_reject_buf(buf, 11, 100, "truncated");
}

static void test_reject_header_beyond_file(void **state) {
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, D("<f4"), 0);
  (void)state;
  expect_reject_buf(buf, n - 1, 100, "beyond");
  buf[8] = 0xff;
  buf[9] = 0xff;
  expect_reject_buf(buf, n, 100, "beyond");
  n = make_npy(buf, sizeof buf, 2, D("<f4"), 24);
  buf[10] = 0x0f; /* a 1 MiB header is allowed, but not in this file */
  expect_reject_buf(buf, n, 100, "beyond");
  buf[11] = 0x80; /* a 2 GiB header is refused up front */
  expect_reject_buf(buf, n, 100, "oversized header");
}

static void test_reject_descr(void **state) {
  char err[ERRLEN];
  npy_array a;
  (void)state;
  expect_reject(D(">f4"), 24, "big-endian");
  expect_reject(D(">i8"), 48, "big-endian");
  expect_reject(D("|O"), 24, "object");
  expect_reject(D("<O"), 24, "object");
  expect_reject(D("|u1"), 6, "descr");
  expect_reject(D("|b1"), 6, "descr");
  expect_reject(D("<c8"), 48, "descr");
  expect_reject(D("<U3"), 72, "descr");
  expect_reject(D("f4"), 24, "descr");
  expect_reject(D("=f4"), 24, "descr");
  expect_reject(D("<f4 "), 24, "descr");
  expect_reject(D(""), 24, "descr");
  expect_reject("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3), }", 24,
                "descr");
  expect_reject("{'descr': 5, 'fortran_order': False, 'shape': (2, 3), }", 24, "malformed");
  expect_reject_buf(NP_BIG_F32, sizeof NP_BIG_F32, 1 << 20, "big-endian");
  /* Hostile bytes are not echoed raw into the message. */
  assert_int_equal(
      npy_parse((const unsigned char
                     *)"\x93NUMPY\x01\x00\x40\x00"
                       "{'descr': '\x1b[2J\x01', 'fortran_order': False, 'shape': ()}   \n",
                74, 100, &a, err, sizeof err),
      -1);
  assert_has(err, "descr");
  assert_null(strchr(err, '\x1b'));
}

static void test_reject_fortran(void **state) {
  (void)state;
  expect_reject("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24, "fortran");
  expect_reject_buf(NP_FORTRAN_F32, sizeof NP_FORTRAN_F32, 1 << 20, "fortran");
}

static void test_reject_malformed(void **state) {
  static const char *const dicts[] = {
      "",
      "[]",
      "{",
      "{'descr': '<f4', 'fortran_order': False}",
      "{'descr': '<f4', 'shape': (2, 3)}",
      "{'fortran_order': False, 'shape': (2, 3)}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}",
      "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
      "{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}",
      "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}",
      "{'descr': '<f4",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}}",
      "{'descr': '<\\x66\\x34', 'fortran_order': False, 'shape': (2, 3)}",
      "{,}",
      "{'descr': '<f4',, 'fortran_order': False, 'shape': (2, 3)}",
      "{descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}",
      "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
      "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2, 3)}",
      "{'descr': '<f4', 'fortran_order': false, 'shape': (2, 3)}",
      "{'descr': '<f4', 'fortran_order': 'False', 'shape': (2, 3)}",
      S("(6)"),
      S("[2, 3]"),
      S("(2 3)"),
      S("(2,,3)"),
      S("(,)"),
      S("(2, 3"),
      S("6"),
      S("(2.0, 3)"),
      S("(+2, 3)"),
      S("(0x2, 3)"),
  };
  size_t i;
  (void)state;
  for (i = 0; i < sizeof dicts / sizeof dicts[0]; i++) expect_reject(dicts[i], 24, "malformed");
}

/* A NUL inside the header must not end the parse early (no C-string functions). */
static void test_reject_nul_in_header(void **state) {
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, S("(2, 3)"), 24);
  (void)state;
  buf[10 + strlen(S("(2, 3)")) + 1] = '\0';
  expect_reject_buf(buf, n, 1 << 20, "malformed");
}

static void test_reject_dims(void **state) {
  (void)state;
  expect_reject(S("(-1,)"), 0, "negative");
  expect_reject(S("(2, -3)"), 0, "negative");
  expect_reject(S("(99999999999999999999,)"), 0, "overflow");
  expect_reject(S("(9223372036854775808,)"), 0, "overflow");
  expect_reject(S("(9223372036854775807,)"), 0, "overflow"); /* bytes overflow */
  expect_reject(S("(4294967296, 4294967296, 4294967296)"), 0, "overflow");
  expect_reject(S("(3037000500, 3037000500)"), 0, "overflow");
  expect_reject(S("(1, 1, 1, 1, 1, 1, 1, 1, 1)"), 4, "dimensions");
  expect_reject(S("(0, 99999999999999999999)"), 0, "overflow");
}

/* A zero dimension makes the array empty; as in numpy, the other dimensions must still
 * have a product that fits. */
static void test_zero_dim(void **state) {
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, S("(1000000, 0, 1000000)"), 0);
  npy_array a;
  (void)state;
  expect_parse(buf, n, &a);
  assert_int_equal(a.count, 0);
  assert_int_equal(a.shape[2], 1000000);
  npy_free(&a);
  expect_reject(S("(9223372036854775807, 0, 4294967296)"), 0, "overflow");
}

static void test_reject_sizes(void **state) {
  unsigned char buf[1024];
  char err[ERRLEN];
  npy_array a;
  size_t n = make_npy(buf, sizeof buf, 1, D("<f4"), 24);
  (void)state;
  assert_int_equal(npy_parse(buf, n - 4, 1 << 20, &a, err, sizeof err), -1);
  assert_string_equal(err, "truncated: header says 24 bytes of data, file has 20");
  expect_reject_buf(buf, n - 24, 1 << 20, "truncated");
  expect_reject(D("<f4"), 25, "trailing");
  expect_reject(S("()"), 8, "trailing");
  expect_reject_buf(buf, n, 23, "oversized");
  expect_reject(S("(1000000000, 1000000000)"), 0, "oversized");
  assert_int_equal(npy_parse(buf, n, 24, &a, err, sizeof err), 0); /* exactly at the cap */
  npy_free(&a);
}

/* ------------------------------------------------------------------------- */
/* Conversions                                                                */
/* ------------------------------------------------------------------------- */

static npy_array make_array(npy_type type, void *data, size_t count) {
  npy_array a;
  memset(&a, 0, sizeof a);
  a.type = type;
  a.ndim = 1;
  a.shape[0] = (int64_t)count;
  a.count = count;
  a.data = data;
  return a;
}

static uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* Known binary16 encodings against their exact values. */
static void test_f16_bits(void **state) {
  uint16_t h[] = {0x3c00, 0xc000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff,
                  0x3555, 0x7c00, 0xfc00, 0x0000, 0x8000, 0x7e00, 0xfe01};
  const float want[] = {1.0f,     -2.0f,    0x1p-24f,    -0x1p-24f, 1023 * 0x1p-24f,
                        0x1p-14f, 65504.0f, 0x1.554p-2f, INFINITY,  -INFINITY,
                        0.0f,     -0.0f};
  npy_array a = make_array(NPY_F16, h, sizeof h / sizeof h[0]);
  char err[ERRLEN];
  float *f = npy_to_f32(&a, err, sizeof err);
  size_t i;
  (void)state;
  assert_non_null(f);
  for (i = 0; i < sizeof want / sizeof want[0]; i++)
    assert_int_equal(float_bits(f[i]), float_bits(want[i])); /* bits: -0.0, inf */
  assert_true(isnan(f[12]) && !signbit(f[12]));
  assert_true(isnan(f[13]) && signbit(f[13]));
  assert_int_equal(float_bits(f[13]), 0xffc02000u); /* payload kept */
  free(f);
}

static void test_f64_to_f32(void **state) {
  double d[] = {0.1,       -1e-300, (double)FLT_MAX, 0x1.fffffe8p127, -0x1.fffffefp127, INFINITY,
                -INFINITY, NAN};
  double bad[] = {0x1.ffffffp127, -0x1.ffffffp127, 1e300, -DBL_MAX};
  npy_array a = make_array(NPY_F64, d, sizeof d / sizeof d[0]);
  char err[ERRLEN];
  float *f = npy_to_f32(&a, err, sizeof err);
  size_t i;
  (void)state;
  assert_non_null(f);
  assert_true(f[0] == 0.1f);
  assert_int_equal(float_bits(f[1]), 0x80000000u); /* underflows to -0 */
  assert_true(f[2] == FLT_MAX && f[3] == FLT_MAX && f[4] == -FLT_MAX);
  assert_true(isinf(f[5]) && f[5] > 0 && isinf(f[6]) && f[6] < 0 && isnan(f[7]));
  free(f);
  for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    a = make_array(NPY_F64, &bad[i], 1);
    assert_null(npy_to_f32(&a, err, sizeof err));
    assert_has(err, "range");
  }
}

static void test_i64_to_i32(void **state) {
  int64_t ok[] = {0, -1, INT32_MAX, INT32_MIN, 123456789};
  int64_t bad[] = {(int64_t)INT32_MAX + 1, (int64_t)INT32_MIN - 1, INT64_MAX, INT64_MIN};
  npy_array a = make_array(NPY_I64, ok, 5);
  char err[ERRLEN];
  int32_t *v = npy_to_i32(&a, err, sizeof err);
  size_t i;
  (void)state;
  assert_non_null(v);
  for (i = 0; i < 5; i++) assert_int_equal(v[i], (int32_t)ok[i]);
  free(v);
  for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int64_t row[3] = {1, 2, 3};
    row[1] = bad[i];
    a = make_array(NPY_I64, row, 3);
    assert_null(npy_to_i32(&a, err, sizeof err));
    assert_has(err, "out of int32 range");
    assert_has(err, "index 1");
  }
}

static void test_conversion_type_checks(void **state) {
  int32_t i = 1;
  float f = 1.0f;
  npy_array a = make_array(NPY_I32, &i, 1);
  char err[ERRLEN];
  int32_t *v;
  (void)state;
  assert_null(npy_to_f32(&a, err, sizeof err));
  assert_has(err, "integer");
  a.type = NPY_I64;
  assert_null(npy_to_f32(&a, err, sizeof err));
  assert_has(err, "int64");
  a = make_array(NPY_F32, &f, 1);
  assert_null(npy_to_i32(&a, err, sizeof err));
  assert_has(err, "float32");
  assert_null(npy_to_f32(NULL, err, sizeof err));
  a.data = NULL;
  assert_null(npy_to_i32(&a, err, sizeof err));
  a.count = 0; /* an empty array needs no data, and the result is still non-NULL */
  a.type = NPY_I32;
  v = npy_to_i32(&a, err, sizeof err);
  assert_non_null(v);
  free(v);
}

/* ------------------------------------------------------------------------- */
/* Files, writer validation, misc                                             */
/* ------------------------------------------------------------------------- */

static void test_read_file_errors(void **state) {
  char path[256], err[ERRLEN];
  unsigned char buf[1024];
  size_t n = make_npy(buf, sizeof buf, 1, D("<f4"), 24);
  npy_array a;
  (void)state;
  assert_int_equal(npy_read_file("/nonexistent/dir/x.npy", 100, &a, err, sizeof err), -1);
  assert_has(err, "cannot open");
  temp_path(path, sizeof path);
  write_whole(path, buf, n - 4);
  assert_int_equal(npy_read_file(path, 1 << 20, &a, err, sizeof err), -1);
  assert_has(err, "truncated: header says 24 bytes of data, file has 20");
  assert_has(err, path);
  write_whole(path, buf, n);
  assert_int_equal(npy_read_file(path, 23, &a, err, sizeof err), -1);
  assert_has(err, "oversized");
  assert_int_equal(npy_read_file(path, 0, &a, err, sizeof err), -1);
  assert_has(err, "oversized");
  assert_int_equal(npy_read_file(path, 24, &a, err, sizeof err), 0);
  npy_free(&a);
  write_whole(path, buf, 3);
  assert_int_equal(npy_read_file(path, 24, &a, err, sizeof err), -1);
  assert_has(err, "truncated");
  write_whole(path, (const unsigned char *)"hello world, not numpy", 22);
  assert_int_equal(npy_read_file(path, 24, &a, err, sizeof err), -1);
  assert_has(err, "magic");
  write_whole(path, buf, 0);
  assert_int_equal(npy_read_file(path, 24, &a, err, sizeof err), -1);
  assert_has(err, "truncated");
  remove(path);
}

/* Too much data must be refused without reading it all: a file far over the cap. */
static void test_read_file_large_trailing(void **state) {
  char path[256], err[ERRLEN];
  static unsigned char buf[300000];
  npy_array a;
  (void)state;
  make_npy(buf, sizeof buf, 1, D("<f4"), 0);
  temp_path(path, sizeof path);
  write_whole(path, buf, sizeof buf);
  assert_int_equal(npy_read_file(path, 1000, &a, err, sizeof err), -1);
  assert_has(err, "oversized");
  assert_int_equal(npy_read_file(path, 1 << 20, &a, err, sizeof err), -1);
  assert_has(err, "trailing");
  remove(path);
}

static void test_write_validation(void **state) {
  static const int64_t neg[2] = {2, -1}, big[3] = {INT64_MAX, 2, 2}, nine[9] = {1};
  static const float x = 1.0f;
  char path[256], err[ERRLEN];
  FILE *f;
  (void)state;
  temp_path(path, sizeof path);
  remove(path);
  assert_int_equal(npy_write_file(path, NPY_F32, 2, neg, &x, err, sizeof err), -1);
  assert_has(err, "negative");
  assert_int_equal(npy_write_file(path, NPY_F32, 3, big, &x, err, sizeof err), -1);
  assert_has(err, "overflow");
  assert_int_equal(npy_write_file(path, NPY_F32, 9, nine, &x, err, sizeof err), -1);
  assert_has(err, "ndim");
  assert_int_equal(npy_write_file(path, NPY_F32, 1, NULL, &x, err, sizeof err), -1);
  assert_int_equal(npy_write_file(path, NPY_F32, 0, NULL, NULL, err, sizeof err), -1);
  assert_has(err, "NULL data");
  assert_int_equal(npy_write_file(path, (npy_type)42, 0, NULL, &x, err, sizeof err), -1);
  assert_has(err, "npy_type");
  f = fopen(path, "rb"); /* invalid arguments must not create the file */
  assert_null(f);
  assert_int_equal(npy_write_file("/nonexistent/dir/x.npy", NPY_F32, 0, NULL, &x, err, sizeof err),
                   -1);
  assert_has(err, "cannot create");
}

/* An I/O error that only shows at fclose (buffered data, full disk) is reported. */
static void test_write_io_error(void **state) {
  static const int64_t s[1] = {4096};
  static float data[4096];
  char err[ERRLEN];
  FILE *probe = fopen("/dev/full", "wb");
  (void)state;
  if (!probe) skip(); /* not Linux */
  fclose(probe);
  assert_int_equal(npy_write_file("/dev/full", NPY_F32, 1, s, data, err, sizeof err), -1);
  assert_has(err, "writing '/dev/full' failed");
}

static void test_empty_write_null_data(void **state) {
  static const int64_t s[2] = {4, 0};
  char path[256], err[ERRLEN];
  npy_array a;
  (void)state;
  temp_path(path, sizeof path);
  assert_int_equal(npy_write_file(path, NPY_I32, 2, s, NULL, err, sizeof err), 0);
  assert_int_equal(npy_read_file(path, 0, &a, err, sizeof err), 0);
  assert_shape(&a, NPY_I32, 2, s, 0);
  npy_free(&a);
  remove(path);
}

static void test_free_and_names(void **state) {
  npy_array a;
  char err[ERRLEN];
  (void)state;
  npy_free(NULL);
  memset(&a, 0, sizeof a);
  npy_free(&a);
  expect_parse(NP_F32, sizeof NP_F32, &a);
  npy_free(&a);
  assert_null(a.data);
  npy_free(&a); /* twice is safe */
  assert_int_equal(npy_parse(NULL, 0, 100, &a, err, sizeof err), -1);
  assert_int_equal(npy_parse(NULL, 10, 100, &a, err, sizeof err), -1);
  assert_int_equal(npy_parse(NP_F32, sizeof NP_F32, 1 << 20, NULL, NULL, 0), -1);
  assert_string_equal(npy_type_name(NPY_F32), "float32");
  assert_string_equal(npy_type_name(NPY_F64), "float64");
  assert_string_equal(npy_type_name(NPY_F16), "float16");
  assert_string_equal(npy_type_name(NPY_I32), "int32");
  assert_string_equal(npy_type_name(NPY_I64), "int64");
  assert_string_equal(npy_type_name((npy_type)99), "unknown");
}

/* A tiny err buffer is truncated, not overflowed. */
static void test_small_err_buffer(void **state) {
  char err[8];
  npy_array a;
  (void)state;
  memset(err, 'x', sizeof err);
  assert_int_equal(npy_parse("nope", 4, 100, &a, err, 5), -1);
  assert_int_equal(err[4], '\0');
  assert_int_equal(err[5], 'x');
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_roundtrip_f32),
      cmocka_unit_test(test_roundtrip_i32),
      cmocka_unit_test(test_roundtrip_other_types),
      cmocka_unit_test(test_writer_header_text),
      cmocka_unit_test(test_numpy_each_type),
      cmocka_unit_test(test_numpy_v2_v3),
      cmocka_unit_test(test_numpy_scalar_and_empty),
      cmocka_unit_test(test_header_variants),
      cmocka_unit_test(test_unaligned_header_and_1d),
      cmocka_unit_test(test_reject_prefix),
      cmocka_unit_test(test_reject_header_beyond_file),
      cmocka_unit_test(test_reject_descr),
      cmocka_unit_test(test_reject_fortran),
      cmocka_unit_test(test_reject_malformed),
      cmocka_unit_test(test_reject_nul_in_header),
      cmocka_unit_test(test_reject_dims),
      cmocka_unit_test(test_zero_dim),
      cmocka_unit_test(test_reject_sizes),
      cmocka_unit_test(test_f16_bits),
      cmocka_unit_test(test_f64_to_f32),
      cmocka_unit_test(test_i64_to_i32),
      cmocka_unit_test(test_conversion_type_checks),
      cmocka_unit_test(test_read_file_errors),
      cmocka_unit_test(test_read_file_large_trailing),
      cmocka_unit_test(test_write_validation),
      cmocka_unit_test(test_write_io_error),
      cmocka_unit_test(test_empty_write_null_data),
      cmocka_unit_test(test_free_and_names),
      cmocka_unit_test(test_small_err_buffer),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
