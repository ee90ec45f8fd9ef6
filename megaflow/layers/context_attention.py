"""Causal attention over a sequence split across context-parallel ranks (zigzag layout,
parallel/context_parallel.py), and over packed documents (cu_seqlens) at any CP size.

Shape legend: b batch, n query heads, g kv heads (this TP rank's), s local tokens, d head dim.
q_bnsd [b, n, s, d]; k_bgsd, v_bgsd [b, g, s, d]. A "run" is (local start, global start, length):
a stretch of tokens contiguous in the full sequence; each rank's tokens are two runs.

    p2p         ring attention: K/V blocks travel around the CP ring (asynchronous send/receive posted
                before the attention of the block in hand, so they overlap it); the partial results
                merge exactly by log-sum-exp. Backward rings the K/V again, and dK/dV travel with them
                back to their owner. Communication per layer: (CP−1) K/V blocks forward, (CP−1) K/V
                blocks and CP dK/dV blocks backward; memory: two K/V blocks in flight.
    all_gather  gather every rank's K/V, attend the local queries with their global offsets, and
                reduce-scatter dK/dV in backward (the gathered K/V is regathered there, not saved).
    a2a         Ulysses: all-to-all from "all heads, local tokens" to "n/CP heads, all tokens",
                ordinary causal attention, all-to-all back. Needs n divisible by CP (kv heads are
                repeated when g is not).

The per-block math is kernels/attention_blocks.py (torch) or the Triton flash kernel; both return
the LSE and take global offsets and cu_seqlens, so one code path serves all three and packed data.
"""
from __future__ import annotations

import torch

from megaflow.kernels.attention_blocks import block_backward, block_forward
from megaflow.kernels.dispatch import resolve_backend
from megaflow.parallel import context_parallel as cpc
from megaflow.parallel import state

COMM_TYPES = ("p2p", "a2a", "all_gather")


def _attend(q, k, v, q_runs, k_runs, acc, scale, cu_seqlens, backend):
    """Merge into acc = (o, lse) the attention of q's runs over k's runs."""
    o_acc, lse_acc = acc
    for ql, qg, qn in q_runs:
        for kl, kg, kn in k_runs:
            block_forward(q[:, :, ql:ql + qn], k[:, :, kl:kl + kn], v[:, :, kl:kl + kn], qg, kg, scale,
                          cu_seqlens, backend, out=(o_acc[:, :, ql:ql + qn], lse_acc[:, :, ql:ql + qn]))


def _attend_backward(do, q, k, v, o, lse, q_runs, k_runs, grads, scale, cu_seqlens, backend):
    """Add into grads = (dq, dk, dv) the gradients of q's runs over k's runs."""
    dq, dk, dv = grads
    for ql, qg, qn in q_runs:
        rows = slice(ql, ql + qn)
        for kl, kg, kn in k_runs:
            cols = slice(kl, kl + kn)
            g = block_backward(do[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], o[:, :, rows],
                               lse[:, :, rows], qg, kg, scale, cu_seqlens, backend)
            if g is not None:
                dq[:, :, rows] += g[0]
                dk[:, :, cols] += g[1]
                dv[:, :, cols] += g[2]


def _empty_acc(q):
    dtype = torch.promote_types(q.dtype, torch.float32)
    return (torch.zeros(q.shape, dtype=dtype, device=q.device),
            torch.full(q.shape[:3], float("-inf"), dtype=dtype, device=q.device))


def _zeros_like_acc(*ts):
    return tuple(torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                 for t in ts)


class RunsAttention(torch.autograd.Function):
    """Attention of local queries over local keys given by runs (no communication): packed
    documents at CP = 1, and the full sequence after Ulysses' all-to-all."""

    @staticmethod
    def forward(ctx, q, k, v, runs, scale, cu_seqlens, backend):
        acc = _empty_acc(q)
        _attend(q, k, v, runs, runs, acc, scale, cu_seqlens, backend)
        ctx.save_for_backward(q, k, v, *acc)
        ctx.args = (runs, scale, cu_seqlens, backend)
        return acc[0].to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        runs, scale, cu_seqlens, backend = ctx.args
        grads = _zeros_like_acc(q, k, v)
        _attend_backward(do, q, k, v, o, lse, runs, runs, grads, scale, cu_seqlens, backend)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v))) + (None,) * 4


class RingAttention(torch.autograd.Function):
    """p2p: K/V (stacked, one message) go around the CP ring; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, scale, cu_seqlens, backend):
        st = state.get()
        cp, r, s = st.cp_size, st.cp_rank, q.shape[2]
        q_runs = cpc.zigzag_runs(r, cp, s)
        acc = _empty_acc(q)
        kv, ring = torch.stack([k, v]), cpc.RingExchange(tag=1)
        for i in range(cp):
            if i < cp - 1:
                ring.start(kv)                       # next block travels while this one is computed
            _attend(q, kv[0], kv[1], q_runs, cpc.zigzag_runs((r - i) % cp, cp, s), acc, scale, cu_seqlens,
                    backend)
            if i < cp - 1:
                kv = ring.wait()
        ctx.save_for_backward(q, k, v, *acc)
        ctx.args = (scale, cu_seqlens, backend)
        return acc[0].to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        scale, cu_seqlens, backend = ctx.args
        st = state.get()
        cp, r, s = st.cp_size, st.cp_rank, q.shape[2]
        q_runs = cpc.zigzag_runs(r, cp, s)
        dq, = _zeros_like_acc(q)
        kv, kv_ring, dkv_ring = torch.stack([k, v]), cpc.RingExchange(tag=2), cpc.RingExchange(tag=3)
        dkv = torch.zeros(kv.shape, dtype=dq.dtype, device=q.device)
        for i in range(cp):
            if i < cp - 1:
                kv_ring.start(kv)
            dk_blk, dv_blk = _zeros_like_acc(k, v)
            _attend_backward(do, q, kv[0], kv[1], o, lse, q_runs, cpc.zigzag_runs((r - i) % cp, cp, s),
                             (dq, dk_blk, dv_blk), scale, cu_seqlens, backend)
            if i > 0:
                dkv = dkv_ring.wait()                # the gradient of the block in hand, so far
            dkv[0] += dk_blk
            dkv[1] += dv_blk
            dkv_ring.start(dkv)                      # on to the next rank, which gets this block next
            if i < cp - 1:
                kv = kv_ring.wait()
        dkv = dkv_ring.wait()                        # our own block's gradient, back home
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class AllGatherAttention(torch.autograd.Function):
    """all_gather: every rank's K/V, local queries at their global offsets; dK/dV reduce-scattered."""

    @staticmethod
    def forward(ctx, q, k, v, scale, cu_seqlens, backend):
        st = state.get()
        cp, r, s = st.cp_size, st.cp_rank, q.shape[2]
        kv_all = cpc.all_gather_stacked(torch.stack([k, v]))      # [CP, 2, b, g, s, d]
        acc = _empty_acc(q)
        for j in range(cp):
            _attend(q, kv_all[j, 0], kv_all[j, 1], cpc.zigzag_runs(r, cp, s), cpc.zigzag_runs(j, cp, s), acc,
                    scale, cu_seqlens, backend)
        ctx.save_for_backward(q, k, v, *acc)
        ctx.args = (scale, cu_seqlens, backend)
        return acc[0].to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        scale, cu_seqlens, backend = ctx.args
        st = state.get()
        cp, r, s = st.cp_size, st.cp_rank, q.shape[2]
        kv_all = cpc.all_gather_stacked(torch.stack([k, v]))
        dq, = _zeros_like_acc(q)
        dkv_all = torch.zeros(kv_all.shape, dtype=dq.dtype, device=q.device)
        for j in range(cp):
            _attend_backward(do, q, kv_all[j, 0], kv_all[j, 1], o, lse, cpc.zigzag_runs(r, cp, s),
                             cpc.zigzag_runs(j, cp, s), (dq, dkv_all[j, 0], dkv_all[j, 1]), scale, cu_seqlens,
                             backend)
        dkv = cpc.reduce_scatter_stacked(dkv_all)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _ulysses(q, k, v, scale, cu_seqlens, backend):
    st = state.get()
    cp, s = st.cp_size, q.shape[2]
    if k.shape[1] % cp:  # fewer kv heads than ranks: give each query head its own copy (GQA order)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    q2, k2, v2 = (cpc.heads_to_sequence(t) for t in (q, k, v))   # [b, heads/CP, CP·s, d], rank order
    runs = [(j * s + l, g, n) for j in range(cp) for l, g, n in cpc.zigzag_runs(j, cp, s)]
    return cpc.sequence_to_heads(RunsAttention.apply(q2, k2, v2, runs, scale, cu_seqlens, backend))


def context_parallel_attention(q_bnsd, k_bgsd, v_bgsd, comm_type: str = "p2p", cu_seqlens_bt=None,
                               softmax_scale=None, backend: str = "torch"):
    """Causal attention of this rank's zigzag tokens over the whole sequence (every CP rank's
    tokens), per document when cu_seqlens_bt [b, t] (global document boundaries) is given."""
    scale = float(softmax_scale if softmax_scale is not None else q_bnsd.shape[-1] ** -0.5)
    backend = resolve_backend(backend, q_bnsd)      # auto: Triton on CUDA tensors, torch otherwise
    if backend not in ("torch", "triton"):
        raise ValueError(f"context-parallel and packed attention run on the torch or triton backend, not {backend!r}")
    cp = state.get().cp_size
    if cp == 1:
        return RunsAttention.apply(q_bnsd, k_bgsd, v_bgsd, [(0, 0, q_bnsd.shape[2])], scale, cu_seqlens_bt,
                                   backend)
    if comm_type == "p2p":
        return RingAttention.apply(q_bnsd, k_bgsd, v_bgsd, scale, cu_seqlens_bt, backend)
    if comm_type == "all_gather":
        return AllGatherAttention.apply(q_bnsd, k_bgsd, v_bgsd, scale, cu_seqlens_bt, backend)
    if comm_type == "a2a":
        return _ulysses(q_bnsd, k_bgsd, v_bgsd, scale, cu_seqlens_bt, backend)
    raise ValueError(f"unknown --cp-comm-type {comm_type!r} ({', '.join(COMM_TYPES)})")
