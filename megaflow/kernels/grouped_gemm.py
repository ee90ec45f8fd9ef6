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


def row_offsets(counts, device) -> torch.Tensor:
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


def _use_grouped_mm(a, b) -> bool:
    return _grouped_mm_ok(a, b) and a.dtype == b.dtype


def grouped_products(backend: str, x):
    """The three grouped products of a grouped linear layer on this backend ("torch" or "triton",
    as resolved for x), without autograd: (forward y = x_e @ w_e.T, input gradient dx = dy_e @ w_e,
    weight gradient dw[e] = dy_e.T @ x_e). Each takes (a, b, counts, offs); offs are the int32
    cumulative row ends on the device (row_offsets), computed once per layer call."""
    if resolve_backend(backend, x) == "triton":
        from megaflow.kernels import grouped_gemm_triton as kt
        return (lambda a, w, counts, offs: kt.grouped_xwt(a.contiguous(), w.contiguous(), offs),
                lambda dy, w, counts, offs: kt.grouped_xw(dy.contiguous(), w.contiguous(), offs),
                lambda dy, a, counts, offs: kt.grouped_dw(dy.contiguous(), a.contiguous(), offs))

    def forward(a, w, counts, offs):
        a, w = a.contiguous(), w.contiguous()
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs) if _use_grouped_mm(a, w) else \
            grouped_linear_reference(a, w, counts)

    def input_grad(dy, w, counts, offs):
        dy, w = dy.contiguous(), w.contiguous()
        if _use_grouped_mm(dy, w):
            return torch._grouped_mm(dy, w, offs=offs)
        outs = [de @ we for de, we in zip(dy.split(counts), w.unbind(0))]
        return torch.cat(outs) if outs else dy.new_zeros((0, w.shape[2]))

    def weight_grad(dy, a, counts, offs):
        dy, a = dy.contiguous(), a.contiguous()
        if _use_grouped_mm(dy, a):
            return torch._grouped_mm(dy.t(), a, offs=offs)                # [E, n, k]
        return torch.stack([de.t() @ ae for de, ae in zip(dy.split(counts), a.split(counts))])
    return forward, input_grad, weight_grad


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, backend):
        ctx.products = grouped_products(backend, x)
        offs = row_offsets(counts, x.device)
        ctx.save_for_backward(x, w, offs)
        ctx.counts = counts
        return ctx.products[0](x, w, counts, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        _forward, input_grad, weight_grad = ctx.products
        dx = input_grad(dy, w, ctx.counts, offs) if ctx.needs_input_grad[0] else None
        dw = weight_grad(dy, x, ctx.counts, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def _check_counts(x, w, counts) -> list:
    counts = [int(c) for c in counts]
    if len(counts) != w.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: counts {counts} do not match x {tuple(x.shape)} and w {tuple(w.shape)}")
    return counts


def grouped_linear(x, w, counts, backend: str = "auto"):
    """y = per-expert x_e @ w[e].T over consecutive row runs of `counts` (a list of ints)."""
    counts = _check_counts(x, w, counts)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown grouped GEMM backend {backend!r} (auto, torch, triton)")
    return _GroupedLinear.apply(x, w, counts, backend)
