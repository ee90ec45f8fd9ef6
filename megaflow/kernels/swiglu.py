"""SwiGLU activation: x = [gate | up] on the last dimension -> silu(gate) * up."""
from __future__ import annotations

import torch.nn.functional as F

from megaflow.kernels.dispatch import resolve_backend


def swiglu_reference(x):
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swiglu(x, backend="auto"):
    backend = resolve_backend(backend, x)
    if backend == "torch":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise NotImplementedError(f"swiglu backend {backend!r}")
