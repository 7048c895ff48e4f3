/* Row vectors for the memory-bound kernels (cl/combine.cl, cl/grad_gates.cl,
 * cl/grad_finalize.cl; their programs are "rowvec.cl+<file>", after cl/common.cl).
 * A file of its own rather than part of cl/common.cl, which every program starts with:
 * a change there would invalidate every cached build, the slow emulated tensor-core
 * ones included. */

/* bf16 bits of x: the rounding of cl/common.cl's st_dt2 (nearest even; NaN stays a quiet
 * NaN), returned for a packed store. */
inline uint bf16_bits(float x) {
  const uint u = as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* Row vectors: W (1 or 4, a -D option of the kernel) consecutive elements of a row in
 * one load or store, as VFLOAT(W) (float or float4); four 16-bit values move as one
 * 8-byte word (little-endian devices), converted in registers. W = 4 needs an element
 * index that is a multiple of 4, which the host checks for every row of the tensor
 * (tensor_rows_vec): the word is then aligned to its size, which the plain vector
 * pointer access below assumes (vload4 would only assume element alignment). */
#define VFLOAT_1 float
#define VFLOAT_4 float4
#define VFLOAT(W) CAT(VFLOAT_, W)
#define ldv1_dt0 ld_dt0
#define ldv1_dt1 ld_dt1
#define ldv1_dt2 ld_dt2
#define stv1_dt0 st_dt0
#define stv1_dt1 st_dt1
#define stv1_dt2 st_dt2
inline float4 ldv4_dt0(__global const float *p, long i) {
  return *(__global const float4 *)(p + i);
}
inline float4 ldv4_dt1(__global const ushort *p, long i) {
  const uint2 w = *(__global const uint2 *)(p + i);
  return vload_half4(0, (__private const half *)&w);
}
inline float4 ldv4_dt2(__global const ushort *p, long i) {
  const uint2 w = *(__global const uint2 *)(p + i);
  return as_float4((uint4)(w.x << 16, w.x & 0xffff0000u, w.y << 16, w.y & 0xffff0000u));
}
inline void stv4_dt0(__global float *p, long i, float4 x) {
  *(__global float4 *)(p + i) = x;
}
inline void stv4_dt1(__global ushort *p, long i, float4 x) {
  uint2 w;
  vstore_half4_rte(x, 0, (__private half *)&w);
  *(__global uint2 *)(p + i) = w;
}
inline void stv4_dt2(__global ushort *p, long i, float4 x) {
  *(__global uint2 *)(p + i) =
      (uint2)(bf16_bits(x.x) | (bf16_bits(x.y) << 16), bf16_bits(x.z) | (bf16_bits(x.w) << 16));
}
#define LOADV(W, DT, p, i) CAT(CAT(ldv, W), CAT(_dt, DT))(p, i)
#define STOREV(W, DT, p, i, x) CAT(CAT(stv, W), CAT(_dt, DT))(p, i, x)
/* The W elements of a row vector summed in a fixed order. */
inline float vsum1(float x) {
  return x;
}
inline float vsum4(float4 x) {
  return (x.x + x.y) + (x.z + x.w);
}
#define VSUM(W, x) CAT(vsum, W)(x)

/* Row r = bt * H + h of a dense walk over [B*T, H] rows: bt into *bt (an int, as
 * locate_query takes it), h returned. Once per row, in 32 bits where r fits. */
inline int row_split(long r, int H, int *bt) {
  const int q = r <= INT_MAX ? (int)((uint)r / (uint)H) : (int)(r / H);
  *bt = q;
  return (int)(r - (long)q * H);
}
