"""Gradient bookkeeping after backward, before the optimizer step, across the TP×PP×DP grid:
reduction over data parallelism, sums over shared weights, unscaling, inf checks, global-norm clip."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaflow.parallel import state


def _all_reduce_coalesced(tensors, group, op=dist.ReduceOp.SUM):
    """One collective for many tensors: flatten, reduce, copy back."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def finalize_gradients(params) -> None:
    """Average over DP; sum the tied-embedding copies of the first and last stage; all-reduce the
    grads of TP-replicated params that saw only this rank's tokens (sequence parallelism)."""
    st = state.get()
    grads = [p.grad for p in params if p.grad is not None]
    if st.dp_size > 1:
        _all_reduce_coalesced(grads, st.groups["dp"])
        for g in grads:
            g.div_(st.dp_size)
    if st.pp_size > 1 and len(st.ranks.get("embedding", [])) > 1:
        shared = [p.grad for p in params if p.grad is not None and getattr(p, "shared_embedding", False)]
        _all_reduce_coalesced(shared, st.groups["embedding"])
    if st.tp_size > 1:
        sp = [p.grad for p in params if p.grad is not None and getattr(p, "sequence_parallel", False)]
        _all_reduce_coalesced(sp, st.groups["tp"])


def _counts_towards_norm(param) -> bool:
    """Each distinct weight once: TP-replicated params only on TP rank 0; the last stage's copy of a
    tied embedding not at all (the first stage counts it)."""
    if getattr(param, "shared_embedding", False) and not state.get().is_first_stage:
        return False
    return getattr(param, "tensor_parallel", False) or state.get().tp_rank == 0


@torch.no_grad()
def global_grad_norm(params) -> float:
    st = state.get()
    sq = torch.zeros((), dtype=torch.float32, device=st.device)
    for p in params:
        if p.grad is not None and _counts_towards_norm(p):
            sq += p.grad.float().pow(2).sum()
    if st.world_size > 1 and "mp" in st.groups and len(st.ranks["mp"]) > 1:
        dist.all_reduce(sq, group=st.groups["mp"])
    return math.sqrt(sq.item())


@torch.no_grad()
def clip_gradients(params, max_norm: float, norm: float) -> None:
    coeff = max_norm / (norm + 1e-6)
    if coeff < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coeff)


@torch.no_grad()
def unscale_and_check(params, scale: float) -> bool:
    """Divide grads by the loss scale; True if any grad on any model-parallel rank is inf/NaN
    (every rank must agree before a step is skipped)."""
    st = state.get()
    found = torch.zeros((), dtype=torch.float32, device=st.device)
    inv = 1.0 / scale
    for p in params:
        if p.grad is not None:
            p.grad.mul_(inv)
            found = torch.maximum(found, (~torch.isfinite(p.grad)).any().float())
    if st.world_size > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())
