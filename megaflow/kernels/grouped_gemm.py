"""Grouped GEMM: one matmul per expert over its contiguous run of rows, all experts in one call.

Shapes: x [N, k] with the rows of expert e in [offs[e-1], offs[e]) (counts[e] rows each, any count
including 0); w [E, n, k] (nn.Linear layout, out × in, one matrix per expert) -> y [N, n],
y[rows of e] = x[rows of e] @ w[e].T.

Backends:
  torch   torch._grouped_mm where this build has it and the shapes suit it (row strides a multiple of 16
          bytes), else a loop of F.linear. The backward is the same two grouped products:
          dx = grouped(dy, w) and dw[e] = dy_e.T @ x_e (a grouped product over the row dimension).
  triton  grouped_gemm_triton.py: one kernel launch per product, tiles walk the expert boundaries;
          fp32 accumulation.
  auto    Triton on CUDA tensors, torch otherwise (kernels/dispatch.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import resolve_backend


def _offsets(counts, device) -> torch.Tensor:
    return torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), 0).to(device=device, dtype=torch.int32)


def _grouped_mm_ok(*tensors) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        align = 16 // t.element_size()
        if any(d % align for d in t.shape[-2:]) or t.shape[-2] == 0:
            return False
    return True


def grouped_linear_reference(x, w, counts):
    """The plain loop: what every backend must equal."""
    outs = [F.linear(xe, we) for xe, we in zip(x.split(list(counts)), w.unbind(0))]
    return torch.cat(outs) if outs else x.new_zeros((0, w.shape[1]))


class _TorchGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        offs = _offsets(counts, x.device)
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if ctx.needs_input_grad[1] else None  # [E, n, k]
        return dx, dw, None


class _TritonGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        from megaflow.kernels import grouped_gemm_triton as kt
        offs = _offsets(counts, x.device)
        ctx.save_for_backward(x, w, offs)
        return kt.grouped_xwt(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        from megaflow.kernels import grouped_gemm_triton as kt
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = kt.grouped_xw(dy, w, offs) if ctx.needs_input_grad[0] else None
        dw = kt.grouped_dw(dy, x, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear(x, w, counts, backend: str = "auto"):
    """y = per-expert x_e @ w[e].T over consecutive row runs of `counts` (a list of ints)."""
    counts = [int(c) for c in counts]
    if len(counts) != w.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: counts {counts} do not match x {tuple(x.shape)} and w {tuple(w.shape)}")
    backend = resolve_backend(backend, x)
    if backend == "torch":
        x, w = x.contiguous(), w.contiguous()
        if _grouped_mm_ok(x, w) and x.dtype == w.dtype:
            return _TorchGroupedLinear.apply(x, w, counts)
        return grouped_linear_reference(x, w, counts)
    if backend == "triton":
        return _TritonGroupedLinear.apply(x.contiguous(), w.contiguous(), counts)
    raise ValueError(f"unknown grouped GEMM backend {backend!r} (auto, torch, triton)")
