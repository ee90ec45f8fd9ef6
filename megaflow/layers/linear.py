"""Tensor-parallel linear layers (Megatron semantics; FORMATS.md §3).

ColumnParallelLinear  Y = X A,  A split by columns: weight [out/tp, in]; each rank computes its slice
                      of the output. Input enters through copy (bwd all-reduce) or, with sequence
                      parallelism, through an all-gather along the sequence (bwd reduce-scatter).
                      Under sequence parallelism the layer keeps only its [s/tp] input shard for
                      backward and all-gathers it again there (as Megatron does): otherwise the saved
                      gathered input would undo the activation-memory saving sequence parallelism is for.
RowParallelLinear     Y = X A,  A split by rows: weight [out, in/tp]; partial outputs are all-reduced
                      (or reduce-scattered along the sequence), then the bias is added once.
At TP=1 both are a plain F.linear.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.layers.sharding import mark_tensor_parallel
from megaflow.parallel import mappings, state


def _empty(*shape):
    # Values come later from megaflow.model.init (full tensor -> shard), whatever the layout.
    return nn.Parameter(torch.empty(*shape, device=state.get().device))


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, fused_sizes: Optional[Sequence[int]] = None,
                 init_std: float = 0.02):
        super().__init__()
        tp = state.get().tp_size
        if output_size % tp:
            raise ValueError(f"output size {output_size} not divisible by TP size {tp}")
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.weight = _empty(output_size // tp, input_size)
        self.weight.init_std = init_std
        mark_tensor_parallel(self.weight, 0, fused_sizes)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size // tp, device=state.get().device))
            mark_tensor_parallel(self.bias, 0, fused_sizes)

    def forward(self, x):
        return column_parallel_matmul(x, self.weight, self.bias, self.sequence_parallel, self.gather_output)


def column_parallel_matmul(x, weight, bias=None, sequence_parallel=False, gather_output=False):
    """x @ weight.T with weight [out/tp, in] split by output columns; also used by a tied output
    layer, whose weight is the word-embedding table."""
    if sequence_parallel and state.get().tp_size > 1:
        y = _SequenceParallelLinear.apply(x, weight, bias)
    else:
        y = F.linear(mappings.copy_to_tensor_parallel_region(x), weight, bias)
    return mappings.gather_from_tensor_parallel_region(y) if gather_output else y


class _SequenceParallelLinear(torch.autograd.Function):
    """all-gather(x along the sequence) @ weight.T + bias, saving only the local x shard.

    Backward: re-gather x (async, overlapped with grad_x = g @ W), reduce-scatter grad_x along the
    sequence (async, overlapped with grad_W = g^T x_full). Under autocast the forward matmul ran in
    the autocast dtype; backward computes in the dtype of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(mappings.all_gather_sequence(x), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        x_full, gather = mappings.all_gather_sequence(x, async_op=True)
        grad_x_full = g.matmul(weight.to(g.dtype))
        gather.wait()
        grad_x, scatter = mappings.reduce_scatter_sequence(grad_x_full, async_op=True)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(x_full.reshape(-1, x_full.shape[-1]).to(g.dtype))
        grad_b = g2.sum(0) if ctx.has_bias else None
        scatter.wait()
        return grad_x, grad_w, grad_b


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init_std: float = 0.02):
        super().__init__()
        tp = state.get().tp_size
        if input_size % tp:
            raise ValueError(f"input size {input_size} not divisible by TP size {tp}")
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = _empty(output_size, input_size // tp)
        self.weight.init_std = init_std
        mark_tensor_parallel(self.weight, 1)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, device=state.get().device))
            # Replicated across TP; under sequence parallelism each rank sees only its tokens, so the
            # bias gradient must be all-reduced across TP (optim/ does it for params marked so).
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        if not self.input_is_parallel:
            x = mappings.scatter_to_tensor_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_parallel_region(y)
        return y if self.bias is None else y + self.bias
