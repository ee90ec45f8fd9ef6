"""LayerNorm and RMSNorm modules over the kernels' dispatch. Their parameters are replicated across
TP; with sequence parallelism each rank normalises only its tokens, so the parameters are marked for
the all-reduce of their gradients across TP."""
from __future__ import annotations

import torch
from torch import nn

from megaflow.kernels import norm as norm_kernels
from megaflow.parallel import state


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "auto", sequence_parallel=False):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=state.get().device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=state.get().device))
        self.weight.sequence_parallel = self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        return norm_kernels.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "auto", sequence_parallel=False):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=state.get().device))
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        return norm_kernels.rms_norm(x, self.weight, self.eps, backend=self.backend)


def build_norm(kind: str, hidden_size: int, eps: float, backend: str, sequence_parallel: bool = False):
    cls = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[kind]
    return cls(hidden_size, eps, backend, sequence_parallel)
