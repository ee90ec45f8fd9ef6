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
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.parallel import state


def _group():
    return state.get().groups.get("tp")


def _size() -> int:
    return state.get().tp_size


def _all_reduce(x):
    x = x.contiguous()
    dist.all_reduce(x, group=_group())
    return x


def _split_last(x):
    chunk = x.shape[-1] // _size()
    return x[..., state.get().tp_rank * chunk:(state.get().tp_rank + 1) * chunk].contiguous()


def _gather_last(x):
    parts = [torch.empty_like(x) for _ in range(_size())]
    dist.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts, dim=-1)


def _split_first(x):
    chunk = x.shape[0] // _size()
    return x[state.get().tp_rank * chunk:(state.get().tp_rank + 1) * chunk].contiguous()


def _gather_first(x):
    out = torch.empty((x.shape[0] * _size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=_group())
    return out


def _reduce_scatter_first(x):
    if x.shape[0] % _size():
        raise ValueError(f"sequence length {x.shape[0]} not divisible by TP size {_size()}")
    out = torch.empty((x.shape[0] // _size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=_group())
    return out


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
    return _apply(_Copy, x)


def reduce_from_tensor_parallel_region(x):
    return _apply(_Reduce, x)


def scatter_to_tensor_parallel_region(x):
    return _apply(_ScatterLast, x)


def gather_from_tensor_parallel_region(x):
    return _apply(_GatherLast, x)


def scatter_to_sequence_parallel_region(x):
    return _apply(_ScatterFirst, x)


def gather_from_sequence_parallel_region(x):
    return _apply(_GatherFirst, x)


def reduce_scatter_to_sequence_parallel_region(x):
    return _apply(_ReduceScatterFirst, x)
