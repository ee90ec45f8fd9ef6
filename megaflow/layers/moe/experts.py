"""The experts of one MoE layer held by this rank: E/EP experts, each an MLP (SwiGLU or GeLU, no
biases) of width --moe-ffn-hidden-size, split over the expert-tensor-parallel ranks like the dense
MLP when ETP = TP (fc1 by output rows, [gate; up] blocks each split on its own; fc2 by input columns),
whole when ETP = 1.

Every expert keeps its own parameters, named by its *global* expert index
(`local_experts.{e}.linear_fc1.weight`, Megatron-Core's SequentialMLP names): initial values, checkpoints
and resharding across EP follow from the name alone. Each parameter carries `expert_parallel = True`:
its gradient is reduced over the expert-data-parallel group and ZeRO shards it there (optim/).

Input: rows sorted by local expert with `counts` rows each. With --moe-grouped-gemm the local experts'
weights are stacked and run as one grouped GEMM (kernels/grouped_gemm.py; _ExpertGroupedLinear, which
also fuses gradient accumulation); otherwise one matmul each.
The output of fc2 is a partial sum over the ETP ranks; the dispatcher reduce-scatters it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.kernels.dispatch import resolve_backend
from megaflow.kernels.grouped_gemm import grouped_products, row_offsets
from megaflow.kernels.swiglu import swiglu
from megaflow.layers.linear import add_weight_grad_to_main_grad, fuses_grad_accumulation
from megaflow.layers.sharding import mark_tensor_parallel
from megaflow.parallel import state


class _Linear(nn.Module):
    """A bias-free weight [out, in] of one expert (the dispatcher, not the layer, does the matmul)."""

    def __init__(self, out_rows: int, in_cols: int, init_std: float, partition_dim, fused_sizes=None,
                 grouped: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_rows, in_cols, device=state.get().device))
        self.weight.init_std = init_std
        self.weight.expert_parallel = True
        self.weight.fusable_grad_accumulation = grouped   # _ExpertGroupedLinear can add into main_grad
        if partition_dim is not None:
            mark_tensor_parallel(self.weight, partition_dim, fused_sizes)


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, swiglu_act: bool, etp: int, init_std: float, output_std: float,
                 grouped: bool):
        super().__init__()
        sharded = etp > 1
        rows = ffn * (2 if swiglu_act else 1)
        self.linear_fc1 = _Linear(rows // etp, hidden, init_std, 0 if sharded else None,
                                  [ffn, ffn] if swiglu_act else None, grouped)
        self.linear_fc2 = _Linear(hidden, ffn // etp, output_std, 1 if sharded else None, grouped=grouped)


class Experts(nn.Module):
    def __init__(self, cfg, first_expert: int, num_local: int, etp: int, output_std: float):
        super().__init__()
        m, e = cfg.model, cfg.moe
        self.swiglu = m.swiglu
        self.grouped = e.moe_grouped_gemm
        self.gemm_backend = e.moe_grouped_gemm_backend
        self.act_backend = m.attention_backend
        self.local_experts = nn.ModuleDict({
            str(first_expert + i): ExpertMLP(m.hidden_size, e.moe_ffn_hidden_size, m.swiglu, etp,
                                             m.init_method_std, output_std, self.grouped)
            for i in range(num_local)})

    def _activation(self, h_nf):
        if self.swiglu:
            gate, up = h_nf.chunk(2, dim=-1)
            return swiglu(gate.contiguous(), up.contiguous(), backend=self.act_backend)
        return F.gelu(h_nf, approximate="tanh")

    def forward(self, x_nh: torch.Tensor, counts: list) -> torch.Tensor:
        experts = list(self.local_experts.values())
        if self.grouped:
            fc1 = [ex.linear_fc1.weight for ex in experts]
            rows = fc1[0].shape[0]
            # SwiGLU: gate and up as two grouped GEMMs, so neither output is a strided half of one.
            hs = _ExpertGroupedLinear.apply(x_nh, counts, [rows // 2] * 2 if self.swiglu else [rows],
                                            self.gemm_backend, *fc1)
            h = swiglu(*hs, backend=self.act_backend) if self.swiglu else F.gelu(hs[0], approximate="tanh")
            fc2 = [ex.linear_fc2.weight for ex in experts]
            return _ExpertGroupedLinear.apply(h, counts, [fc2[0].shape[0]], self.gemm_backend, *fc2)[0]
        outs = []
        for ex, x_e in zip(experts, x_nh.split(counts)):
            h = self._activation(F.linear(x_e, ex.linear_fc1.weight))
            outs.append(F.linear(h, ex.linear_fc2.weight))
        return torch.cat(outs) if outs else x_nh.new_zeros((0, x_nh.shape[1]))


class _ExpertGroupedLinear(torch.autograd.Function):
    """The local experts' linear layers as grouped GEMMs, one output per block of rows of the experts'
    weights (SwiGLU's fc1: gate rows, then up rows), taking the experts' own parameters.

    Forward stacks each block of rows of every expert's weight into [E, rows, in] (the grouped GEMM's
    operand; cast to the autocast dtype, as autograd would cast a linear layer). Backward returns each
    expert's weight gradient whole (its blocks written side by side, no zero-filled slice gradients),
    or, with --gradient-accumulation-fusion (the weights marked accumulate_into_main_grad), adds
    dy_e.T @ x_e straight into the expert's fp32 main_grad rows and returns none: autograd still runs
    the post-accumulate hooks, so the gradient buffers' bookkeeping is unchanged (layers/linear.py)."""

    @staticmethod
    def forward(ctx, x, counts, sizes, backend, *weights):
        counts = [int(c) for c in counts]
        if len(counts) != len(weights) or sum(counts) != x.shape[0]:
            raise ValueError(f"experts: counts {counts} do not match {len(weights)} experts and {x.shape[0]} rows")
        ctx.params = weights            # the parameters themselves, for their main_grad
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        blocks = [torch.stack([w[a:a + n] for w in weights]) for a, n in zip(starts, sizes)]
        offs = row_offsets(counts, x.device)
        products = grouped_products(backend, x)
        ctx.backend = resolve_backend(backend, x)
        ctx.save_for_backward(x, offs, *blocks)
        ctx.counts, ctx.sizes, ctx.products = counts, sizes, products
        return tuple(products[0](x, b, counts, offs) for b in blocks)

    @staticmethod
    def backward(ctx, *dys):
        x, offs, *blocks = ctx.saved_tensors
        _forward, input_grad, weight_grad = ctx.products
        counts, params = ctx.counts, ctx.params
        dx = None
        if ctx.needs_input_grad[0]:
            for dy, b in zip(dys, blocks):
                g = input_grad(dy, b, counts, offs)
                dx = g if dx is None else dx.add_(g)
        grads = [None] * len(params)
        if any(ctx.needs_input_grad[4:]):
            fuse = all(fuses_grad_accumulation(p) for p in params) and not torch.compiler.is_compiling()
            if fuse and ctx.backend == "torch":   # one addmm per expert and block, no [E, rows, in] temporary
                for p, x_e, *dy_e in zip(params, x.split(counts), *[dy.split(counts) for dy in dys]):
                    add_weight_grad_to_main_grad(p, dy_e, x_e, ctx.sizes)
                return (dx, None, None, None, *grads)
            dws = [weight_grad(dy, x, counts, offs) for dy in dys]          # [E, rows of the block, in]
            for e, p in enumerate(params):
                if fuse:
                    for rows, dw in zip(p.main_grad.split(ctx.sizes), dws):
                        rows.add_(dw[e])
                else:
                    grads[e] = dws[0][e] if len(dws) == 1 else torch.cat([dw[e] for dw in dws])
        return (dx, None, None, None, *grads)

