"""LayerNorm and RMSNorm over the last dimension."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import resolve_backend


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(),
                        eps).to(x.dtype)


def rms_norm_reference(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-5, backend="auto"):
    backend = resolve_backend(backend, x, optional_package="apex")
    if backend == "torch":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    raise NotImplementedError(f"norm backend {backend!r}")


def rms_norm(x, weight, eps=1e-5, backend="auto"):
    backend = resolve_backend(backend, x, optional_package="apex")
    if backend == "torch":
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    raise NotImplementedError(f"norm backend {backend!r}")
