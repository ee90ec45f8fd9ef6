"""Rotary position embeddings, "rotate half" (GPT-NeoX / Hugging Face Llama) convention.

Shapes: x_bnsd [batch, heads, seq, head_dim]; cos_sd, sin_sd [seq, head_dim] (or any shape that
broadcasts to x, e.g. [batch, 1, seq, head_dim] for per-sample positions).
Backends: "torch" (elementwise ops in x's dtype), "triton" (rope_triton.py: one fused pass, fp32
math, fp32 tables), "auto" (Triton on CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megaflow.kernels.dispatch import OPTIONAL_BACKENDS, at_least_fp32, resolve_backend


@dataclass(frozen=True)
class YarnScaling:
    """YaRN (Peng et al. 2023) as DeepSeek-V3 and transformers use it: frequencies that turn fewer than
    beta_slow times over the original context are interpolated by `factor`, those turning more than
    beta_fast times are kept, with a linear ramp between; the tables carry attention_factor."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def attention_factor(self) -> float:
        """Multiplies cos and sin (so each q·k product by its square); 1 when mscale = mscale_all_dim."""
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale_factor(scaling: YarnScaling) -> float:
    """DeepSeek's softmax temperature: the softmax scale is multiplied by mscale(factor, mscale_all_dim)²."""
    return _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2 if scaling.mscale_all_dim else 1.0


def _yarn_inv_freq(head_dim: int, base: float, s: YarnScaling, device=None) -> torch.Tensor:
    def correction_dim(rotations):  # the dimension whose frequency turns `rotations` times over the context
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / max(high - low, 1e-3)).clamp(0, 1)
    freq = base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    keep = 1 - ramp                                     # 1: extrapolate (high frequencies), 0: interpolate
    return (1.0 / (s.factor * freq)) * (1 - keep) + (1.0 / freq) * keep


def rotary_cos_sin(seq_len, head_dim, base=10000.0, device=None, position_ids=None,
                   scaling: Optional[YarnScaling] = None):
    """cos/sin tables [seq, head_dim] in fp32 (angles repeated for both halves, as HF does).

    position_ids [seq] gives the positions explicitly; per-sample position_ids [batch, seq] (positions
    reset at document boundaries) give tables [batch, 1, seq, head_dim] that broadcast over heads.
    scaling: YaRN's frequencies and attention factor (--rope-type yarn)."""
    if scaling is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    else:
        inv_freq = _yarn_inv_freq(head_dim, base, scaling, device)
    pos = torch.arange(seq_len, device=device, dtype=torch.float32) if position_ids is None \
        else position_ids.float()
    angles = pos[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    if emb.dim() == 3:
        emb = emb.unsqueeze(1)
    if scaling is None:
        return emb.cos(), emb.sin()
    return emb.cos() * scaling.attention_factor, emb.sin() * scaling.attention_factor


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
