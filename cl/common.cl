/* Shared by every clnsa kernel: prepended to each kernel file at build time.
 *
 * Storage types. A tensor's dtype reaches a kernel as -D<ROLE>_DT=n (0 f32, 1 f16,
 * 2 bf16; see include/clnsa.h). 16-bit values are kept as ushort words and converted
 * here, because NVIDIA's driver has no cl_khr_fp16: vload_half/vstore_half work without
 * it, and bf16 is the upper half of an f32. All arithmetic is f32.
 *
 * Tensors. Every tensor argument is (pointer, element offset, stride of dim 0, dim 1,
 * dim 2); the last dim is contiguous. TIDX(t, a, b, c) is the element index of t[a][b][c][0].
 *
 * Sequences. Every kernel receives SEQ_ARGS: the varlen table `cu` (NULL without varlen;
 * else cu_q[nseq+1], cu_k[nseq+1], cu_c[nseq+1] back to back) and the sizes. Query row r
 * in [0, B*TQ) and compressed row r in [0, B*NB) are located with the helpers below, so
 * kernels never care whether a batch is padded or packed.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define STORAGE_0 float
#define STORAGE_1 ushort
#define STORAGE_2 ushort
#define STORAGE(DT) CAT(STORAGE_, DT)

inline float ld_dt0(__global const float *p, long i) { return p[i]; }
inline float ld_dt1(__global const ushort *p, long i) {
  return vload_half((size_t)i, (__global const half *)p);
}
inline float ld_dt2(__global const ushort *p, long i) { return as_float((uint)p[i] << 16); }
#define LOAD(DT, p, i) CAT(ld_dt, DT)(p, i)

inline void st_dt0(__global float *p, long i, float x) { p[i] = x; }
inline void st_dt1(__global ushort *p, long i, float x) {
  vstore_half_rte(x, (size_t)i, (__global half *)p);
}
/* Round to nearest even; NaN stays a quiet NaN. */
inline void st_dt2(__global ushort *p, long i, float x) {
  uint u = as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = (ushort)((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = (ushort)(u >> 16);
}
#define STORE(DT, p, i, x) CAT(st_dt, DT)(p, i, x)

/* IEEE binary16 bits to float, exact for subnormals, infinities and NaN. */
inline float f16_bits(uint h) {
  const uint e = (h >> 10) & 0x1fu, m = h & 0x3ffu, s = (h & 0x8000u) << 16;
  if (e == 0x1fu) return as_float(s | 0x7f800000u | (m << 13));
  if (e == 0) return (s ? -0x1p-24f : 0x1p-24f) * (float)m;
  return as_float(s | ((e + 112u) << 23) | (m << 13));
}

#define TENSOR(DT, t) __global STORAGE(DT) *t, long t##_off, long t##_s0, long t##_s1, long t##_s2
#define CTENSOR(DT, t) \
  __global const STORAGE(DT) *t, long t##_off, long t##_s0, long t##_s1, long t##_s2
#define ITENSOR(t) __global int *t, long t##_off, long t##_s0, long t##_s1, long t##_s2
#define CITENSOR(t) __global const int *t, long t##_off, long t##_s0, long t##_s1, long t##_s2
#define TIDX(t, a, b, c) (t##_off + (long)(a) * t##_s0 + (long)(b) * t##_s1 + (long)(c) * t##_s2)

#define SEQ_ARGS \
  __global const int *cu, int nseq, int B, int TQ, int TK, int NB, int HQ, int H
#define SEQ_PASS cu, nseq, B, TQ, TK, NB, HQ, H

/* Largest s in [0, n) with a[s] <= x, for a non-decreasing a[0..n] (x < a[n]). */
inline int seq_search(__global const int *a, int n, int x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (a[mid] <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/* Where a query row lives. Keys of its sequence are rows kstart .. kstart+tk-1 of k (in
 * batch b); its compressed keys are rows cstart .. of k_cmp; p is its position. */
typedef struct qrow {
  int b, t;   /* batch and token index into q/o */
  int kstart, cstart, tk, p;
} qrow;

inline qrow locate_query(__global const int *cu, int nseq, int B, int TQ, int TK, int r) {
  qrow q;
  if (nseq == 0) {
    q.b = r / TQ;
    q.t = r - q.b * TQ;
    q.kstart = 0;
    q.cstart = 0;
    q.tk = TK;
    q.p = q.t + TK - TQ;
  } else {
    int s = seq_search(cu, nseq, r);
    __global const int *cuk = cu + nseq + 1, *cuc = cu + 2 * (nseq + 1);
    q.b = 0;
    q.t = r;
    q.kstart = cuk[s];
    q.cstart = cuc[s];
    q.tk = cuk[s + 1] - cuk[s];
    q.p = (r - cu[s]) + q.tk - (cu[s + 1] - cu[s]);
  }
  return q;
}

/* Where a compressed row lives: block c of the sequence whose keys start at kstart. */
typedef struct crow {
  int b, c, kstart, tk;
} crow;

inline crow locate_block(__global const int *cu, int nseq, int NB, int TK, int r) {
  crow q;
  if (nseq == 0) {
    q.b = r / NB;
    q.c = r - q.b * NB;
    q.kstart = 0;
    q.tk = TK;
  } else {
    __global const int *cuk = cu + nseq + 1, *cuc = cu + 2 * (nseq + 1);
    int s = seq_search(cuc, nseq, r);
    q.b = 0;
    q.c = r - cuc[s];
    q.kstart = cuk[s];
    q.tk = cuk[s + 1] - cuk[s];
  }
  return q;
}
