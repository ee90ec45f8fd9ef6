"""Causal attention of one block of queries against one block of keys, by global position, with the
log-sum-exp: the building block of context-parallel (ring) attention and of packed sequences.

Legend: b batch, n query heads, g kv heads (n a multiple of g), s_q / s_k block lengths, d head dim.
    q_bnsd [b, n, s_q, d] holds the queries at global positions q_start .. q_start + s_q − 1
    k_bgsd, v_bgsd [b, g, s_k, d] hold the keys at global positions k_start .. k_start + s_k − 1
    cu_seqlens_bt [b, t] int64: each sample's document boundaries in global positions, 0 first, the
        sequence length last, repeated at the end to pad samples with fewer documents (THD's
        cumulative sequence lengths, one row per sample). None: one document per sample.
    lse_bns [b, n, s_q] fp32: natural-log log-sum-exp of each query's scaled scores over the keys it
        sees in this block (−inf for a query that sees none; its output row is then 0)

A query at global position p sees a key at position t iff t <= p and both lie in the same document.
Nothing of size s_q × s_k is built as a mask: the "torch" backend cuts the block into dense pieces
that are either unmasked or causal squares (`block_pieces`) and runs each with PyTorch's CPU flash
kernel (which returns the LSE); the "triton" backend passes the offsets and cu_seqlens to the flash
kernels (attention_block_triton.py), which skip the key blocks no query of a tile sees.

Partial results over different key blocks combine exactly with `merge_partials` (log-sum-exp
weights). The backward of a block needs the output and LSE of the *whole* attention (merged over all
key blocks): with them the per-block gradients are exact and simply add up.
"""
from __future__ import annotations

import torch

from megaflow.kernels.dispatch import at_least_fp32

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Geometry: which (query rows, key columns) pieces are dense
# ----------------------------------------------------------------------------------------------

def causal_pieces(q_lo: int, q_hi: int, k_lo: int, k_hi: int, offset: int) -> list:
    """Dense pieces of rows [q_lo, q_hi) × keys [k_lo, k_hi) (block-local indices) where row i sees
    key j iff j <= i + offset. Each piece is (q0, q1, k0, k1, causal): causal pieces are squares
    whose row q0 + t sees keys k0 .. k0 + t; the others are unmasked."""
    q_lo = max(q_lo, k_lo - offset)              # rows before this see no key of the range
    if q_lo >= q_hi or k_lo >= k_hi:
        return []
    diag = q_lo + offset                         # the last key row q_lo sees: its diagonal
    if diag >= k_hi - 1:                         # every row sees every key
        return [(q_lo, q_hi, k_lo, k_hi, False)]
    pieces = []
    if diag > k_lo:                              # keys left of the diagonal: seen by every row
        pieces.append((q_lo, q_hi, k_lo, diag, False))
    m = min(q_hi - q_lo, k_hi - diag)            # the causal square on the diagonal
    pieces.append((q_lo, q_lo + m, diag, diag + m, True))
    if q_lo + m < q_hi:                          # rows below the square see all its keys
        pieces.append((q_lo + m, q_hi, diag, k_hi, False))
    return pieces


def _documents(cu_row: torch.Tensor, lo: int, hi: int) -> list:
    """[(start, end)] of the documents of one sample that overlap global positions [lo, hi)."""
    bounds = cu_row.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a and a < hi and b > lo]


def block_pieces(b: int, s_q: int, s_k: int, q_start: int, k_start: int, cu_seqlens_bt=None) -> list:
    """[(sample or None, pieces)]: the dense pieces of a causal (and, with cu_seqlens, per-document)
    block; sample None means the pieces hold for every sample of the batch."""
    offset = q_start - k_start
    if cu_seqlens_bt is None:
        return [(None, causal_pieces(0, s_q, 0, s_k, offset))]
    out = []
    for i in range(b):
        pieces = []
        for d0, d1 in _documents(cu_seqlens_bt[i], max(q_start, k_start), q_start + s_q):
            # rows and keys of this document inside the two blocks (block-local indices)
            pieces += causal_pieces(max(d0, q_start) - q_start, min(d1, q_start + s_q) - q_start,
                                    max(d0, k_start) - k_start, min(d1, k_start + s_k) - k_start, offset)
        out.append((i, pieces))
    return out


def sees_anything(s_q: int, q_start: int, k_start: int) -> bool:
    """Whether any query of the block can see the first key (causality alone)."""
    return k_start <= q_start + s_q - 1


# ----------------------------------------------------------------------------------------------
# Dense pieces: PyTorch's CPU flash kernel (returns the LSE), materialised math elsewhere
# ----------------------------------------------------------------------------------------------

def _dense_forward(q, k, v, causal, scale):
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return o, lse.float() if lse.dtype != torch.float64 else lse
    g = q.shape[1] // k.shape[1]
    kf, vf = (at_least_fp32(t).repeat_interleave(g, 1) for t in (k, v))
    s = (at_least_fp32(q) @ kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), NEG_INF)
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ vf).to(q.dtype), lse


def _dense_backward(do, q, k, v, o, lse, causal, scale):
    if q.device.type == "cpu":
        c = [t.contiguous() for t in (do, q, k, v, o)]
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *c, lse, 0.0, causal, scale=scale)
    g = q.shape[1] // k.shape[1]
    qf, dof, of = (at_least_fp32(t) for t in (q, do, o))
    kf, vf = (at_least_fp32(t).repeat_interleave(g, 1) for t in (k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    p = (s - lse[..., None]).exp()
    if causal:
        p = p.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), 0.0)
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    dq, dk = ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale
    fold = lambda t: t.unflatten(1, (-1, g)).sum(2)  # noqa: E731  (sum the query heads of a kv head)
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# The block API
# ----------------------------------------------------------------------------------------------

def merge_partials(o_acc, lse_acc, o_blk, lse_blk):
    """Combine two partial attentions over disjoint key sets, exactly (in place on o_acc, lse_acc):
    o = (e^lse_acc · o_acc + e^lse_blk · o_blk) / (e^lse_acc + e^lse_blk). Rows where both are empty
    (−inf) stay empty."""
    lse = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_acc, w_blk = (lse_acc - safe).exp()[..., None], (lse_blk - safe).exp()[..., None]
    o_acc.mul_(w_acc).add_(w_blk * o_blk.to(o_acc.dtype))
    lse_acc.copy_(lse)


def block_forward(q_bnsd, k_bgsd, v_bgsd, q_start: int, k_start: int, scale: float,
                  cu_seqlens_bt=None, backend: str = "torch", out=None):
    """Attention of the block's queries over the block's keys. Returns (o, lse) in fp32 (fp64 for
    fp64 inputs), or merges into out = (o_acc, lse_acc) when given and returns it; None when no
    query sees any key."""
    b, _, s_q, _ = q_bnsd.shape
    s_k = k_bgsd.shape[2]
    if not sees_anything(s_q, q_start, k_start):
        return out
    if backend == "triton":
        from megaflow.kernels import attention_block_triton as kt
        o_blk, lse_blk = kt.flash_attn_block_forward(q_bnsd, k_bgsd, v_bgsd, scale, q_start, k_start,
                                                     cu_seqlens_bt)
        return _accumulate(out, o_blk, lse_blk)
    acc_dtype = torch.promote_types(q_bnsd.dtype, torch.float32)
    if out is None:
        out = (torch.zeros(q_bnsd.shape, dtype=acc_dtype, device=q_bnsd.device),
               torch.full(q_bnsd.shape[:3], NEG_INF, dtype=acc_dtype, device=q_bnsd.device))
    o_acc, lse_acc = out
    for sample, pieces in block_pieces(b, s_q, s_k, q_start, k_start, cu_seqlens_bt):
        rows = slice(None) if sample is None else slice(sample, sample + 1)
        for q0, q1, k0, k1, causal in pieces:
            o, lse = _dense_forward(q_bnsd[rows, :, q0:q1], k_bgsd[rows, :, k0:k1], v_bgsd[rows, :, k0:k1],
                                    causal, scale)
            merge_partials(o_acc[rows, :, q0:q1], lse_acc[rows, :, q0:q1], o, lse.to(acc_dtype))
    return out


def _accumulate(out, o_blk, lse_blk):
    if out is None:
        acc_dtype = torch.promote_types(o_blk.dtype, torch.float32)
        return o_blk.to(acc_dtype), lse_blk.to(acc_dtype)
    merge_partials(out[0], out[1], o_blk, lse_blk.to(out[1].dtype))
    return out


def block_backward(do_bnsd, q_bnsd, k_bgsd, v_bgsd, o_bnsd, lse_bns, q_start: int, k_start: int, scale: float,
                   cu_seqlens_bt=None, backend: str = "torch"):
    """(dq, dk, dv) of this block's share of the attention, given the output and LSE of the whole
    attention (all key blocks merged). Gradients in fp32 (fp64 for fp64 inputs); None if no query
    sees any key of the block."""
    b, _, s_q, _ = q_bnsd.shape
    s_k = k_bgsd.shape[2]
    if not sees_anything(s_q, q_start, k_start):
        return None
    if backend == "triton":
        from megaflow.kernels import attention_block_triton as kt
        return kt.flash_attn_block_backward(do_bnsd, q_bnsd, k_bgsd, v_bgsd, o_bnsd, lse_bns, scale, q_start,
                                            k_start, cu_seqlens_bt)
    acc_dtype = torch.promote_types(q_bnsd.dtype, torch.float32)
    dq = torch.zeros(q_bnsd.shape, dtype=acc_dtype, device=q_bnsd.device)
    dk = torch.zeros(k_bgsd.shape, dtype=acc_dtype, device=q_bnsd.device)
    dv = torch.zeros(v_bgsd.shape, dtype=acc_dtype, device=q_bnsd.device)
    o_bnsd = o_bnsd.to(q_bnsd.dtype)
    for sample, pieces in block_pieces(b, s_q, s_k, q_start, k_start, cu_seqlens_bt):
        rows = slice(None) if sample is None else slice(sample, sample + 1)
        for q0, q1, k0, k1, causal in pieces:
            g = _dense_backward(do_bnsd[rows, :, q0:q1], q_bnsd[rows, :, q0:q1], k_bgsd[rows, :, k0:k1],
                                v_bgsd[rows, :, k0:k1], o_bnsd[rows, :, q0:q1], lse_bns[rows, :, q0:q1],
                                causal, scale)
            dq[rows, :, q0:q1] += g[0]
            dk[rows, :, k0:k1] += g[1]
            dv[rows, :, k0:k1] += g[2]
    return dq, dk, dv
