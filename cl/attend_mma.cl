/* Tensor-core flash attention (NVIDIA, mma.sync through inline PTX: cl/warp_ops.cl): the
 * compressed (MODE 0), window (1) and selected (2) branches of cl/attend.cl, with the same
 * rows and key sets (cl/attend_setup.cl), for q, k, v all f16 or all bf16 (MMA_DT) and
 * f32 accumulation. The host (src/attend_mma.c) takes this path only where a probe kernel
 * passed on the device, and otherwise runs cl/attend.cl.
 *
 * Warps. A work-group is NW warps of 32. A warp computes a 16-row tile, S = Q K^T, with
 * mma.m16n8k16: 16 rows x 8 keys x 16 dims per instruction.
 *  - MODE 0/1: warp w owns rows 16 MT w .. 16 MT (w + 1) - 1 of the group's ROWS = 16 NW MT
 *    rows: MT m-tiles of 16 rows, which share each K/V fragment the warp reads (MT = 2
 *    halves the local-memory reads per mma, and the tile loads per row). The group
 *    walks the union of its rows' keys; each K/V tile is staged in local memory once
 *    (coalesced 16-byte loads, f32 split there into bf16 hi/lo) and every warp reads its
 *    fragments from it (STAGE). Without the staging every warp fetched every tile itself:
 *    on an H200 the compressed branch then moved ~7 TB/s through L2, its limit.
 *  - MODE 2: the group has 16 rows (one token's heads, or TPG tokens), and the warps split
 *    its key set: warp w takes key tiles w, w + NW, ... Each keeps its own softmax state;
 *    the partial outputs are merged in local memory at the end (flash-decoding style).
 *  - MODE 3 (selected, kv-block-major; src/selected_kvm.c, for small G): the group owns one
 *    block of one kv head and a chunk of the tokens that selected it (cl/select_mask.cl),
 *    in passes of ROWS rows laid out as in MODE 0/1, and walks the block's keys with staged
 *    tiles, which the first pass stages and the others reuse where local memory holds the
 *    whole block (KVM_RES; H100, G = 1, 2: forward 2.5-5.7 % faster). Each row's result
 *    over that one block (output normalised by its own sum, and its lse) goes to the row's
 *    partial slot, the position of the block in the token's block_indices row;
 *    cl/selected_merge.cl then merges a row's slots. A launch covers the tokens b TQ + t in
 *    [r0, r1) (src/selected_kvm.c bounds the partials' bytes by passes over the tokens):
 *    a chunk lists only those, and partial rows are numbered from r0. With G = 1 a MODE 2
 *    tile packs 16 tokens whose block lists barely overlap, so each token reads its 16
 *    blocks' K/V nearly alone and 15 of 16 rows of each mma are masked; here every K/V
 *    block is read once per chunk and every mma row is a real (token, head).
 *
 * MODE 2 uses no local memory in the main loop (a token's blocks serve its 16 rows only):
 * every operand is read straight from global memory into the register layout of an mma
 * fragment, in 16-byte loads. The staged tiles of MODE 0/1 keep the same layout, so the
 * fragment reads are the same 16-byte units from local memory:
 *  - K: lane (gid, tig) loads k[key gid][32c + 8tig .. 32c + 8tig + 7]; its words 2s and
 *    2s+1 are the B fragment (b0, b1) of k-step s of chunk c. That numbers the 16 dims of
 *    a k-step in a permuted order; Q is loaded with the same permutation (q[row][32c + 8tig
 *    ..], words 2s/2s+1 of rows gid and gid+8 are a0..a3), and a dot product does not care
 *    about the order of its terms.
 *  - V: P V contracts over keys, so its B fragment needs two keys per register, which are
 *    not adjacent in memory. Lane (gid, tig) loads v[key gid][32c + 8tig ..] (8 keys x 32
 *    dims per warp, 16 bytes a lane); word j of that is, over the warp, an 8x8 matrix
 *    (keys x dims 32c + 8(col/2) + 2j + col%2), and movmatrix.trans turns it into b0 (keys
 *    0-7) or b1 (keys 8-15). The accumulator then holds, for lane (gid, tig), the dims
 *    32c + 8tig + 2j + {0, 1} of rows gid and gid+8: eight consecutive dims per chunk.
 *    Staged tiles (MODE 0/1/3) give V by ldmatrix.trans instead (VLDM): one instruction
 *    reads four 8x8 matrices (keys x 8 dims) of the tile as the B fragments of two n-tiles,
 *    in natural dim order (n-tile n holds dims 8n + 2tig + {0, 1}): 16 keys x 32 dims take
 *    2 instructions where the 16-byte reads and movmatrix took 2 + 8 (H100, G = 16, 64k:
 *    compressed attention 7.80 -> 6.61 ms with 16-bit k_cmp; dense at 8k 6.44 -> 5.88).
 *  - P: the f32 scores tile is already laid out as A fragments of P V (registers of key
 *    pairs 2tig, 2tig+1); rounding to MMA_DT packs them (FlashAttention-2's trick).
 *  - f32 K or V with bf16 q (the compressed branch of the whole forward keeps k_cmp and
 *    v_cmp in f32): each K value x is split into hi = bf16(x) and lo = bf16(x - hi), and
 *    both terms go through the tensor cores; hi + lo carries 16 bits of x's mantissa, so
 *    q.k, hence lse, keeps f32-level accuracy (q is exact in bf16). V enters as hi alone:
 *    P is rounded to bf16 anyway, and V's rounding adds an error of the same size
 *    (bf16-level output, measured ~2e-3 relative against 2e-2 allowed) for a third fewer
 *    instructions than splitting it too (V_SPLIT=1).
 * Masked keys (past the key set, or not in the row's set) score -inf; loads of keys past
 * the set read zeros, so no masked V row reaches an accumulator.
 *
 * WGMMA = 1 (MODE 0/1 on Hopper; cl/wgmma_ops.cl): the group is NW/4 warpgroups of 64
 * rows (warp w keeps rows 16w .. 16w + 15, MT = 1), and the tensor cores read the staged
 * tiles themselves: S = Q K^T is one m64nKT wgmma per 16 dims (two with the f32 split),
 * O += P V DV/WG_N_V per 16 keys, so no lane loads or transposes a B fragment. The tiles
 * are then laid out in core matrices (8 keys x 8 dims, 128 contiguous bytes: SWZ), q
 * is loaded in its natural dim order (a0 = q[gid][16s + 2tig ..], ...), and S and the
 * accumulators hold columns in the mma C layout (dims 8n + 2tig + {0, 1} of n-tile n).
 *
 * Softmax state per row is in log2 units (scores times scale * log2(e)); the row max is
 * reduced over the 4 lanes of a row (shfl.bfly 1, 2); row sums stay per lane until the end.
 */
#ifndef NW
#define NW 4 /* warps per group */
#endif
#ifndef KT
#define KT 32 /* keys per step: a multiple of 16 */
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
#ifndef VEARLY
#define VEARLY 0 /* 1: a tile's V loads are issued with its K loads, before S = Q K^T */
#endif
#ifndef V_SPLIT /* f32 V: 1 multiplies hi and lo terms, 0 the hi (bf16-rounded) term only */
#define V_SPLIT 0
#endif
#define V_LO (V_DT == 0 && V_SPLIT)
#ifndef MT /* MODE 0/1: 16-row m-tiles per warp; 2 halves the staged-tile reads per mma */
#define MT 1
#endif
#define RH (2 * MT) /* rows per lane: gid + 8 x */
#ifndef TOK_LOCAL /* 1: rows' tokens and heads stay in local memory, not in registers */
#define TOK_LOCAL (MODE == 1 || MODE == 3)
#endif
#ifndef STAGE /* 1: the group stages each K/V tile in local memory once for all its warps */
#define STAGE (MODE != 2)
#endif
#ifndef Q_DT
#define Q_DT MMA_DT
#endif
#ifndef K_DT
#define K_DT MMA_DT
#endif
#ifndef V_DT
#define V_DT MMA_DT
#endif
#ifndef O_DT
#define O_DT 0
#endif
#ifndef WGMMA
#define WGMMA 0
#endif
/* staged V fragments by ldmatrix.trans (the mma.sync staged modes; WGMMA reads its tiles
 * itself, MODE 2 has none staged) */
#define VLDM (STAGE && !WGMMA)
#ifndef STAGE_BATCH /* 1: a staged tile's loads all issued before its first store (MODE 0/1/3) */
#define STAGE_BATCH (MODE != 2 && !V_LO)
#endif

#if WG != 32 * NW || KT % 16 || DK % 32 || DV % 32
#error "attend_mma.cl: WG = 32 NW, KT a multiple of 16, DK and DV multiples of 32"
#endif
#if (MODE == 2 && (ROWS != 16 || MT != 1)) || (MODE != 2 && ROWS != 16 * NW * MT)
#error "attend_mma.cl: ROWS is 16 (MODE 2) or 16 NW MT (MODE 0/1)"
#endif
#if (K_DT != MMA_DT && (K_DT != 0 || MMA_DT != 2)) || (V_DT != MMA_DT && (V_DT != 0 || MMA_DT != 2))
#error "attend_mma.cl: k and v are MMA_DT, or f32 (split into two bf16 terms) with bf16 q"
#endif
#if STAGE && MODE == 2
#error "attend_mma.cl: STAGE is for MODE 0/1, whose warps walk the same keys"
#endif
#if MT > 1 && !STAGE
#error "attend_mma.cl: MT > 1 reads staged tiles"
#endif
#if WARP_EMULATE && NW != 1
#error "attend_mma.cl: the warp emulation runs one warp per group"
#endif
#if STAGE_BATCH && (MODE == 2 || V_LO)
#error "attend_mma.cl: STAGE_BATCH is for the staged modes without V_SPLIT"
#endif
#if WGMMA && (!STAGE_BATCH || MODE > 1 || MT != 1 || (!WARP_EMULATE && NW % 4) || KT != WG_N_S || DV % WG_N_V || V_LO)
#error "attend_mma.cl: WGMMA is MODE 0/1, one m-tile a warp, whole warpgroups, KT = WG_N_S"
#endif

#define DKC (DK / 32) /* 32-dim chunks of a q/k row */
#define DVC (DV / 32)
#define NT (KT / 8)   /* 8-key column tiles of S */
#define KSTEPS (KT / 16)
#define OLD (DV + 4) /* row stride of the merge buffer (MODE 2) */
/* Staged K/V tiles: row j of MMA_DT words at 16-byte unit j * ld. A quarter-warp reads
 * units 4c + tig (tig 0-3) of rows 2i and 2i + 1; where rows span a multiple of 128 bytes
 * (8 units) an odd row keeps its units at u ^ 4, so those 8 reads hit 8 distinct bank
 * groups (other rows already alternate: DK is a multiple of 32, ld of 4). */
#define KLD8 (DK / 8)
#define VLD8 (DV / 8)
/* Unit i of a staged tile of ld 16-byte units a row: row j, unit u. Rows first where the
 * tiles are core matrices (WGMMA), so that 8 consecutive work-items store 8 consecutive
 * units (one core matrix: no bank conflicts); else units first (coalesced rows). */
#if WGMMA
#define STAGE_JU(ld) const int j = ((i >> 3) / (ld)) * 8 + (i & 7), u = (i >> 3) % (ld)
#else
#define STAGE_JU(ld) const int j = i / (ld), u = i - j * (ld)
#endif
/* w[it] = units lid + it WG of the tile's rows k0 .. k0 + KT - 1 of tensor t (ld units a
 * row), every load issued before any is used (STAGE_BATCH) */
#define STAGE_LOADS(w, DT, t, ld)                                                       \
  _Pragma("unroll") for (int it = 0; it < (KT * (ld) + WG - 1) / WG; it++) {            \
    const int i = min(lid + it * WG, KT * (ld) - 1);                                    \
    STAGE_JU(ld);                                                                       \
    const long at = TIDX(t, grp.b, key_row(min(k0 + j, khi - 1), grp.krow0, list), h); \
    w[it] = LOAD8(DT, t, at + 8 * u, true);                                             \
  }
#if WGMMA /* core matrices: unit u of row j in the 8-row group j / 8 (cl/wgmma_ops.cl) */
#define SWZ(ld, j, u) ((((j) >> 3) * (ld) + (u)) * 8 + ((j) & 7))
#else
#define SWZ(ld, j, u) ((j) * (ld) + ((ld) % 8 == 0 ? (u) ^ (((j) & 1) << 2) : (u)))
#endif
/* Staged V rows with VLDM: ldmatrix reads unit u of 8 consecutive rows at once, so the
 * rows are padded by one unit (an odd stride: the 8 reads fall in 8 distinct bank groups),
 * which keeps a lane's addresses for successive u a constant apart (a swizzle by XOR
 * would need one per u: 16 more registers). The host reserves the pad (src/attend.c). */
#if VLDM
#define VROW (VLD8 + 1)
#define SWZV(ld, j, u) ((j) * ((ld) + 1) + (u))
#else /* WGMMA's core matrices, or MODE 2 (nothing staged) */
#define VROW VLD8
#define SWZV(ld, j, u) SWZ(ld, j, u)
#endif
/* The staged K words of this lane's B fragments, 8-key tile nt, 32-dim chunk c. */
#if K_DT == 0
#define KW_STAGED(x, nt, c)                                     \
  ((x).hi = ktile[SWZ(KLD8, 8 * (nt) + gid, 4 * (c) + tig)],    \
   (x).lo = ktile_lo[SWZ(KLD8, 8 * (nt) + gid, 4 * (c) + tig)])
#else
#define KW_STAGED(x, nt, c) ((x).hi = ktile[SWZ(KLD8, 8 * (nt) + gid, 4 * (c) + tig)])
#endif
/* MODE 3 with KVM_RES tiles: the block's K/V stay staged from the first pass on (its keys
 * are the same in every pass), KVM_RES tiles of KT keys side by side; else one tile,
 * staged again for every tile of every pass. */
#if MODE == 3 && defined(KVM_RES) && KVM_RES > 0
#define RES_TILES KVM_RES
#else
#define RES_TILES 1
#endif

#define U4(v, j) ((j) == 0 ? (v).x : (j) == 1 ? (v).y : (j) == 2 ? (v).z : (v).w)
/* 8 elements (16 bytes) at element index i of a 16-bit tensor; i is a multiple of 8. */
#define LD8(p, i) (*(__global const uint4 *)((p) + (i)))

/* 8 elements at element index i (a multiple of 4 when f32) as MMA_DT pairs: hi holds
 * them rounded, lo (f32 only) what rounding left, so that hi + lo is x to 16 bits. */
typedef struct pairs8 {
  uint4 hi;
#if K_DT == 0 || V_DT == 0
  uint4 lo;
#endif
} pairs8;

#if K_DT == 0 || V_DT == 0
inline float bf16_up(uint w, int upper) { return as_float(upper ? w & 0xffff0000u : w << 16); }
inline uint split_lo(float a, float b, uint hi) {
  return pack2(a - bf16_up(hi, 0), b - bf16_up(hi, 1));
}
inline pairs8 load8_f32(__global const float *p, long i, bool ok) {
  pairs8 r;
  const float4 x0 = ok ? *(__global const float4 *)(p + i) : (float4)(0.0f);
  const float4 x1 = ok ? *(__global const float4 *)(p + i + 4) : (float4)(0.0f);
  r.hi = (uint4)(pack2(x0.x, x0.y), pack2(x0.z, x0.w), pack2(x1.x, x1.y), pack2(x1.z, x1.w));
  r.lo = (uint4)(split_lo(x0.x, x0.y, r.hi.x), split_lo(x0.z, x0.w, r.hi.y),
                 split_lo(x1.x, x1.y, r.hi.z), split_lo(x1.z, x1.w, r.hi.w));
  return r;
}
#endif
inline pairs8 load8_16(__global const ushort *p, long i, bool ok) {
  pairs8 r;
  r.hi = ok ? LD8(p, i) : (uint4)(0u);
#if K_DT == 0 || V_DT == 0
  r.lo = (uint4)(0u);
#endif
  return r;
}
#define LOAD8(DT, p, i, ok) CAT(LOAD8_, DT)(p, i, ok)
#define LOAD8_0(p, i, ok) load8_f32(p, i, ok)
#define LOAD8_1(p, i, ok) load8_16(p, i, ok)
#define LOAD8_2(p, i, ok) load8_16(p, i, ok)

__kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void attend_mma_fwd(
    CTENSOR(Q_DT, q), CTENSOR(K_DT, k), CTENSOR(V_DT, v), CITENSOR(bi), TENSOR(O_DT, o),
    TENSOR(0, lse), SEQ_ARGS, float scale, int W, int S, int tiles
#if MODE == 3
    , __global const uint *mask, long mask_off, int NCH, __global const int *sel, long offsets_off,
    long slot_row_off, long slot_word_off, long r0, long r1
#endif
) {
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
#elif MODE == 3
  __local int list[LCAP], tslot[LCAP];
  __local uint words[WG], msk[1];
#else
  __local int list[1];
  __local uint msk[1];
#endif
#if STAGE
  __local uint4 kst[RES_TILES * KT * KLD8] __attribute__((aligned(128)));
  __local uint4 vst[RES_TILES * KT * VROW] __attribute__((aligned(128)));
#if K_DT == 0
  __local uint4 kst_lo[RES_TILES * KT * KLD8] __attribute__((aligned(128)));
#endif
#if V_LO
  __local uint4 vst_lo[RES_TILES * KT * VROW] __attribute__((aligned(16)));
#endif
#endif
  WARP_SCRATCH(wx);
  const attend_rows rows = {rtok, rhq, rlo, rhi};
#if MODE == 3
  const kvm_chunk kc = kvm_setup(mask, mask_off, NCH, sel, offsets_off, slot_row_off, slot_word_off,
                                 TPASS(bi), S, SEQ_PASS, r0, r1, words, list, tslot);
  if (kc.ntok < 0) return; /* past the last chunk: the whole group */
  const int h = kc.h;
#else
  const int h = get_group_id(1);
#endif
  const int G = HQ / H, lid = get_local_id(0);
  const int lane = lid & 31, warp = lid >> 5, gid = lane >> 2, tig = lane & 3;
  attend_group grp;
#if MODE == 3
  (void)W, (void)tiles;
  /* passes of ROWS rows over the chunk's rows; the block's K/V tiles are staged in the
   * first and kept (KVM_RES), or staged again in each */
  for (int pass = 0; pass < (kc.ntok * G + ROWS - 1) / ROWS; pass++) {
  kvm_rows(kc, pass, G, list, &grp, rows);
#elif MODE == 2 && TPG > 1
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

  /* This lane's RH rows, and the keys its warp walks: [klo, khi), tiles of KT. */
  const int rbase = MODE == 2 ? 0 : 16 * MT * warp;
  int lo[RH], hi[RH];
#if TOK_LOCAL /* a row's token and head read from local memory where needed */
#define ROW_TOK(rh) rows.tok[rbase + gid + 8 * (rh)]
#define ROW_HQ(rh) rows.hq[rbase + gid + 8 * (rh)]
#else
  int tok[RH], hq[RH];
#define ROW_TOK(rh) tok[rh]
#define ROW_HQ(rh) hq[rh]
#endif
  for (int rh = 0; rh < RH; rh++) {
    const int r = rbase + gid + 8 * rh;
#if !TOK_LOCAL
    tok[rh] = rows.tok[r], hq[rh] = rows.hq[r];
#endif
    lo[rh] = rows.lo[r], hi[rh] = rows.hi[r];
  }
#if MODE == 2
  const int khi = grp.hi, kfirst = warp * KT, kstep = NW * KT;
#elif STAGE
  const int khi = grp.hi, kfirst = grp.lo, kstep = KT; /* uniform over the group */
#else
  int klo = grp.hi, khi = grp.lo;
  for (int r = rbase; r < rbase + 16 * MT; r++) {
    if (rows.tok[r] < 0) continue;
    klo = min(klo, rows.lo[r]);
    khi = max(khi, rows.hi[r]);
  }
  const int kfirst = klo, kstep = KT;
#endif

#if WGMMA /* A fragments of the 16-dim steps, dims in order */
  uint4 qa[DK / 16];
  {
    const long q0 = ROW_TOK(0) >= 0 ? TIDX(q, grp.b, ROW_TOK(0), ROW_HQ(0)) + 2 * tig : -1;
    const long q1 = ROW_TOK(1) >= 0 ? TIDX(q, grp.b, ROW_TOK(1), ROW_HQ(1)) + 2 * tig : -1;
#define QW(at, i) ((at) >= 0 ? *(__global const uint *)(q + (at) + (i)) : 0u)
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++)
      qa[ks] = (uint4)(QW(q0, 16 * ks), QW(q1, 16 * ks), QW(q0, 16 * ks + 8), QW(q1, 16 * ks + 8));
#undef QW
  }
#else
  uint4 qf[DKC][RH];
#pragma unroll
  for (int c = 0; c < DKC; c++) {
#pragma unroll
    for (int rh = 0; rh < RH; rh++)
      qf[c][rh] = ROW_TOK(rh) >= 0
                      ? LD8(q, TIDX(q, grp.b, ROW_TOK(rh), ROW_HQ(rh)) + 32 * c + 8 * tig)
                      : (uint4)(0u);
  }
#endif
  const float sl2 = scale * M_LOG2E_F;
  float m[RH], l[RH];
#pragma unroll
  for (int rh = 0; rh < RH; rh++) m[rh] = -INFINITY, l[rh] = 0.0f;
  float acc[MT][DVC * 4][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int n = 0; n < DVC * 4; n++)
      acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
  }

  for (int k0 = kfirst; k0 < khi; k0 += kstep) {
#if STAGE
#if RES_TILES > 1
    const int toff = (k0 - kfirst) / KT * KT; /* this tile's first staged row */
    const bool stage = pass == 0;             /* uniform over the group */
#else
    const int toff = 0;
    const bool stage = true;
#if !STAGE_BATCH
    LBARRIER(); /* the previous tile's readers are done */
#endif
#endif
    __local uint4 *const ktile = kst + toff * KLD8, *const vtile = vst + toff * VROW;
#if K_DT == 0
    __local uint4 *const ktile_lo = kst_lo + toff * KLD8;
#endif
#if V_LO
    __local uint4 *const vtile_lo = vst_lo + toff * VROW;
#endif
    if (stage) {
#if STAGE_BATCH
      /* every load of the tile in flight at once (rows clamped into the key set, so
       * each address is valid; keys past it zeroed after the load), then the stores */
      pairs8 kw[(KT * KLD8 + WG - 1) / WG], vw[(KT * VLD8 + WG - 1) / WG];
      STAGE_LOADS(kw, K_DT, k, KLD8);
      STAGE_LOADS(vw, V_DT, v, VLD8);
#if WGMMA /* the previous tile's O += P V ran behind these loads */
      wg_wait0();
      wg_hold(&acc[0][0][0], DV / 2);
#endif
#if RES_TILES == 1
      LBARRIER(); /* the previous tile's readers are done */
#endif
#pragma unroll
      for (int it = 0; it < (KT * KLD8 + WG - 1) / WG; it++) {
        const int i = lid + it * WG;
        STAGE_JU(KLD8);
        const bool in = k0 + j < khi;
        if (i < KT * KLD8) {
          ktile[SWZ(KLD8, j, u)] = in ? kw[it].hi : (uint4)(0u);
#if K_DT == 0
          ktile_lo[SWZ(KLD8, j, u)] = in ? kw[it].lo : (uint4)(0u);
#endif
        }
      }
#pragma unroll
      for (int it = 0; it < (KT * VLD8 + WG - 1) / WG; it++) {
        const int i = lid + it * WG;
        STAGE_JU(VLD8);
        const bool in = k0 + j < khi;
        if (i < KT * VLD8) vtile[SWZV(VLD8, j, u)] = in ? vw[it].hi : (uint4)(0u);
      }
#else
      for (int i = lid; i < KT * (DK / 8); i += WG) {
        STAGE_JU(DK / 8);
        const int kidx = k0 + j;
        const long at = TIDX(k, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h);
        const pairs8 w = LOAD8(K_DT, k, at + 8 * u, kidx < khi);
        ktile[SWZ(KLD8, j, u)] = w.hi;
#if K_DT == 0
        ktile_lo[SWZ(KLD8, j, u)] = w.lo;
#endif
      }
      for (int i = lid; i < KT * (DV / 8); i += WG) {
        STAGE_JU(DV / 8);
        const int kidx = k0 + j;
        const long at = TIDX(v, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h);
        const pairs8 w = LOAD8(V_DT, v, at + 8 * u, kidx < khi);
        vtile[SWZV(VLD8, j, u)] = w.hi;
#if V_LO
        vtile_lo[SWZV(VLD8, j, u)] = w.lo;
#endif
      }
#endif /* STAGE_BATCH */
#if WGMMA
      wg_proxy_fence(); /* the tensor cores read these tiles */
#endif
      LBARRIER();
    }
#endif
    /* V rows of the tile: keys k0 + 16 ks + gid (lo) and + 8 (hi) */
#if VEARLY && !STAGE
    pairs8 vlo[KSTEPS][DVC], vhi[KSTEPS][DVC];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
      const int klo8 = k0 + 16 * ks + gid, khi8 = klo8 + 8;
      const long atl = TIDX(v, grp.b, key_row(min(klo8, khi - 1), grp.krow0, list), h) + 8 * tig;
      const long ath = TIDX(v, grp.b, key_row(min(khi8, khi - 1), grp.krow0, list), h) + 8 * tig;
#pragma unroll
      for (int c = 0; c < DVC; c++) {
        vlo[ks][c] = LOAD8(V_DT, v, atl + 32 * c, klo8 < khi);
        vhi[ks][c] = LOAD8(V_DT, v, ath + 32 * c, khi8 < khi);
      }
    }
#endif
    /* S = Q K^T for keys k0 .. k0 + KT - 1 */
    float s[MT][NT][4];
#if WGMMA
#pragma unroll
    for (int nt = 0; nt < NT; nt++) s[0][nt][0] = s[0][nt][1] = s[0][nt][2] = s[0][nt][3] = 0.0f;
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < DK / 16; ks++) {
      wg_mma_k(&s[0][0][0], qa[ks], ktile + 16 * ks, 8, 8 * KLD8, wx);
#if K_DT == 0
      wg_mma_k(&s[0][0][0], qa[ks], ktile_lo + 16 * ks, 8, 8 * KLD8, wx);
#endif
    }
    wg_commit();
    wg_wait0();
    wg_hold(&s[0][0][0], NT * 4);
#else
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      /* a tile's K words loaded together, for more loads in flight; with MT = 2 (staged)
       * a chunk's words at a time, as the registers are short */
      pairs8 kwa[MT > 1 ? 1 : DKC];
#if STAGE
#if MT == 1
#pragma unroll
      for (int c = 0; c < DKC; c++) {
        KW_STAGED(kwa[c], nt, c);
      }
#endif
#else
      const int kidx = k0 + 8 * nt + gid;
      const long at = TIDX(k, grp.b, key_row(min(kidx, khi - 1), grp.krow0, list), h) + 8 * tig;
#pragma unroll
      for (int c = 0; c < DKC; c++) kwa[c] = LOAD8(K_DT, k, at + 32 * c, kidx < khi);
#endif
#pragma unroll
      for (int mt = 0; mt < MT; mt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < DKC; c++) {
#if MT > 1
        pairs8 kw;
        KW_STAGED(kw, nt, c);
#else
        const pairs8 kw = kwa[c];
#endif
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          float *st = s[mt][nt];
          const uint4 a = qf[c][2 * mt], b = qf[c][2 * mt + 1], w = kw.hi;
          mma_16816(st, a.x, b.x, a.y, b.y, w.x, w.y, wx);
          mma_16816(st, a.z, b.z, a.w, b.w, w.z, w.w, wx);
#if K_DT == 0
          const uint4 e = kw.lo;
          mma_16816(st, a.x, b.x, a.y, b.y, e.x, e.y, wx);
          mma_16816(st, a.z, b.z, a.w, b.w, e.z, e.w, wx);
#endif
        }
      }
    }
#endif /* WGMMA */
    /* mask, scale, row maxima over the tile */
    float mx[RH], alpha[RH];
#pragma unroll
    for (int rh = 0; rh < RH; rh++) mx[rh] = -INFINITY;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int rh = 2 * mt + (i >> 1), kidx = k0 + 8 * nt + 2 * tig + (i & 1);
          const bool in = key_visible(kidx, khi, lo[rh], hi[rh], list, msk);
          s[mt][nt][i] = in ? s[mt][nt][i] * sl2 : -INFINITY;
          mx[rh] = fmax(mx[rh], s[mt][nt][i]);
        }
      }
    }
#pragma unroll
    for (int rh = 0; rh < RH; rh++) {
      mx[rh] = fmax(mx[rh], shfl_xor(mx[rh], 1, wx));
      mx[rh] = fmax(mx[rh], shfl_xor(mx[rh], 2, wx));
      const float mn = fmax(m[rh], mx[rh]);
      alpha[rh] = mn == -INFINITY ? 1.0f : exp2(m[rh] - mn);
      m[rh] = mn;
      l[rh] *= alpha[rh];
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int rh = 2 * mt + (i >> 1);
          s[mt][nt][i] = m[rh] == -INFINITY ? 0.0f : exp2(s[mt][nt][i] - m[rh]);
          l[rh] += s[mt][nt][i];
        }
      }
#pragma unroll
      for (int n = 0; n < DVC * 4; n++) {
        acc[mt][n][0] *= alpha[2 * mt], acc[mt][n][1] *= alpha[2 * mt];
        acc[mt][n][2] *= alpha[2 * mt + 1], acc[mt][n][3] *= alpha[2 * mt + 1];
      }
    }
    /* O += P V, 16 keys per step; each V fragment serves the warp's MT m-tiles */
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ks++) {
      uint a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        a[mt][0] = pack2(s[mt][2 * ks][0], s[mt][2 * ks][1]);
        a[mt][1] = pack2(s[mt][2 * ks][2], s[mt][2 * ks][3]);
        a[mt][2] = pack2(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
        a[mt][3] = pack2(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
      }
#if WGMMA
      if (ks == 0) wg_fence(); /* after the rescale of acc */
#pragma unroll
      for (int n0 = 0; n0 < DV; n0 += WG_N_V)
        wg_mma_t(&acc[0][n0 / 8][0], (uint4)(a[0][0], a[0][1], a[0][2], a[0][3]),
                 vtile + 16 * ks * VLD8 + n0, 8 * VLD8, 8, wx);
      if (ks == KSTEPS - 1) wg_commit(); /* waited for behind the next tile's loads */
#elif VLDM
      /* n-tiles 2p, 2p + 1 (dims 16p .. 16p + 15 in order) from one ldmatrix: lane 8i + r
       * points at key 16 ks + 8 (i & 1) + r, dims 16p + 8 (i >> 1) .. + 7 */
      const int vrow = 16 * ks + 8 * ((lane >> 3) & 1) + (lane & 7);
#pragma unroll
      for (int p = 0; p < DV / 16; p++) {
        const int vu = 2 * p + (lane >> 4);
        const uint4 b = ldmatrix_x4_t(vtile + SWZV(VLD8, vrow, vu), wx);
#if V_LO
        const uint4 e = ldmatrix_x4_t(vtile_lo + SWZV(VLD8, vrow, vu), wx);
#endif
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_16816(acc[mt][2 * p], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b.x, b.y, wx);
          mma_16816(acc[mt][2 * p + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b.z, b.w, wx);
#if V_LO
          mma_16816(acc[mt][2 * p], a[mt][0], a[mt][1], a[mt][2], a[mt][3], e.x, e.y, wx);
          mma_16816(acc[mt][2 * p + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], e.z, e.w, wx);
#endif
        }
      }
#else /* MODE 2: V from global memory, through movmatrix */
#if !VEARLY
      const int klo8 = k0 + 16 * ks + gid, khi8 = klo8 + 8;
      const long atl = TIDX(v, grp.b, key_row(min(klo8, khi - 1), grp.krow0, list), h) + 8 * tig;
      const long ath = TIDX(v, grp.b, key_row(min(khi8, khi - 1), grp.krow0, list), h) + 8 * tig;
#endif
#pragma unroll
      for (int c = 0; c < DVC; c++) {
#if VEARLY
        const pairs8 vl = vlo[ks][c], vh = vhi[ks][c];
#else
        const pairs8 vl = LOAD8(V_DT, v, atl + 32 * c, klo8 < khi);
        const pairs8 vh = LOAD8(V_DT, v, ath + 32 * c, khi8 < khi);
#endif
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const uint b0 = movmatrix_t(U4(vl.hi, j), wx), b1 = movmatrix_t(U4(vh.hi, j), wx);
#pragma unroll
          for (int mt = 0; mt < MT; mt++)
            mma_16816(acc[mt][4 * c + j], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1, wx);
#if V_LO
          const uint e0 = movmatrix_t(U4(vl.lo, j), wx), e1 = movmatrix_t(U4(vh.lo, j), wx);
#pragma unroll
          for (int mt = 0; mt < MT; mt++)
            mma_16816(acc[mt][4 * c + j], a[mt][0], a[mt][1], a[mt][2], a[mt][3], e0, e1, wx);
#endif
        }
      }
#endif /* WGMMA */
    }
  }
#if WGMMA
  wg_wait0();
  wg_hold(&acc[0][0][0], DV / 2);
#endif
#pragma unroll
  for (int rh = 0; rh < RH; rh++) {
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
    for (int j = 0; j < 4; j++) {
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int r = gid + 8 * (i >> 1), d = 32 * c + 8 * tig + 2 * j + (i & 1);
        part_o[(warp * 16 + r) * OLD + d] = acc[0][4 * c + j][i] * wgt[i >> 1];
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

#else /* MODE 0/1/3: each warp writes its own rows (MODE 3: into the row's partial slot) */
#if MODE == 3 /* partial rows (token b TQ + t, head) numbered from the pass's first token */
#define ROW_SLOT(rh) tslot[(pass * ROWS + rbase + gid + 8 * (rh)) / G]
#define OUT_ROW(t, hq) (o_off + (((long)grp.b * TQ + (t) - r0) * HQ + (hq)) * o_s2)
#define LSE_ROW(t, hq) (lse_off + (((long)grp.b * TQ + (t) - r0) * HQ + (hq)) * lse_s2)
#else
#define ROW_SLOT(rh) 0
#define OUT_ROW(t, hq) TIDX(o, grp.b, t, hq)
#define LSE_ROW(t, hq) TIDX(lse, grp.b, t, hq)
#endif
#pragma unroll
  for (int rh = 0; rh < RH; rh++) {
    if (ROW_TOK(rh) < 0) continue;
    const float inv = l[rh] > 0.0f ? 1.0f / l[rh] : 0.0f;
    const long base = OUT_ROW(ROW_TOK(rh), ROW_HQ(rh)) + (long)ROW_SLOT(rh) * DV;
#pragma unroll
    for (int c = 0; c < DVC; c++) {
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const float *e = acc[rh >> 1][4 * c + j] + 2 * (rh & 1);
        /* dims of n-tile 4c + j: 8 (4c + j) + 2tig with WGMMA or VLDM, else the permuted
         * order (movmatrix of 16-byte row reads) */
        const int d = WGMMA || VLDM ? 32 * c + 8 * j + 2 * tig : 32 * c + 8 * tig + 2 * j;
        STORE(O_DT, o, base + d, e[0] * inv);
        STORE(O_DT, o, base + d + 1, e[1] * inv);
      }
    }
#if HAS_LSE
    if (tig == 0)
      lse[LSE_ROW(ROW_TOK(rh), ROW_HQ(rh)) + ROW_SLOT(rh)] =
          l[rh] > 0.0f ? (m[rh] + log2(l[rh])) * M_LN2_F : -INFINITY;
#endif
  }
#if !HAS_LSE
  (void)lse, (void)lse_off, (void)lse_s0, (void)lse_s1, (void)lse_s2;
#endif
#endif
#if MODE == 3
  LBARRIER(); /* the pass's rows and staged tiles consumed before the next pass */
  }
#endif
}
