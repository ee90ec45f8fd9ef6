"""Rotary position embedding in Triton, rotate-half (GPT-NeoX / Hugging Face Llama) convention.

Legend: b batch, n heads, s sequence, d head dim, half = d // 2, BLOCK_H = half rounded up to a
power of two, BLOCK_S sequence positions per program.
    x_bnsd [b, n, s, d] any strides with unit stride on d     out_bnsd like x
    cos_bnsd, sin_bnsd: the tables broadcast (expanded, zero strides) to x's shape, so [s, d],
    [1, 1, s, d] or per-sample [b, 1, s, d] (e.g. positions reset at document boundaries) all work.

With x = [x1 | x2] and tables [c1 | c2], [s1 | s2] (HF repeats the angles, so c1 == c2, but
nothing here assumes it):
    forward   out1 = x1*c1 - x2*s1        out2 = x2*c2 + x1*s2
    backward  dx1  = g1*c1 + g2*s2        dx2  = g2*c2 - g1*s1     (the transposed rotation)
One kernel does both (BACKWARD flag). The tables are constants: no gradient flows into them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import INTERPRET, check_tensors, next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, stride_xb, stride_xn, stride_xs, stride_cb, stride_cn, stride_cs,
                 stride_sb, stride_sn, stride_ss, stride_ob, stride_on, stride_os, n_heads, s, half,
                 BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    bn = tl.program_id(1)
    b = (bn // n_heads).to(tl.int64)
    hd = (bn % n_heads).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_s[:, None] < s) & (offs_h[None, :] < half)
    x_ptr = X + b * stride_xb + hd * stride_xn + offs_s[:, None] * stride_xs + offs_h[None, :]
    c_ptr = COS + b * stride_cb + hd * stride_cn + offs_s[:, None] * stride_cs + offs_h[None, :]
    s_ptr = SIN + b * stride_sb + hd * stride_sn + offs_s[:, None] * stride_ss + offs_h[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_ptr = OUT + b * stride_ob + hd * stride_on + offs_s[:, None] * stride_os + offs_h[None, :]
    tl.store(o_ptr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, o2.to(OUT.dtype.element_ty), mask=mask)


def _table(t: torch.Tensor, shape) -> torch.Tensor:
    """A cos/sin table as a [b, n, s, d] view of x's shape (zero strides where it broadcasts)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.expand(shape)
    except RuntimeError as e:
        raise ValueError(f"rope: table {tuple(t.shape)} does not broadcast to x {tuple(shape)}") from e


def rope(x_bnsd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Rotate x (forward) or a gradient (backward=True); returns a new [b, n, s, d] tensor."""
    check_tensors("rope", x_bnsd, cos, sin)
    if x_bnsd.dim() != 4 or x_bnsd.shape[-1] % 2:
        raise ValueError(f"rope: x must be [b, n, s, d] with even d, got {tuple(x_bnsd.shape)}")
    if x_bnsd.stride(-1) != 1:
        x_bnsd = x_bnsd.contiguous()
    b, n, s, d = x_bnsd.shape
    cos_bnsd, sin_bnsd = _table(cos, x_bnsd.shape), _table(sin, x_bnsd.shape)
    out_bnsd = torch.empty_like(x_bnsd)
    if out_bnsd.stride(-1) != 1:
        out_bnsd = torch.empty(x_bnsd.shape, dtype=x_bnsd.dtype, device=x_bnsd.device)
    block_h = next_pow2(d // 2)
    # ~4K elements per program on the GPU; the interpreter prefers fewer, larger programs.
    block_s = min(next_pow2(s), max(1, (16384 if INTERPRET else 4096) // block_h))
    if x_bnsd.numel():
        _rope_kernel[(triton.cdiv(s, block_s), b * n)](
            x_bnsd, cos_bnsd, sin_bnsd, out_bnsd, *x_bnsd.stride()[:3], *cos_bnsd.stride()[:3],
            *sin_bnsd.stride()[:3], *out_bnsd.stride()[:3], n, s, d // 2,
            BACKWARD=backward, BLOCK_S=block_s, BLOCK_H=block_h, num_warps=4)
    return out_bnsd
