"""A float64 NumPy implementation of the NSA forward and backward, written from the
semantics (docs/SEMANTICS.md, from shared/nsa-semantics.md) as a second reference,
independent of the C host reference in tests/reference.c and of the kernels.

    res = nsa_forward(q, k, v, g_cmp=..., block_size=64, block_count=16, ...)
    res.o              [B, TQ, HQ, DV] float64
    res.block_indices  [B, TQ, H, S] int64: the blocks used (top-k, or the given ones)
    res.importance     [B, TQ, H, NBmax] float64: top-k importance of each candidate
                       c < IC(p) of the query's own sequence, NaN elsewhere

    grads = nsa_backward(q, k, v, do, <the same keyword arguments>)
    grads.dq, grads.dk, grads.dv          shapes of q, k, v, float64
    grads.dg_cmp, grads.dg_slc, grads.dg_swa   [B, TQ, HQ] for each gate given, else None

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


@dataclass
class NSAGrads:
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dg_cmp: object  # np.ndarray [B,TQ,HQ], or None when the gate is not given
    dg_slc: object
    dg_swa: object


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


# ---------------------------------------------------------------------------------------
# Backward (semantics section 7), written by hand: the gradient of each attention branch,
# the gates as dg = sum_d do * o_branch, the compressed branch back through mean pooling.
# The block indices are constants (those the forward used).
# ---------------------------------------------------------------------------------------
def _attend_bwd(q, k, v, do, scale):
    """o = softmax(scale q k^T) v for q [HQ,DK], keys k [n,HQ,DK], values v [n,HQ,DV],
    and its gradients given do [HQ,DV]: (o, dq [HQ,DK], dk [n,HQ,DK], dv [n,HQ,DV])."""
    n = k.shape[0]
    if n == 0:
        return (np.zeros((q.shape[0], v.shape[-1])), np.zeros_like(q), np.zeros_like(k),
                np.zeros_like(v))
    s = scale * np.einsum("hd,nhd->hn", q, k)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    o = np.einsum("hn,nhd->hd", p, v)
    dp = np.einsum("he,nhe->hn", do, v)                        # dP = dO V^T
    ds = p * (dp - np.sum(do * o, axis=1, keepdims=True))      # dS = P (dP - rowsum(dO O))
    dq = scale * np.einsum("hn,nhd->hd", ds, k)                # dq = scale dS K
    dk = scale * np.einsum("hn,hd->nhd", ds, q)                # dk = scale dS^T Q
    dv = np.einsum("hn,he->nhe", p, do)                        # dv = P^T dO
    return o, dq, dk, dv


def _sequence_bwd(q, k, v, do, gates, idx, BS, W, scale, G):
    """One sequence with TQ = TK: q [T,HQ,DK], k [T,H,DK], v [T,H,DV], do [T,HQ,DV],
    gates as in _sequence, idx [T,H,S] the blocks the forward used. Returns
    (dq, dk, dv, [dg_cmp, dg_slc, dg_swa] each [T,HQ] or None)."""
    T, HQ, DK = q.shape
    H, DV = k.shape[1], v.shape[-1]
    NB = -(-T // BS)
    k_cmp = np.stack([k[c * BS:(c + 1) * BS].mean(axis=0) for c in range(NB)]) if NB else k[:0]
    v_cmp = np.stack([v[c * BS:(c + 1) * BS].mean(axis=0) for c in range(NB)]) if NB else v[:0]
    kq, vq = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    kcq, vcq = np.repeat(k_cmp, G, axis=1), np.repeat(v_cmp, G, axis=1)
    g_cmp, g_slc, g_swa = gates
    # Gradients per query head (kq/vq layout); folded onto kv heads at the end.
    dq = np.zeros_like(q)
    dkq, dvq = np.zeros((T, HQ, DK)), np.zeros((T, HQ, DV))
    dkc, dvc = np.zeros((NB, HQ, DK)), np.zeros((NB, HQ, DV))
    dg = [None if g is None else np.zeros((T, HQ)) for g in gates]

    def branch(i, heads, gate, keys, vals, slot):
        """Backward of one branch for query i and these heads (gate None: weight 1): adds
        to dq, sets dg[slot] when that gate is given, returns dk, dv of its keys [n,heads,D]."""
        w = 1.0 if gate is None else gate[i, heads][:, None]
        o_b, dq_b, dk_b, dv_b = _attend_bwd(q[i, heads], keys, vals, w * do[i, heads], scale)
        dq[i, heads] += dq_b
        if dg[slot] is not None:
            dg[slot][i, heads] = np.sum(do[i, heads] * o_b, axis=-1)
        return dk_b, dv_b

    allh = slice(0, HQ)
    for i in range(T):
        nc, ic = (i + 1) // BS, i // BS
        # Selected branch, per kv head: the listed blocks' tokens j <= i, each once.
        for h in range(H):
            blocks = sorted({int(c) for c in idx[i, h] if 0 <= c <= ic})
            keys = [j for c in blocks for j in range(c * BS, min((c + 1) * BS, i + 1))]
            heads = slice(h * G, (h + 1) * G)
            dk_b, dv_b = branch(i, heads, g_slc, kq[keys, heads], vq[keys, heads], 1)
            dkq[keys, heads] += dk_b
            dvq[keys, heads] += dv_b
        # Compressed branch (only with g_cmp): the complete past blocks c < NC.
        if g_cmp is not None:
            dk_b, dv_b = branch(i, allh, g_cmp, kcq[:nc], vcq[:nc], 0)
            dkc[:nc] += dk_b
            dvc[:nc] += dv_b
        # Window branch (only with W > 0 and g_swa; else dg_swa stays 0): i-W < j <= i.
        if W > 0 and g_swa is not None:
            lo = max(0, i - W + 1)
            dk_b, dv_b = branch(i, allh, g_swa, kq[lo:i + 1], vq[lo:i + 1], 2)
            dkq[lo:i + 1] += dk_b
            dvq[lo:i + 1] += dv_b
    # Query head hq read kv head hq // G: sum the G heads of each group.
    dk = dkq.reshape(T, H, G, DK).sum(axis=2)
    dv = dvq.reshape(T, H, G, DV).sum(axis=2)
    dk_cmp = dkc.reshape(NB, H, G, DK).sum(axis=2)
    dv_cmp = dvc.reshape(NB, H, G, DV).sum(axis=2)
    # Mean pooling: each token of block c receives d*_cmp[c] / len(c).
    for c in range(NB):
        n = min((c + 1) * BS, T) - c * BS
        dk[c * BS:c * BS + n] += dk_cmp[c] / n
        dv[c * BS:c * BS + n] += dv_cmp[c] / n
    return dq, dk, dv, dg


def nsa_backward(q, k, v, do, *, g_cmp=None, g_slc=None, g_swa=None, block_indices=None,
                 block_counts=None, block_size=64, block_count=16, window=0, scale=None,
                 cu_seqlens=None, cu_seqlens_k=None):
    """Gradients of L = sum(do * o) for the forward nsa_forward computes with the same
    arguments; block indices are those it uses (given, or top-k), held constant.
    Needs TQ = TK for every sequence (no backward otherwise)."""
    fwd = nsa_forward(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa,
                      block_indices=block_indices, block_counts=block_counts,
                      block_size=block_size, block_count=block_count, window=window,
                      scale=scale, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    q, k, v, do = (np.asarray(x, dtype=np.float64) for x in (q, k, v, do))
    B, TQ, HQ, DK = q.shape
    _, TK, H, _ = k.shape
    G = HQ // H
    scale = 1.0 / np.sqrt(DK) if not scale else float(scale)
    gates = [None if g is None else np.asarray(g, dtype=np.float64) for g in (g_cmp, g_slc, g_swa)]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dg = [None if g is None else np.zeros((B, TQ, HQ)) for g in gates]
    for b, q0, q1, k0, k1 in _segments(B, TQ, TK, cu_seqlens, cu_seqlens_k):
        if q1 - q0 != k1 - k0:
            raise ValueError("backward needs TQ = TK for every sequence")
        rows = slice(q0, q1)
        seg_dq, seg_dk, seg_dv, seg_dg = _sequence_bwd(
            q[b, rows], k[b, k0:k1], v[b, k0:k1], do[b, rows],
            [None if g is None else g[b, rows] for g in gates], fwd.block_indices[b, rows],
            block_size, window, scale, G)
        dq[b, rows], dk[b, k0:k1], dv[b, k0:k1] = seg_dq, seg_dk, seg_dv
        for x, seg in zip(dg, seg_dg):
            if x is not None:
                x[b, rows] = seg
    return NSAGrads(dq, dk, dv, *dg)
