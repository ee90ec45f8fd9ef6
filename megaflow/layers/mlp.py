"""The dense MLP: column-parallel fc1 (GeLU, or SwiGLU over [gate; up] blocks), row-parallel fc2.

Used as the transformer layer's MLP and as the MoE layer's shared expert (a different width)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from megaflow.kernels.swiglu import swiglu
from megaflow.layers.linear import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, cfg, output_std: float, ffn_hidden_size: Optional[int] = None):
        super().__init__()
        m, sp = cfg.model, cfg.parallel.sequence_parallel
        ffn = ffn_hidden_size or m.ffn_hidden_size
        self.swiglu = m.swiglu
        fc1_sizes = [ffn, ffn] if m.swiglu else None  # [gate; up]
        self.linear_fc1 = ColumnParallelLinear(m.hidden_size, ffn * (2 if m.swiglu else 1),
                                               bias=m.add_bias_linear, sequence_parallel=sp,
                                               fused_sizes=fc1_sizes, init_std=m.init_method_std,
                                               separate_blocks=m.swiglu)
        self.linear_fc2 = RowParallelLinear(ffn, m.hidden_size, bias=m.add_bias_linear,
                                            sequence_parallel=sp, init_std=output_std)
        self.backend = m.attention_backend

    def forward(self, x_sbh):
        if self.swiglu:
            h = swiglu(*self.linear_fc1(x_sbh), backend=self.backend)
        else:
            h = F.gelu(self.linear_fc1(x_sbh), approximate="tanh")
        return self.linear_fc2(h)
