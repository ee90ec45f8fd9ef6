"""SwiGLU in Triton: out = silu(gate) * up, gate and up two tensors of the same shape.

Legend: rows = leading dimensions flattened, f = width, BLOCK columns per program.
    gate_rf, up_rf, out_rf, dout_rf, dgate_rf, dup_rf  [rows, f]

Forward and backward are elementwise over (row, column block) programs, fp32 math:
    sig = sigmoid(gate)    out = gate * sig * up
    dup = dout * gate * sig          dgate = dout * up * sig * (1 + gate * (1 - sig))
The backward recomputes sigmoid from the saved inputs rather than saving it (two [rows, f] tensors
saved instead of three).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import INTERPRET, check_tensors, next_pow2


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, stride_g, stride_u, stride_o, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(GATE, UP, DOUT, DGATE, DUP, stride_g, stride_u, stride_do, stride_dg, stride_du, f,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * gate * sig
    tl.store(DGATE + row * stride_dg + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * stride_du + cols, dup.to(DUP.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(rows, f):
    # GPU: 1K-column blocks (4 warps x 8 elements x 32 lanes); interpreter: whole rows at once.
    block = min(next_pow2(f), 16384 if INTERPRET else 1024)
    return (rows, triton.cdiv(f, block)), block


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_tensors("swiglu", gate, up)
    f = gate.shape[-1]
    gate_rf, up_rf = _rows(gate), _rows(up)
    out_rf = torch.empty(gate_rf.shape, dtype=gate.dtype, device=gate.device)
    grid, block = _launch(gate_rf.shape[0], f)
    if out_rf.numel():
        _swiglu_fwd_kernel[grid](gate_rf, up_rf, out_rf, gate_rf.stride(0), up_rf.stride(0), out_rf.stride(0), f,
                                 BLOCK=block, num_warps=4)
    return out_rf.view(gate.shape)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor) -> tuple:
    f = gate.shape[-1]
    gate_rf, up_rf, dout_rf = _rows(gate), _rows(up), _rows(dout)
    dgate_rf = torch.empty(gate_rf.shape, dtype=gate.dtype, device=gate.device)
    dup_rf = torch.empty(up_rf.shape, dtype=up.dtype, device=up.device)
    grid, block = _launch(gate_rf.shape[0], f)
    if dgate_rf.numel():
        _swiglu_bwd_kernel[grid](gate_rf, up_rf, dout_rf, dgate_rf, dup_rf, gate_rf.stride(0), up_rf.stride(0),
                                 dout_rf.stride(0), dgate_rf.stride(0), dup_rf.stride(0), f,
                                 BLOCK=block, num_warps=4)
    return dgate_rf.view(gate.shape), dup_rf.view(up.shape)
