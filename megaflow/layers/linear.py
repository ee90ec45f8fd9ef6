"""Tensor-parallel linear layers (Megatron semantics; FORMATS.md §3).

ColumnParallelLinear  Y = X A,  A split by columns: weight [out/tp, in]; each rank computes its slice
                      of the output. Input enters through copy (bwd all-reduce) or, with sequence
                      parallelism, through an all-gather along the sequence (bwd reduce-scatter).
                      Under sequence parallelism the layer keeps only its [s/tp] input shard for
                      backward and all-gathers it again there (as Megatron does): otherwise the saved
                      gathered input would undo the activation-memory saving sequence parallelism is for.
RowParallelLinear     Y = X A,  A split by rows: weight [out, in/tp]; partial outputs are all-reduced
                      (or reduce-scattered along the sequence), then the bias is added once.
At TP=1 both are a plain F.linear, except with --gradient-accumulation-fusion.

Gradient-accumulation fusion (Megatron's --gradient-accumulation-fusion): when the optimizer's gradient
buffers mark a weight `accumulate_into_main_grad` (optim/grad_buffer.py), backward accumulates the
weight gradient straight into its fp32 `main_grad` (one addmm per block, no per-parameter gradient
tensor) and returns no weight gradient. Autograd still runs the weight's post-accumulate hook (with
nothing to accumulate), so the buffers' bookkeeping (each bucket's countdown to its DP reduction) is
unchanged; tests/unit/test_perf_options.py checks that it does. Only weights owned by these layers are
marked: the word-embedding table, which a tied output layer multiplies by, also gets the lookup's
gradient through autograd and keeps the ordinary path. Inside a compiled block (--compile) backward
is traced: there the weight gradient is returned as usual and the collectives run synchronously
(dynamo traces no async collective; inductor orders them).
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
    """fused_sizes: full sizes of blocks stacked along the output ([Q, K, V] rows, [gate, up]), each
    split across TP on its own (layers/sharding.py). With separate_blocks the forward returns this
    rank's part of each block as its own tensor, each from its own matmul: the outputs are contiguous
    (split views of one output are strided for the ops that follow) and backward writes each block's
    weight gradient into its rows instead of concatenating the blocks' gradients first."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, fused_sizes: Optional[Sequence[int]] = None,
                 init_std: float = 0.02, separate_blocks: bool = False):
        super().__init__()
        tp = state.get().tp_size
        if output_size % tp:
            raise ValueError(f"output size {output_size} not divisible by TP size {tp}")
        if separate_blocks and (gather_output or not fused_sizes):
            raise ValueError("separate_blocks needs fused_sizes and gather_output=False")
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.block_sizes = tuple(size // tp for size in fused_sizes) if separate_blocks else None
        self.weight = _empty(output_size // tp, input_size)
        self.weight.init_std = init_std
        self.weight.fusable_grad_accumulation = True  # used once per forward: see the module docstring
        mark_tensor_parallel(self.weight, 0, fused_sizes)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size // tp, device=state.get().device))
            mark_tensor_parallel(self.bias, 0, fused_sizes)

    def forward(self, x):
        if self.block_sizes is None:
            return column_parallel_matmul(x, self.weight, self.bias, self.sequence_parallel, self.gather_output)
        sp = self.sequence_parallel and state.get().tp_size > 1
        if not sp:
            x = mappings.copy_to_tensor_parallel_region(x)
        return _BlockLinear.apply(x, self.weight, self.bias, self.block_sizes, sp)


def column_parallel_matmul(x, weight, bias=None, sequence_parallel=False, gather_output=False):
    """x @ weight.T with weight [out/tp, in] split by output columns; also used by a tied output
    layer, whose weight is the word-embedding table."""
    if sequence_parallel and state.get().tp_size > 1:
        (y,) = _BlockLinear.apply(x, weight, bias, (weight.shape[0],), True)
    elif fuses_grad_accumulation(weight):
        (y,) = _BlockLinear.apply(mappings.copy_to_tensor_parallel_region(x), weight, bias, (weight.shape[0],), False)
    else:
        y = F.linear(mappings.copy_to_tensor_parallel_region(x), weight, bias)
    return mappings.gather_from_tensor_parallel_region(y) if gather_output else y


class _BlockLinear(torch.autograd.Function):
    """x @ W_i.T + b_i for consecutive row blocks W_i of weight (sizes), one output per block. With
    sequence_parallel, x is this rank's sequence shard and is all-gathered first.

    Under sequence parallelism only the local x shard is saved for backward, which re-gathers it
    (async, overlapped with grad_x = sum_i g_i W_i) and reduce-scatters grad_x along the sequence
    (async, overlapped with the weight gradient). The weight gradient is one tensor whose row blocks
    are written by one matmul each. Under autocast the forward matmuls ran in the autocast dtype;
    backward computes in the dtype of the incoming gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, sequence_parallel):
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.sequence_parallel, ctx.has_bias = sizes, sequence_parallel, bias is not None
        x_full = mappings.all_gather_sequence(x) if sequence_parallel else x
        biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
        return tuple(F.linear(x_full, w, b) for w, b in zip(weight.split(sizes), biases))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        dtype = grads[0].dtype
        sp, overlap = ctx.sequence_parallel, not torch.compiler.is_compiling()
        gather = scatter = None
        if sp and overlap:
            x_full, gather = mappings.all_gather_sequence(x, async_op=True)
        elif sp:
            x_full = mappings.all_gather_sequence(x)
        else:
            x_full = x
        g2s = [g.reshape(-1, g.shape[-1]) for g in grads]
        w_blocks = weight.to(dtype).split(ctx.sizes)
        grad_x2 = g2s[0].mm(w_blocks[0])
        for g2, w in zip(g2s[1:], w_blocks[1:]):
            grad_x2.addmm_(g2, w)
        grad_x_full = grad_x2.view(*grads[0].shape[:-1], weight.shape[1])
        if sp and overlap:
            gather.wait()
            grad_x, scatter = mappings.reduce_scatter_sequence(grad_x_full, async_op=True)
        elif sp:
            grad_x = mappings.reduce_scatter_sequence(grad_x_full)
        else:
            grad_x = grad_x_full
        x2 = x_full.reshape(-1, x_full.shape[-1]).to(dtype)
        grad_b = torch.empty(weight.shape[0], dtype=dtype, device=weight.device) if ctx.has_bias else None
        if grad_b is not None:
            for g2, b_rows in zip(g2s, grad_b.split(ctx.sizes)):
                torch.sum(g2, 0, out=b_rows)
        if fuses_grad_accumulation(weight) and overlap:
            add_weight_grad_to_main_grad(weight, g2s, x2, ctx.sizes)
            grad_w = None
        else:
            grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            for g2, w_rows in zip(g2s, grad_w.split(ctx.sizes)):
                torch.mm(g2.t(), x2, out=w_rows)
        if scatter is not None:
            scatter.wait()
        return grad_x, grad_w, grad_b, None, None


def fuses_grad_accumulation(weight) -> bool:
    """Does backward accumulate this weight's gradient into its main_grad (gradient-accumulation fusion)?"""
    return getattr(weight, "accumulate_into_main_grad", False) and weight.requires_grad


def add_weight_grad_to_main_grad(weight, g2s, x2, sizes):
    """main_grad[rows of block i] += g_i^T x, in place."""
    main = weight.main_grad
    for g2, rows in zip(g2s, main.split(sizes)):
        if g2.dtype == main.dtype:
            rows.addmm_(g2.t(), x2)
        else:  # bf16/fp16 compute into fp32 main grads: one product, added (no mixed-dtype addmm on CPU)
            rows.add_(g2.t().mm(x2))


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
        self.weight.fusable_grad_accumulation = True
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
        if fuses_grad_accumulation(self.weight):
            (y,) = _BlockLinear.apply(x, self.weight, None, (self.weight.shape[0],), False)
        else:
            y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_parallel_region(y)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(nn.Module):
    """Y = X A with the whole weight on every TP rank: for projections too small to split, such as MLA's
    down-projections to its latents. Its output is whole (each rank computes the same values) and its
    consumers must make their input gradient whole again (a column-parallel layer does). Under sequence
    parallelism each rank multiplies its own tokens, so the weight gradient is summed over TP (the flag)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, sequence_parallel: bool = False,
                 init_std: float = 0.02):
        super().__init__()
        self.weight = _empty(output_size, input_size)
        self.weight.init_std = init_std
        self.weight.sequence_parallel = sequence_parallel
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, device=state.get().device))
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)
