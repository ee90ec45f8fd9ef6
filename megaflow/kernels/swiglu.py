"""SwiGLU activation: silu(gate) * up.

Shapes: gate, up [..., f] -> [..., f]. The model passes the two blocks of its fused fc1 layer as
separate tensors (ColumnParallelLinear with separate_blocks=True), so neither direction needs a split view or a
concatenation. Backends: "torch" (two elementwise ops; autograd saves gate, up and the silu),
"triton" (swiglu_triton.py: one pass each way, fp32 math, saves only gate and up), "auto" (Triton on
CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import OPTIONAL_BACKENDS, at_least_fp32, resolve_backend


def swiglu_reference(gate, up):
    return (F.silu(at_least_fp32(gate)) * at_least_fp32(up)).to(gate.dtype)


class TritonSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from megaflow.kernels import swiglu_triton as kt
        ctx.save_for_backward(gate, up)
        return kt.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout):
        from megaflow.kernels import swiglu_triton as kt
        gate, up = ctx.saved_tensors
        return kt.swiglu_backward(gate, up, dout)


def swiglu(gate, up, backend="auto"):
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if backend in OPTIONAL_BACKENDS:
        # The model passes its attention backend here too; flash-attn and apex bring no wrapped
        # version of this op, so their names select this op's default ("auto").
        backend = "auto"
    backend = resolve_backend(backend, gate)
    if backend == "torch":
        return F.silu(gate) * up
    if backend == "triton":
        return TritonSwiGLUFunction.apply(gate, up)
    raise ValueError(f"unknown swiglu backend {backend!r} (auto, torch, triton)")
