"""Tensor-parallel linear layers (Megatron semantics; FORMATS.md §3).

ColumnParallelLinear  Y = X A,  A split by columns: weight [out/tp, in]; each rank computes its slice
                      of the output. Input enters through copy (bwd all-reduce) or, with sequence
                      parallelism, through an all-gather along the sequence (bwd reduce-scatter).
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
    if sequence_parallel:
        x = mappings.gather_from_sequence_parallel_region(x)
    else:
        x = mappings.copy_to_tensor_parallel_region(x)
    y = F.linear(x, weight, bias)
    return mappings.gather_from_tensor_parallel_region(y) if gather_output else y


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
