"""A float64 NumPy implementation of the NSA forward, written from the semantics
(docs/SEMANTICS.md, from shared/nsa-semantics.md) as a second reference, independent of
the C host reference in tests/reference.c and of the kernels.

    res = nsa_forward(q, k, v, g_cmp=..., block_size=64, block_count=16, ...)
    res.o              [B, TQ, HQ, DV] float64
    res.block_indices  [B, TQ, H, S] int64: the blocks used (top-k, or the given ones)
    res.importance     [B, TQ, H, NBmax] float64: top-k importance of each candidate
                       c < IC(p) of the query's own sequence, NaN elsewhere

Shapes: q [B,TQ,HQ,DK], k [B,TK,H,DK], v [B,TK,H,DV], gates [B,TQ,HQ]. With cu_seqlens
(B = 1) the token axis packs independent sequences; cu_seqlens_k gives the key offsets
when they differ from the queries'. Queries are the last TQ positions of their sequence.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class NSAResult:
    o: np.ndarray
    block_indices: np.ndarray
    importance: np.ndarray


def _segments(B, TQ, TK, cu_seqlens, cu_seqlens_k):
    """(batch, query rows, key rows) of each independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, TQ, 0, TK) for b in range(B)]
    if B != 1:
        raise ValueError("cu_seqlens needs B = 1")
    cq = [int(x) for x in cu_seqlens]
    ck = [int(x) for x in (cu_seqlens if cu_seqlens_k is None else cu_seqlens_k)]
    if len(cq) != len(ck) or cq[0] != 0 or ck[0] != 0 or cq[-1] != TQ or ck[-1] != TK:
        raise ValueError("cu_seqlens disagree with the shapes")
    segs = []
    for s in range(len(cq) - 1):
        if cq[s + 1] < cq[s] or ck[s + 1] < ck[s] or cq[s + 1] - cq[s] > ck[s + 1] - ck[s]:
            raise ValueError("cu_seqlens must be non-decreasing with TQ_s <= TK_s")
        segs.append((0, cq[s], cq[s + 1], ck[s], ck[s + 1]))
    return segs


def _attend(q, k, v, scale):
    """softmax(scale q k^T) v for q [HQ,D] against shared keys k [n,HQ,D]; zeros if n = 0.
    Returns (o [HQ,DV], probabilities [HQ,n])."""
    n = k.shape[0]
    if n == 0:
        return np.zeros((q.shape[0], v.shape[-1])), np.zeros((q.shape[0], 0))
    s = scale * np.einsum("hd,nhd->hn", q, k)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("hn,nhd->hd", p, v), p


def _select(ic, n, imp):
    """Top-k for one (query, kv head): forced IC, IC-1, 0 in that priority, then the highest
    importance (lower index on ties); n blocks in ascending order."""
    chosen = []
    for c in (ic, ic - 1, 0):
        if c >= 0 and c not in chosen and len(chosen) < n:
            chosen.append(c)
    rest = sorted((c for c in range(ic) if c not in chosen), key=lambda c: (-imp[c], c))
    chosen += rest[: n - len(chosen)]
    return sorted(chosen)


def _sequence(q, k, v, gates, given, counts, BS, S, W, scale, G):
    """One sequence: q [TQ,HQ,DK], k [TK,H,DK], v [TK,H,DV]; gates (g_cmp, g_slc, g_swa)
    [TQ,HQ] or None; given [TQ,H,S] or None; counts [TQ,H] or None."""
    TQ, HQ, _ = q.shape
    TK, H, _ = k.shape
    NB = -(-TK // BS)
    # 1. Mean pooling over each block's true length.
    k_cmp = np.stack([k[c * BS:(c + 1) * BS].mean(axis=0) for c in range(NB)]) if NB else k[:0]
    v_cmp = np.stack([v[c * BS:(c + 1) * BS].mean(axis=0) for c in range(NB)]) if NB else v[:0]
    # Head hq reads kv head hq // G.
    kq, vq = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    kcq, vcq = np.repeat(k_cmp, G, axis=1), np.repeat(v_cmp, G, axis=1)
    g_cmp, g_slc, g_swa = gates
    o = np.zeros((TQ, HQ, v.shape[-1]))
    idx = np.full((TQ, H, S), -1, dtype=np.int64)
    imp_out = np.full((TQ, H, max(NB, 1)), np.nan)
    for i in range(TQ):
        p = i + TK - TQ
        nc, ic = (p + 1) // BS, p // BS
        # 2. Compressed attention over the complete past blocks.
        o_cmp, prob = _attend(q[i], kcq[:nc], vcq[:nc], scale)
        # 3. Importance of each complete past block c < IC, summed over the group.
        imp = prob[:, :ic].reshape(H, G, ic).sum(axis=1)
        imp_out[i, :, :ic] = imp
        for h in range(H):
            if given is not None:
                idx[i, h] = given[i, h]
            else:
                n = S if counts is None else int(counts[i, h])
                if not 0 <= n <= S:
                    raise ValueError(f"block count {n} outside [0, {S}]")
                sel = _select(ic, min(n, ic + 1), imp[h])
                idx[i, h, :len(sel)] = sel
        # 4. Selected attention: tokens of the listed blocks 0 <= c <= IC, each once, j <= p.
        o_slc = np.zeros((HQ, v.shape[-1]))
        for h in range(H):
            blocks = sorted({int(c) for c in idx[i, h] if 0 <= c <= ic})
            keys = [j for c in blocks for j in range(c * BS, min((c + 1) * BS, p + 1, TK))]
            heads = slice(h * G, (h + 1) * G)
            o_slc[heads] = _attend(q[i, heads], kq[keys, heads], vq[keys, heads], scale)[0]
        # 6. Gated sum; 5. the window branch only with W > 0 and g_swa.
        o[i] = (g_slc[i][:, None] if g_slc is not None else 1.0) * o_slc
        if g_cmp is not None:
            o[i] += g_cmp[i][:, None] * o_cmp
        if W > 0 and g_swa is not None:
            lo = max(0, p - W + 1)
            o_swa = _attend(q[i], kq[lo:p + 1], vq[lo:p + 1], scale)[0]
            o[i] += g_swa[i][:, None] * o_swa
    return o, idx, imp_out


def nsa_forward(q, k, v, *, g_cmp=None, g_slc=None, g_swa=None, block_indices=None,
                block_counts=None, block_size=64, block_count=16, window=0, scale=None,
                cu_seqlens=None, cu_seqlens_k=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, TQ, HQ, DK = q.shape
    _, TK, H, _ = k.shape
    if HQ % H:
        raise ValueError("HQ must be a multiple of H")
    G = HQ // H
    S = block_indices.shape[-1] if block_indices is not None else block_count
    scale = 1.0 / np.sqrt(DK) if not scale else float(scale)
    gates = [None if g is None else np.asarray(g, dtype=np.float64) for g in (g_cmp, g_slc, g_swa)]
    NBmax = max(1, -(-TK // block_size))
    o = np.zeros((B, TQ, HQ, v.shape[-1]))
    idx = np.full((B, TQ, H, S), -1, dtype=np.int64)
    imp = np.full((B, TQ, H, NBmax), np.nan)
    for b, q0, q1, k0, k1 in _segments(B, TQ, TK, cu_seqlens, cu_seqlens_k):
        rows = slice(q0, q1)
        seg_gates = [None if g is None else g[b, rows] for g in gates]
        o[b, rows], idx[b, rows], seg_imp = _sequence(
            q[b, rows], k[b, k0:k1], v[b, k0:k1], seg_gates,
            None if block_indices is None else np.asarray(block_indices)[b, rows],
            None if block_counts is None else np.asarray(block_counts)[b, rows],
            block_size, S, window, scale, G)
        imp[b, rows, :, :seg_imp.shape[-1]] = seg_imp
    return NSAResult(o, idx, imp)
