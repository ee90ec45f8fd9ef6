"""SwiGLU in Triton: out = silu(gate) * up with x = [gate | up] on the last dimension.

Legend: rows = leading dimensions flattened, f = output width (x has 2f columns), BLOCK columns
per program.
    x_r2f [rows, 2f]   out_rf, dout_rf [rows, f]   dx_r2f [rows, 2f] = [dgate | dup]

Forward and backward are elementwise over (row, column block) programs, fp32 math:
    sig = sigmoid(gate)    out = gate * sig * up
    dup = dout * gate * sig          dgate = dout * up * sig * (1 + gate * (1 - sig))
The backward recomputes sigmoid from the saved input rather than saving it (one [rows, 2f] tensor
saved instead of three).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import INTERPRET, check_tensors, next_pow2


@triton.jit
def _swiglu_fwd_kernel(X, OUT, stride_x, stride_o, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + f + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DOUT, DX, stride_x, stride_do, stride_dx, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + f + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * gate * sig
    tl.store(DX + row * stride_dx + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + f + cols, dup.to(DX.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(rows, f):
    # GPU: 1K-column blocks (4 warps x 8 elements x 32 lanes); interpreter: whole rows at once.
    block = min(next_pow2(f), 16384 if INTERPRET else 1024)
    return (rows, triton.cdiv(f, block)), block


def swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    check_tensors("swiglu", x)
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even ([gate | up]), got {x.shape[-1]}")
    f = x.shape[-1] // 2
    x_r2f = _rows(x)
    out_rf = torch.empty(x_r2f.shape[0], f, dtype=x.dtype, device=x.device)
    grid, block = _launch(x_r2f.shape[0], f)
    if out_rf.numel():
        _swiglu_fwd_kernel[grid](x_r2f, out_rf, x_r2f.stride(0), out_rf.stride(0), f, BLOCK=block, num_warps=4)
    return out_rf.view(*x.shape[:-1], f)


def swiglu_backward(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    f = x.shape[-1] // 2
    x_r2f, dout_rf = _rows(x), _rows(dout)
    dx_r2f = torch.empty(x_r2f.shape, dtype=x.dtype, device=x.device)
    grid, block = _launch(x_r2f.shape[0], f)
    if dx_r2f.numel():
        _swiglu_bwd_kernel[grid](x_r2f, dout_rf, dx_r2f, x_r2f.stride(0), dout_rf.stride(0), dx_r2f.stride(0), f,
                                 BLOCK=block, num_warps=4)
    return dx_r2f.view(x.shape)
