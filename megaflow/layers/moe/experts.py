"""The experts of one MoE layer held by this rank: E/EP experts, each an MLP (SwiGLU or GeLU, no
biases) of width --moe-ffn-hidden-size, split over the expert-tensor-parallel ranks like the dense
MLP when ETP = TP (fc1 by output rows, [gate; up] blocks each split on its own; fc2 by input columns),
whole when ETP = 1.

Every expert keeps its own parameters, named by its *global* expert index
(`local_experts.{e}.linear_fc1.weight`, Megatron-Core's SequentialMLP names): initial values, checkpoints
and resharding across EP follow from the name alone. Each parameter carries `expert_parallel = True`:
its gradient is reduced over the expert-data-parallel group and ZeRO shards it there (optim/).

Input: rows sorted by local expert with `counts` rows each. With --moe-grouped-gemm the local experts'
weights are stacked and run as one grouped GEMM (kernels/grouped_gemm.py); otherwise one matmul each.
The output of fc2 is a partial sum over the ETP ranks; the dispatcher reduce-scatters it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.kernels.grouped_gemm import grouped_linear
from megaflow.kernels.swiglu import swiglu
from megaflow.layers.sharding import mark_tensor_parallel
from megaflow.parallel import state


class _Linear(nn.Module):
    """A bias-free weight [out, in] of one expert (the dispatcher, not the layer, does the matmul)."""

    def __init__(self, out_rows: int, in_cols: int, init_std: float, partition_dim, fused_sizes=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_rows, in_cols, device=state.get().device))
        self.weight.init_std = init_std
        self.weight.expert_parallel = True
        if partition_dim is not None:
            mark_tensor_parallel(self.weight, partition_dim, fused_sizes)


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, swiglu_act: bool, etp: int, init_std: float, output_std: float):
        super().__init__()
        sharded = etp > 1
        rows = ffn * (2 if swiglu_act else 1)
        self.linear_fc1 = _Linear(rows // etp, hidden, init_std, 0 if sharded else None,
                                  [ffn, ffn] if swiglu_act else None)
        self.linear_fc2 = _Linear(hidden, ffn // etp, output_std, 1 if sharded else None)


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
                                             m.init_method_std, output_std)
            for i in range(num_local)})

    def _activation(self, h_nf):
        if self.swiglu:
            gate, up = h_nf.chunk(2, dim=-1)
            return swiglu(gate.contiguous(), up.contiguous(), backend=self.act_backend)
        return F.gelu(h_nf, approximate="tanh")

    def forward(self, x_nh: torch.Tensor, counts: list) -> torch.Tensor:
        experts = list(self.local_experts.values())
        if self.grouped:
            rows = experts[0].linear_fc1.weight.shape[0] // 2 if self.swiglu else None
            # SwiGLU: gate and up as two grouped GEMMs, so neither output is a strided half of one.
            w1s = [torch.stack([ex.linear_fc1.weight[:rows] for ex in experts]),
                   torch.stack([ex.linear_fc1.weight[rows:] for ex in experts])] if self.swiglu else \
                [torch.stack([ex.linear_fc1.weight for ex in experts])]
            w2 = torch.stack([ex.linear_fc2.weight for ex in experts])
            if torch.is_autocast_enabled(x_nh.device.type):  # a custom op: cast like autocast would
                dtype = torch.get_autocast_dtype(x_nh.device.type)
                x_nh, w1s, w2 = x_nh.to(dtype), [w.to(dtype) for w in w1s], w2.to(dtype)
            hs = [grouped_linear(x_nh, w, counts, self.gemm_backend) for w in w1s]
            h = swiglu(*hs, backend=self.act_backend) if self.swiglu else F.gelu(hs[0], approximate="tanh")
            return grouped_linear(h, w2, counts, self.gemm_backend)
        outs = []
        for ex, x_e in zip(experts, x_nh.split(counts)):
            h = self._activation(F.linear(x_e, ex.linear_fc1.weight))
            outs.append(F.linear(h, ex.linear_fc2.weight))
        return torch.cat(outs) if outs else x_nh.new_zeros((0, x_nh.shape[1]))
