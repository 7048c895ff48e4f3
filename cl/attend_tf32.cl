/* Tensor-core flash attention for f32 q, k and v in TF32 (NVIDIA, mma.m16n8k8 with .tf32
 * operands through inline PTX: cl/warp_ops.cl), the path CLNSA_FLAG_TF32 allows: the
 * compressed (MODE 0), window (1) and selected (2) branches of cl/attend.cl, with the same
 * rows and key sets (cl/attend_setup.cl), arguments and outputs (o, lse f32). Every
 * operand (q, k, v and the softmax weights P) is rounded to tf32 (10-bit mantissa,
 * cvt.rna); products are exact and sums f32. The host (src/attend.c) takes this path only
 * with the flag and a tensor-core path on the context; otherwise f32 runs cl/attend.cl.
 *
 * Warps and tiles as in cl/attend_mma.cl: a warp computes a 16-row tile.
 *  - MODE 0/1: warp w owns rows 16w .. 16w+15 of the group's ROWS = 16 NW rows; each K/V
 *    tile of KT keys is staged in local memory once for all warps (coalesced 16-byte
 *    loads, rounded to tf32 there, once per group).
 *  - MODE 2: the group has 16 rows (a token's heads, or TPG tokens) and its warps split the
 *    key set (tiles w, w + NW, ...); fragments come straight from global memory (no other
 *    warp reads them), and the warps' softmax states are merged at the end.
 *
 * Fragments (16 rows x 8 keys x 8 dims per instruction; layouts in cl/warp_ops.cl). Every
 * operand a lane needs is one 16-byte unit of a row:
 *  - S = Q K^T. For each 16-dim chunk c, lane (gid, tig) holds q[row gid][16c + 4tig ..
 *    + 3] and the same of row gid + 8, and reads k[key gid][16c + 4tig .. + 3]. Elements 2j
 *    and 2j + 1 of those units are k-indices tig and tig + 4 of k-step j (j = 0, 1): Q and
 *    K number the dims of a k-step in the same permuted order, and a dot product does not
 *    care about the order of its terms.
 *  - P V. Numbering the keys of an 8-key tile so that k-index tig is key 2tig and tig + 4
 *    is key 2tig + 1, the C fragment of S is already the A fragment of P V: a0..a3 = c0,
 *    c2, c1, c3. The B fragment then needs v[key 2tig][dim] (b0) and v[key 2tig + 1][dim]
 *    (b1) at the dim of output column gid. With column gid of n-tile 4m + n standing for
 *    dim 32m + 4gid + n, one 16-byte unit of each key, v[key][32m + 4gid .. + 3], holds in
 *    element n the B fragment of n-tile 4m + n. Its accumulator acc[4m + n] then holds,
 *    for rows gid and gid + 8, dims 32m + 8tig + n (c0, c2) and 32m + 8tig + 4 + n (c1, c3).
 * Masked keys score -inf; loads of keys past the set read zeros, so no masked V row
 * reaches an accumulator. Softmax state per row in log2 units, as in cl/attend_mma.cl.
 */
#ifndef NW
#define NW 4 /* warps per group */
#endif
#ifndef KT
#define KT 32 /* keys per step: a multiple of 8 */
#endif
#ifndef DK
#define DK 128
#endif
#ifndef DV
#define DV 128
#endif
#ifndef HAS_LSE
#define HAS_LSE 1
#endif
#ifndef Q_DT
#define Q_DT 0
#endif
#ifndef K_DT
#define K_DT 0
#endif
#ifndef V_DT
#define V_DT 0
#endif
#ifndef O_DT
#define O_DT 0
#endif
#define STAGE (MODE != 2) /* K/V tiles in local memory, shared by the group's warps */

#if Q_DT != 0 || K_DT != 0 || V_DT != 0
#error "attend_tf32.cl: q, k and v are f32"
#endif
#if WG != 32 * NW || KT % 8 || DK % 16 || DV % 32
#error "attend_tf32.cl: WG = 32 NW, KT a multiple of 8, DK of 16, DV of 32"
#endif
#if (MODE == 2 && ROWS != 16) || (MODE != 2 && ROWS != 16 * NW)
#error "attend_tf32.cl: ROWS is 16 (MODE 2) or 16 NW (MODE 0/1)"
#endif
#if WARP_EMULATE && NW != 1
#error "attend_tf32.cl: the warp emulation runs one warp per group"
#endif

#define DKC (DK / 16) /* 16-dim chunks of a q/k row: one 16-byte unit per lane */
#define DVC (DV / 32) /* 32-dim chunks of a v row: four 8-column n-tiles */
#define NT (KT / 8)   /* 8-key tiles of S, each one k-step of P V */
#define OLD (DV + 4)  /* row stride of the merge buffer (MODE 2) */
/* Row strides of the staged tiles in 16-byte units. The 8 lanes of a quarter-warp read
 * from K rows gid = 0, 1 four consecutive units (distinct banks when a row is 16 words
 * long mod 32), from V rows 2tig = 0, 2, 4, 6 units gid = 0, 1 (when it is 4 mod 32). */
#define KLD4 ((DK + 16 - DK % 32) / 4)
#define VLD4 ((DV + 4) / 4)

#define U4(v, j) ((j) == 0 ? (v).x : (j) == 1 ? (v).y : (j) == 2 ? (v).z : (v).w)

inline uint4 tf32x4(float4 x) {
  return (uint4)(tf32_round(x.x), tf32_round(x.y), tf32_round(x.z), tf32_round(x.w));
}

/* 4 floats at element index i (a multiple of 4) rounded to tf32; zeros unless ok. */
inline uint4 load4_tf32(__global const float *p, long i, bool ok) {
  return ok ? tf32x4(*(__global const float4 *)(p + i)) : (uint4)(0u);
}

/* Grid, arguments and outputs: those of attend_fwd (cl/attend.cl). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void attend_tf32_fwd(
    CTENSOR(0, q), CTENSOR(0, k), CTENSOR(0, v), CITENSOR(bi), TENSOR(O_DT, o), TENSOR(0, lse),
    SEQ_ARGS, float scale, int W, int S, int tiles) {
  __local int rtok[ROWS], rhq[ROWS], rlo[ROWS], rhi[ROWS];
#if MODE == 2
  __local float part_m[NW * 16], part_l[NW * 16];
  __local float part_o[NW * 16 * OLD] __attribute__((aligned(16)));
#endif
#if MODE == 2 && TPG > 1
  __local int list[UCAP];
  __local uint msk[UCAP];
#if 2 * UCAP <= NW * 16 * OLD /* the union's scratch lives in the merge buffer until then */
  __local int *cand = (__local int *)part_o;
  __local uint *tmpm = (__local uint *)(part_o + UCAP);
#else
  __local int cand[UCAP];
  __local uint tmpm[UCAP];
#endif
#elif MODE == 2
  __local int list[MAX_S], tmp[MAX_S];
  __local uint msk[1];
#else
  __local int list[1];
  __local uint msk[1];
#endif
#if STAGE
  __local uint4 kst[KT * KLD4], vst[KT * VLD4];
#endif
  WARP_SCRATCH(wx);
  const attend_rows rows = {rtok, rhq, rlo, rhi};
  const int h = get_group_id(1), G = HQ / H, lid = get_local_id(0);
  const int lane = lid & 31, warp = lid >> 5, gid = lane >> 2, tig = lane & 3;
  attend_group grp;
#if MODE == 2 && TPG > 1
  (void)W, (void)B;
  attend_seq sq; /* no early return past the sequence: idle groups run with no tokens */
  const int t0 = selected_tile(cu, nseq, TQ, TK, tiles, &sq);
  setup_selected_multi(sq, t0, G, h, TPASS(bi), S, &grp, rows, list, msk, cand, tmpm);
#elif MODE == 2
  (void)W;
  setup_selected(cu, nseq, B, TQ, TK, G, h, tiles, TPASS(bi), S, &grp, rows, list, tmp);
#else
  (void)S, (void)NB, (void)bi, (void)bi_off, (void)bi_s0, (void)bi_s1, (void)bi_s2;
  if (!setup_dense(cu, nseq, TQ, TK, G, h, W, tiles, &grp, rows)) return;
#endif
  LBARRIER();

  /* This lane's two rows, and the keys its warp walks: from kfirst in steps of kstep. */
  const int rbase = MODE == 2 ? 0 : 16 * warp;
  int tok[2], hq[2], lo[2], hi[2];
  for (int rh = 0; rh < 2; rh++) {
    const int r = rbase + gid + 8 * rh;
    tok[rh] = rows.tok[r], hq[rh] = rows.hq[r], lo[rh] = rows.lo[r], hi[rh] = rows.hi[r];
  }
  const int khi = grp.hi;
#if MODE == 2
  const int kfirst = warp * KT, kstep = NW * KT;
#else
  const int kfirst = grp.lo, kstep = KT; /* uniform over the group */
#endif

  uint4 qf[DKC][2];
#pragma unroll
  for (int c = 0; c < DKC; c++) {
#pragma unroll
    for (int rh = 0; rh < 2; rh++)
      qf[c][rh] =
          load4_tf32(q, TIDX(q, grp.b, max(tok[rh], 0), hq[rh]) + 16 * c + 4 * tig, tok[rh] >= 0);
  }
  const float sl2 = scale * M_LOG2E_F;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float acc[DVC * 4][4];
#pragma unroll
  for (int n = 0; n < DVC * 4; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int k0 = kfirst; k0 < khi; k0 += kstep) {
#if STAGE
    LBARRIER(); /* the previous tile's readers are done */
    for (int i = lid; i < KT * (DK / 4); i += WG) {
      const int j = i / (DK / 4), u = i - j * (DK / 4), kidx = k0 + j;
      const long at = TIDX(k, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h);
      kst[j * KLD4 + u] = load4_tf32(k, at + 4 * u, kidx < khi);
    }
    for (int i = lid; i < KT * (DV / 4); i += WG) {
      const int j = i / (DV / 4), u = i - j * (DV / 4), kidx = k0 + j;
      const long at = TIDX(v, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h);
      vst[j * VLD4 + u] = load4_tf32(v, at + 4 * u, kidx < khi);
    }
    LBARRIER();
#endif
    /* S = Q K^T for keys k0 .. k0 + KT - 1 */
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#if !STAGE
      const int kidx = k0 + 8 * nt + gid;
      const long at = TIDX(k, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h) + 4 * tig;
#endif
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < DKC; c++) {
#if STAGE
        const uint4 w = kst[(8 * nt + gid) * KLD4 + 4 * c + tig];
#else
        const uint4 w = load4_tf32(k, at + 16 * c, kidx < khi);
#endif
        const uint4 a = qf[c][0], b = qf[c][1];
        mma_1688_tf32(s[nt], a.x, b.x, a.y, b.y, w.x, w.y, wx);
        mma_1688_tf32(s[nt], a.z, b.z, a.w, b.w, w.z, w.w, wx);
      }
    }
    /* mask, scale, row maxima over the tile */
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int rh = i >> 1, kidx = k0 + 8 * nt + 2 * tig + (i & 1);
        const bool in = key_visible(kidx, khi, lo[rh], hi[rh], list, msk);
        s[nt][i] = in ? s[nt][i] * sl2 : -INFINITY;
        mx[rh] = fmax(mx[rh], s[nt][i]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      mx[rh] = fmax(mx[rh], shfl_xor(mx[rh], 1, wx));
      mx[rh] = fmax(mx[rh], shfl_xor(mx[rh], 2, wx));
      const float mn = fmax(m[rh], mx[rh]);
      alpha[rh] = mn == -INFINITY ? 1.0f : exp2(m[rh] - mn);
      m[rh] = mn;
      l[rh] *= alpha[rh];
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int rh = i >> 1;
        s[nt][i] = m[rh] == -INFINITY ? 0.0f : exp2(s[nt][i] - m[rh]);
        l[rh] += s[nt][i];
      }
    }
#pragma unroll
    for (int n = 0; n < DVC * 4; n++) {
      acc[n][0] *= alpha[0], acc[n][1] *= alpha[0];
      acc[n][2] *= alpha[1], acc[n][3] *= alpha[1];
    }
    /* O += P V, 8 keys per step: keys 8nt + 2tig (b0) and 8nt + 2tig + 1 (b1) */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      const uint a0 = tf32_round(s[nt][0]), a1 = tf32_round(s[nt][2]);
      const uint a2 = tf32_round(s[nt][1]), a3 = tf32_round(s[nt][3]);
      const int kl = 8 * nt + 2 * tig;
#if !STAGE
      const int kidx = k0 + kl;
      const long atl = TIDX(v, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h) + 4 * gid;
      const long ath =
          TIDX(v, grp.b, key_row(min(kidx + 1, khi - 1), grp.krow0, list), h) + 4 * gid;
#endif
#pragma unroll
      for (int c = 0; c < DVC; c++) {
#if STAGE
        const uint4 vl = vst[kl * VLD4 + 8 * c + gid], vh = vst[(kl + 1) * VLD4 + 8 * c + gid];
#else
        const uint4 vl = load4_tf32(v, atl + 32 * c, kidx < khi);
        const uint4 vh = load4_tf32(v, ath + 32 * c, kidx + 1 < khi);
#endif
#pragma unroll
        for (int n = 0; n < 4; n++)
          mma_1688_tf32(acc[4 * c + n], a0, a1, a2, a3, U4(vl, n), U4(vh, n), wx);
      }
    }
  }
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    l[rh] += shfl_xor(l[rh], 1, wx);
    l[rh] += shfl_xor(l[rh], 2, wx);
  }

#if MODE == 2
  /* Merge the warps' partial softmax states: weight_w = exp2(m_w - M) / L. */
  if (tig == 0) {
    for (int rh = 0; rh < 2; rh++) {
      part_m[warp * 16 + gid + 8 * rh] = m[rh];
      part_l[warp * 16 + gid + 8 * rh] = l[rh];
    }
  }
  LBARRIER();
  float wgt[2];
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    const float2 ML = merged_state(part_m, part_l, gid + 8 * rh);
    wgt[rh] = ML.y > 0.0f && m[rh] != -INFINITY ? exp2(m[rh] - ML.x) / ML.y : 0.0f;
  }
#pragma unroll
  for (int c = 0; c < DVC; c++) {
#pragma unroll
    for (int e = 0; e < 8; e++) { /* dims 32c + 8tig + e: acc[4c + e % 4][e / 4 (+ 2)] */
#pragma unroll
      for (int rh = 0; rh < 2; rh++) {
        const int r = gid + 8 * rh, d = 32 * c + 8 * tig + e;
        part_o[(warp * 16 + r) * OLD + d] = acc[4 * c + (e & 3)][2 * rh + (e >> 2)] * wgt[rh];
      }
    }
  }
  LBARRIER();
  for (int e = lid; e < 16 * DV; e += WG) {
    const int r = e / DV, d = e - r * DV, t = rows.tok[r];
    float sum = 0.0f;
    for (int w = 0; w < NW; w++) sum += part_o[(w * 16 + r) * OLD + d];
    if (t >= 0) STORE(O_DT, o, TIDX(o, grp.b, t, rows.hq[r]) + d, sum);
  }
#if HAS_LSE
  for (int r = lid; r < 16; r += WG) {
    const int t = rows.tok[r];
    const float2 ML = merged_state(part_m, part_l, r);
    if (t >= 0)
      lse[TIDX(lse, grp.b, t, rows.hq[r])] =
          ML.y > 0.0f ? (ML.x + log2(ML.y)) * M_LN2_F : -INFINITY;
  }
#else
  (void)lse, (void)lse_off, (void)lse_s0, (void)lse_s1, (void)lse_s2;
#endif

#else /* MODE 0/1: each warp writes its own rows, 8 consecutive dims per lane and chunk */
#pragma unroll
  for (int rh = 0; rh < 2; rh++) {
    if (tok[rh] < 0) continue;
    const float inv = l[rh] > 0.0f ? 1.0f / l[rh] : 0.0f;
    const long base = TIDX(o, grp.b, tok[rh], hq[rh]);
#pragma unroll
    for (int c = 0; c < DVC; c++) {
#pragma unroll
      for (int e = 0; e < 8; e++)
        STORE(O_DT, o, base + 32 * c + 8 * tig + e, acc[4 * c + (e & 3)][2 * rh + (e >> 2)] * inv);
    }
#if HAS_LSE
    if (tig == 0)
      lse[TIDX(lse, grp.b, tok[rh], hq[rh])] =
          l[rh] > 0.0f ? (m[rh] + log2(l[rh])) * M_LN2_F : -INFINITY;
#endif
  }
#if !HAS_LSE
  (void)lse, (void)lse_off, (void)lse_s0, (void)lse_s1, (void)lse_s2;
#endif
#endif
}
