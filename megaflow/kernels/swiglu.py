"""SwiGLU activation: x = [gate | up] on the last dimension -> silu(gate) * up.

Shapes: x [..., 2f] -> [..., f]. Backends: "torch" (two elementwise ops, autograd saves both
halves and the silu), "triton" (swiglu_triton.py: one pass each way, fp32 math, saves only x),
"auto" (Triton on CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import OPTIONAL_BACKENDS, at_least_fp32, resolve_backend


def swiglu_reference(x):
    gate, up = at_least_fp32(x).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


class TritonSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        from megaflow.kernels import swiglu_triton as kt
        ctx.save_for_backward(x)
        return kt.swiglu_forward(x)

    @staticmethod
    def backward(ctx, dout):
        from megaflow.kernels import swiglu_triton as kt
        (x,) = ctx.saved_tensors
        return kt.swiglu_backward(x, dout)


def swiglu(x, backend="auto"):
    if backend in OPTIONAL_BACKENDS:
        # The model passes its attention backend here too; flash-attn and apex bring no wrapped
        # version of this op, so their names select this op's default ("auto").
        backend = "auto"
    backend = resolve_backend(backend, x)
    if backend == "torch":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    if backend == "triton":
        return TritonSwiGLUFunction.apply(x)
    raise ValueError(f"unknown swiglu backend {backend!r} (auto, torch, triton)")
