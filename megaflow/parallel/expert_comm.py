"""Autograd collectives over an explicit group, for the MoE token dispatcher (layers/moe/dispatcher.py).

Named by what they do in the forward pass; the backward is the twin:

    all_to_all(x, out_splits, in_splits, group)  fwd all-to-all of rows (variable splits)
                                                 bwd all-to-all back (the splits swapped)
    gather_along_first(x, group)                 fwd all-gather dim 0   bwd reduce-scatter dim 0
    reduce_scatter_along_first(x, group)         fwd reduce-scatter dim 0   bwd all-gather dim 0

and two plain (no autograd) helpers: exchange_counts (every rank tells every other how many rows it
will send) and all_gather_rows (integer routing tables). Unlike parallel/mappings.py (tensor parallelism,
whose group is implied) the group is an argument: the expert-parallel group, or the tensor-parallel group
when experts are sharded like the dense MLP. A group of size 1 returns its input untouched.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.parallel import collectives


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_to_all_rows(x, out_splits, in_splits, group):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(out_splits),
                           input_split_sizes=list(in_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all_rows(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits, in_splits, group):
    """Rows [sum(in_splits), ...]: the first in_splits[0] go to group rank 0, ... Returns the rows
    received, [sum(out_splits), ...], ordered by source rank."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, [int(n) for n in out_splits], [int(n) for n in in_splits], group)


def _gather_first(x, group):
    out = x.new_empty((x.shape[0] * group_size(group),) + tuple(x.shape[1:]))
    collectives.all_gather(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first(x, group):
    n = group_size(group)
    if x.shape[0] % n:
        raise ValueError(f"{x.shape[0]} rows cannot be reduce-scattered over {n} ranks")
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    collectives.reduce_scatter(out, x.contiguous(), group=group)
    return out


class _GatherFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_first(g, ctx.group), None


class _ReduceScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_first(g, ctx.group), None


def gather_along_first(x, group):
    """Every rank's rows, in group-rank order. Each rank's consumers of the result produce a partial
    gradient for every row, so backward sums them and hands each rank its own rows."""
    return x if group_size(group) == 1 else _GatherFirst.apply(x, group)


def reduce_scatter_along_first(x, group):
    """Sum of every rank's [n·k, ...] partial rows; this rank keeps its k. Backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterFirst.apply(x, group)


@torch.no_grad()
def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """send_counts [n·c]: c counts meant for each of the n group ranks. Returns [n·c]: the c counts each
    rank sent to this one, by source rank."""
    if group_size(group) == 1:
        return send_counts
    out = torch.empty_like(send_counts)
    dist.all_to_all_single(out, send_counts.contiguous(), group=group)
    return out


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 without autograd (routing indices, masks)."""
    return x if group_size(group) == 1 else _gather_first(x, group)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over the group (statistics without a gradient)."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x
