"""Rotary position embeddings, "rotate half" (GPT-NeoX / Hugging Face Llama) convention.

Shapes: x_bnsd [batch, heads, seq, head_dim]; cos_sd, sin_sd [seq, head_dim] (or any shape that
broadcasts to x, e.g. [batch, 1, seq, head_dim] for per-sample positions).
Backends: "torch" (elementwise ops in x's dtype), "triton" (rope_triton.py: one fused pass, fp32
math, fp32 tables), "auto" (Triton on CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import torch

from megaflow.kernels.dispatch import OPTIONAL_BACKENDS, at_least_fp32, resolve_backend


def rotary_cos_sin(seq_len, head_dim, base=10000.0, device=None, position_ids=None):
    """cos/sin tables [seq, head_dim] in fp32 (angles repeated for both halves, as HF does).

    position_ids [seq] gives the positions explicitly; per-sample position_ids [batch, seq] (positions
    reset at document boundaries) give tables [batch, 1, seq, head_dim] that broadcast over heads."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32) if position_ids is None \
        else position_ids.float()
    angles = pos[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    if emb.dim() == 3:
        emb = emb.unsqueeze(1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(x_bnsd, cos_sd, sin_sd):
    xf = at_least_fp32(x_bnsd)
    return (xf * cos_sd + _rotate_half(xf) * sin_sd).to(x_bnsd.dtype)


class TritonRotaryFunction(torch.autograd.Function):
    """The backward is the same kernel with the rotation transposed; the tables get no gradient."""

    @staticmethod
    def forward(ctx, x_bnsd, cos_sd, sin_sd):
        from megaflow.kernels import rope_triton as kt
        ctx.save_for_backward(cos_sd, sin_sd)
        return kt.rope(x_bnsd, cos_sd, sin_sd)

    @staticmethod
    def backward(ctx, dout_bnsd):
        from megaflow.kernels import rope_triton as kt
        cos_sd, sin_sd = ctx.saved_tensors
        return kt.rope(dout_bnsd, cos_sd, sin_sd, backward=True), None, None


def apply_rotary(x_bnsd, cos_sd, sin_sd, backend="auto"):
    if backend in OPTIONAL_BACKENDS:
        # The model passes its attention backend here too; flash-attn and apex bring no wrapped
        # version of this op, so their names select this op's default ("auto").
        backend = "auto"
    backend = resolve_backend(backend, x_bnsd)
    if backend == "torch":
        return x_bnsd * cos_sd.to(x_bnsd.dtype) + _rotate_half(x_bnsd) * sin_sd.to(x_bnsd.dtype)
    if backend == "triton":
        return TritonRotaryFunction.apply(x_bnsd, cos_sd, sin_sd)
    raise ValueError(f"unknown rope backend {backend!r} (auto, torch, triton)")
