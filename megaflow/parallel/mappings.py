"""Autograd-aware collectives over the tensor-parallel group.

Each function is named by what it does in the forward pass; its backward is the twin collective:

    copy_to_tensor_parallel_region        fwd identity          bwd all-reduce
    reduce_from_tensor_parallel_region    fwd all-reduce        bwd identity
    scatter_to_tensor_parallel_region     fwd split last dim    bwd all-gather last dim
    gather_from_tensor_parallel_region    fwd all-gather last   bwd split last dim
    scatter_to_sequence_parallel_region   fwd split dim 0       bwd all-gather dim 0
    gather_from_sequence_parallel_region  fwd all-gather dim 0  bwd reduce-scatter dim 0
    reduce_scatter_to_sequence_parallel_region  fwd reduce-scatter dim 0  bwd all-gather dim 0

With a tensor-parallel group of size 1 every function returns its input untouched (no autograd node).

The all-reduces work in place on the tensor they are given (as Megatron's do): the forward reduce gets
a fresh partial sum (a matmul or embedding output nobody else holds), the backward of copy a fresh
input gradient. Splits return contiguous copies. Sizes must divide by the TP size; the error says which.

`all_gather_sequence` / `reduce_scatter_sequence` are the plain (non-autograd) dim-0 collectives, with
an async option, for layers that schedule their own backward (layers/linear.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.parallel import collectives, state


def _group():
    return state.get().groups.get("tp")


def _size() -> int:
    return state.get().tp_size


def _all_reduce(x):
    x = x.contiguous()
    dist.all_reduce(x, group=_group())
    return x


def _check_divisible(x, dim: int, what: str):
    if x.shape[dim] % _size():
        raise ValueError(f"{what} {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is not divisible "
                         f"by the tensor-parallel size {_size()}")


def _split_last(x):
    _check_divisible(x, -1, "last dimension")
    chunk = x.shape[-1] // _size()
    return x[..., state.get().tp_rank * chunk:(state.get().tp_rank + 1) * chunk].contiguous()


def _gather_last(x):
    parts = [torch.empty_like(x) for _ in range(_size())]
    dist.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts, dim=-1)


def _split_first(x):
    _check_divisible(x, 0, "sequence length")
    chunk = x.shape[0] // _size()
    return x[state.get().tp_rank * chunk:(state.get().tp_rank + 1) * chunk].contiguous()


def all_gather_sequence(x, async_op: bool = False):
    """[s/tp, ...] on each rank -> [s, ...] in TP-rank order. With async_op, returns (out, work)."""
    out = torch.empty((x.shape[0] * _size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = collectives.all_gather(out, x.contiguous(), group=_group(), async_op=async_op)
    return (out, work) if async_op else out


def reduce_scatter_sequence(x, async_op: bool = False):
    """[s, ...] partial sums on each rank -> this rank's [s/tp, ...] slice of their sum."""
    _check_divisible(x, 0, "sequence length")
    out = torch.empty((x.shape[0] // _size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = collectives.reduce_scatter(out, x.contiguous(), group=_group(), async_op=async_op)
    return (out, work) if async_op else out


_gather_first, _reduce_scatter_first = all_gather_sequence, reduce_scatter_sequence


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g)


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last(x)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g)


class _ScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_first(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_first(g)


class _GatherFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_first(x)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_first(g)


class _ReduceScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_first(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_first(g)


def _apply(fn, x):
    return x if _size() == 1 else fn.apply(x)


def copy_to_tensor_parallel_region(x):
    """Enter a TP region with a replicated input: identity; backward sums the partial input grads."""
    return _apply(_Copy, x)


def reduce_from_tensor_parallel_region(x):
    """Leave a TP region: sum the partial outputs; backward passes the (replicated) grad through."""
    return _apply(_Reduce, x)


def scatter_to_tensor_parallel_region(x):
    """Keep this rank's slice of the last dim; backward all-gathers the grad slices."""
    return _apply(_ScatterLast, x)


def gather_from_tensor_parallel_region(x):
    """All-gather the last dim; backward keeps this rank's slice of the grad."""
    return _apply(_GatherLast, x)


def scatter_to_sequence_parallel_region(x):
    """Keep this rank's slice of the sequence (dim 0); backward all-gathers the grad along it."""
    return _apply(_ScatterFirst, x)


def gather_from_sequence_parallel_region(x):
    """All-gather the sequence for a TP region whose consumers are split across ranks (each rank's
    grad is a partial sum): backward reduce-scatters the grad along the sequence."""
    return _apply(_GatherFirst, x)


def reduce_scatter_to_sequence_parallel_region(x):
    """Sum partial outputs and keep this rank's sequence slice; backward all-gathers the grad."""
    return _apply(_ReduceScatterFirst, x)
