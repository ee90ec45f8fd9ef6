"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add.

Shapes: x [..., n], weight and bias [n]. With `residual` (same shape as x) the functions compute
h = x + residual, normalise h, and return (y, h): h is the new residual stream, so a pre-norm
block does `y, resid = rms_norm(branch_out, w, eps, residual=resid)` in one pass. Without it they
return y. Outputs have the dtype of x, or of x + residual under torch's type promotion.

Backends: "torch" (F.layer_norm / F.rms_norm), "triton" (norm_triton.py; fp32 statistics, one row
per program, hidden size up to 32K for 16-bit inputs), "apex" (NVIDIA apex's fused norms, imported
when first used), "auto" (Triton on CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import at_least_fp32, resolve_backend


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(at_least_fp32(x), x.shape[-1:], at_least_fp32(weight),
                        None if bias is None else at_least_fp32(bias), eps).to(x.dtype)


def rms_norm_reference(x, weight, eps):
    xf = at_least_fp32(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * at_least_fp32(weight)).to(x.dtype)


class TritonNormFunction(torch.autograd.Function):
    """Saves h (x, or x + residual) and the fp32 per-row mean/rstd; the backward recomputes x-hat."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms):
        from megaflow.kernels import norm_triton as kt
        y, h, mean_r, rstd_r = kt.norm_forward(x, weight, bias, residual, eps, is_rms)
        ctx.save_for_backward(x if h is None else h, weight, mean_r, rstd_r)
        ctx.is_rms, ctx.has_bias = is_rms, bias is not None
        ctx.x_dtype = x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Gradients of outputs nobody used arrive as None instead of zero tensors.
        ctx.set_materialize_grads(False)
        if h is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_in=None):
        from megaflow.kernels import norm_triton as kt
        h, weight, mean_r, rstd_r = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dh, dw, db = kt.norm_backward(dy, dh_in, h, weight, ctx.has_bias, mean_r, rstd_r, ctx.is_rms)
        dx = dh.to(ctx.x_dtype)
        dres = None if ctx.res_dtype is None else dh.to(ctx.res_dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        return dx, dw, db, dres, None, None


def _apex(x, weight, bias, eps, is_rms):
    """NVIDIA apex's fused norms, imported here only: apex builds from source with CUDA and the
    PyPI package named "apex" is an unrelated project, so a failed import gets a clear message."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    except ImportError as e:
        raise RuntimeError("norm backend 'apex' needs NVIDIA apex built with its CUDA extensions "
                           f"(github.com/NVIDIA/apex; the PyPI 'apex' is another project): {e}") from e
    if is_rms:
        return fused_rms_norm_affine(x, weight, x.shape[-1:], eps)
    if bias is None:
        bias = torch.zeros_like(weight)
    return fused_layer_norm_affine(x, weight, bias, x.shape[-1:], eps)


def _norm(x, weight, bias, eps, backend, residual, is_rms):
    backend = resolve_backend(backend, x, optional_package="apex")
    if backend == "triton":
        return TritonNormFunction.apply(x, weight, bias, residual, eps, is_rms)
    h = x if residual is None else x + residual
    if backend == "torch":
        y = F.rms_norm(h, h.shape[-1:], weight, eps) if is_rms else F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    elif backend == "apex":
        y = _apex(h, weight, bias, eps, is_rms)
    else:
        raise ValueError(f"unknown norm backend {backend!r} (auto, torch, triton, apex)")
    return y if residual is None else (y, h)


def layer_norm(x, weight, bias, eps=1e-5, backend="auto", residual=None):
    """LayerNorm(x) -> y; with residual: LayerNorm(x + residual) -> (y, x + residual)."""
    return _norm(x, weight, bias, eps, backend, residual, is_rms=False)


def rms_norm(x, weight, eps=1e-5, backend="auto", residual=None):
    """RMSNorm(x) -> y; with residual: RMSNorm(x + residual) -> (y, x + residual)."""
    return _norm(x, weight, None, eps, backend, residual, is_rms=True)
