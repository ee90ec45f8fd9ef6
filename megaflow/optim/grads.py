"""Gradient bookkeeping between the reduction and the optimizer step, across the TP×PP×DP grid:
unscaling with an agreed inf check, the global gradient norm, clipping.

In training they act on the gradients the optimizer will use: the reduced fp32 main gradients of the
elements this rank owns (optim/distrib_optimizer.py) — whole parameters without ZeRO, shards with it.
The bucketed DP reduction, the tied-embedding and sequence-parallel sums are in optim/grad_buffer.py.
They also accept parameters (their .grad), and finalize_gradients() does the same reductions on plain
.grad tensors, unbucketed: the simple reference the schedules' tests use without an optimizer.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megaflow.optim.grad_buffer import all_reduce_coalesced, is_expert, sum_replicated_grads
from megaflow.parallel import state


def _grads(items):
    """Gradient tensors of a list of gradients or parameters (a parameter's .grad, if any)."""
    out = []
    for x in items:
        g = x.grad if isinstance(x, nn.Parameter) else x
        if g is not None:
            out.append(g)
    return out


@torch.no_grad()
def finalize_gradients(params) -> None:
    """On plain .grad: average over DP; sum the tied-embedding copies of the first and last stage;
    sum the grads of TP-replicated params that saw only this rank's tokens (sequence parallelism)."""
    st = state.get()
    grads = [p.grad for p in params if p.grad is not None]
    if st.dp_size * st.cp_size > 1:  # over DP×CP: context-parallel ranks saw other tokens
        for g in grads:
            g.div_(st.dp_size * st.cp_size)
    dense = [p.grad for p in params if p.grad is not None and not is_expert(p)]
    expert = [p.grad for p in params if p.grad is not None and is_expert(p)]
    if st.dp_size * st.cp_size > 1:
        all_reduce_coalesced(dense, st.groups["dp_cp"])
    if st.edp_size > 1:  # experts: the same mean, summed over the ranks holding the same experts
        all_reduce_coalesced(expert, st.groups["edp"])
    sum_replicated_grads([(p, p.grad) for p in params if p.grad is not None])


def counts_towards_norm(param) -> bool:
    """Each distinct weight once: TP-replicated params only on TP rank 0; the later stage's copy of a
    tied embedding not at all (the first stage counts it). MoE experts: unsplit ones (ETP = 1) on every
    rank, since each rank of an expert-parallel group holds other experts."""
    st = state.get()
    if getattr(param, "shared_embedding", False) and not st.is_first_stage:
        return False
    if is_expert(param):
        return getattr(param, "tensor_parallel", False) or st.etp_rank == 0
    return getattr(param, "tensor_parallel", False) or st.tp_rank == 0


@torch.no_grad()
def global_grad_norm(pieces, over_dp: bool = False) -> float:
    """L2 norm of the whole model's gradient. pieces: (param, grad) with grad the part of param's
    gradient this rank holds, or parameters (their .grad). Summed over the model-parallel group (TP
    and PP ranks hold different weights); with over_dp (ZeRO: DP ranks hold different shards) over
    every rank."""
    st = state.get()
    sq = torch.zeros(2, dtype=torch.float32, device=st.device)  # dense, expert
    for item in pieces:
        param, grad = (item, item.grad) if isinstance(item, nn.Parameter) else item
        if grad is not None and counts_towards_norm(param):
            sq[int(is_expert(param))] += grad.float().pow(2).sum()
    if st.world_size > 1:
        if over_dp:
            dist.all_reduce(sq)
        elif st.ep_size > 1 or st.etp_size != st.tp_size:
            # Experts are split over EP (and ETP) ranks that the model-parallel group does not span:
            # each rank contributes what it alone holds (DP and expert-DP replica 0), summed everywhere.
            sq[0] *= float(st.dp_rank == 0 and st.cp_rank == 0)
            sq[1] *= float(st.edp_rank == 0)
            dist.all_reduce(sq)
        elif len(st.ranks.get("mp", [])) > 1:
            dist.all_reduce(sq, group=st.groups["mp"])
    return math.sqrt(sq.sum().item())


@torch.no_grad()
def clip_gradients(grads, max_norm: float, norm: float) -> None:
    coeff = max_norm / (norm + 1e-6)
    if coeff < 1.0:
        for g in _grads(grads):
            g.mul_(coeff)


@torch.no_grad()
def unscale_and_check(grads, scale: float) -> bool:
    """Divide grads by the loss scale; True if any grad on any rank is inf/NaN (every rank must agree
    before a step is skipped, whatever part of the model or which shard it holds)."""
    st = state.get()
    found = torch.zeros((), dtype=torch.float32, device=st.device)
    inv = 1.0 / scale
    for g in _grads(grads):
        g.mul_(inv)
        found = torch.maximum(found, (~torch.isfinite(g)).any().float())
    if st.world_size > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item())
