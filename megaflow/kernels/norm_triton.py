"""LayerNorm and RMSNorm in Triton, forward and backward, with an optional fused residual add.

Legend: rows = every leading dimension flattened, n = normalised (hidden) size, BLOCK = n rounded
up to a power of two (one row is one tile held in registers).
    x_rn, residual_rn [rows, n]   h_rn = x + residual (the new residual stream), or x itself
    y_rn [rows, n]                mean_r, rstd_r [rows] fp32 (mean unused by RMSNorm)
    weight_n, bias_n [n]          dw_part_pn, db_part_pn [programs, n] fp32 partial weight grads

Forward: one program per row, all statistics in fp32. With a residual the kernel writes h rounded
to its dtype and normalises that rounded h, so y == norm(h) exactly as the torch backend computes
it, and the backward (which reloads h) differentiates the function the forward evaluated.
Backward: a fixed number of programs each walks a contiguous chunk of rows, writing dx and
accumulating dweight/dbias partial sums in registers; the host adds the partials (no atomics, so
the result is deterministic). A gradient flowing into h from later layers is added to dx in the
same pass (the residual branch's gradient), and dx is then also the gradient of the residual.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import check_tensors, next_pow2, num_programs_for_rows, row_kernel_warps

# One row must fit in registers: 64 KB of fp16/bf16, as in Triton's LayerNorm tutorial.
MAX_FUSED_BYTES = 65536


@triton.jit
def _norm_fwd_kernel(X, RES, W, B, Y, H, MEAN, RSTD, stride_x, stride_res, stride_y, stride_h, n, eps,
                     IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n
        tl.store(MEAN + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(DY, H, W, MEAN, RSTD, DH_IN, DX, DW_PART, DB_PART,
                     stride_dy, stride_h, stride_dh_in, stride_dx, n_rows, n, rows_per_program,
                     IS_RMS: tl.constexpr, HAS_DH_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    # int64 row indices (the loop variable inherits the bounds' type): rows * stride may pass 2^31.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(MEAN + row64)) * rstd, 0.0)
        wdy = w * dy
        # d/dh of norm: rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)); RMSNorm has no mean term.
        c1 = tl.sum(xhat * wdy, axis=0) / n
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / n
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH_IN:
            dx = dx + tl.load(DH_IN + row64 * stride_dh_in + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * n + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n + cols, db, mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [rows, n] without a copy when rows are evenly strided and columns contiguous."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(n: int, dtype: torch.dtype) -> int:
    block = next_pow2(n)
    if block * torch.empty((), dtype=dtype).element_size() > MAX_FUSED_BYTES:
        raise ValueError(f"norm: hidden size {n} is too large for the fused Triton kernel "
                         f"(one row must fit in {MAX_FUSED_BYTES} bytes); use backend 'torch'")
    return block


def norm_forward(x, weight, bias, residual, eps, is_rms):
    """(y, h_rn, mean_r, rstd_r). y (and h, which is None without a residual) have the dtype of x,
    or of x + residual (torch's type promotion) with a residual."""
    check_tensors("norm", x, weight, bias, residual)
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"norm: weight/bias must be [{n}] for input {tuple(x.shape)}")
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    x_rn = _rows(x, n)
    res_rn = None if residual is None else _rows(residual, n)
    rows = x_rn.shape[0]
    y_rn = torch.empty(rows, n, dtype=out_dtype, device=x.device)
    h_rn = None if residual is None else torch.empty(rows, n, dtype=out_dtype, device=x.device)
    mean_r = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd_r = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = _block(n, out_dtype)
    if rows:
        _norm_fwd_kernel[(rows,)](
            x_rn, res_rn if res_rn is not None else x_rn, weight, bias if bias is not None else weight,
            y_rn, h_rn if h_rn is not None else y_rn, mean_r, rstd_r,
            x_rn.stride(0), res_rn.stride(0) if res_rn is not None else 0, y_rn.stride(0),
            h_rn.stride(0) if h_rn is not None else 0, n, eps,
            IS_RMS=is_rms, HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=row_kernel_warps(block))
    shape = x.shape[:-1] + (n,)
    return y_rn.view(shape), (None if h_rn is None else h_rn.view(shape)), mean_r, rstd_r


def norm_backward(dy, dh_in, h, weight, has_bias, mean_r, rstd_r, is_rms):
    """(dh, dweight, dbias): dh = d(loss)/d(h) including the gradient dh_in that reached h directly
    (None if h was not used elsewhere); dh is also the gradient of x and of the residual."""
    n = h.shape[-1]
    h_rn, dy_rn = _rows(h, n), _rows(dy, n)
    dh_in_rn = None if dh_in is None else _rows(dh_in, n)
    rows = h_rn.shape[0]
    dx_rn = torch.empty(rows, n, dtype=h.dtype, device=h.device)
    programs = num_programs_for_rows(rows, h.device)
    dw_part = torch.zeros(programs, n, dtype=torch.float32, device=h.device)
    db_part = torch.zeros(programs, n, dtype=torch.float32, device=h.device) if has_bias else dw_part
    block = _block(n, h.dtype)
    if rows:
        _norm_bwd_kernel[(programs,)](
            dy_rn, h_rn, weight, mean_r, rstd_r, dh_in_rn if dh_in_rn is not None else dy_rn, dx_rn,
            dw_part, db_part, dy_rn.stride(0), h_rn.stride(0),
            dh_in_rn.stride(0) if dh_in_rn is not None else 0, dx_rn.stride(0), rows, n,
            triton.cdiv(rows, programs), IS_RMS=is_rms, HAS_DH_IN=dh_in is not None, HAS_BIAS=has_bias,
            BLOCK=block, num_warps=row_kernel_warps(block))
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx_rn.view(h.shape), dw, db
