"""LayerNorm and RMSNorm in Triton, forward and backward, with an optional fused residual add.

Legend: rows = every leading dimension flattened, n = normalised (hidden) size, BLOCK_N = n rounded
up to a power of two, BLOCK_R rows per tile (a tile [BLOCK_R, BLOCK_N] is held in registers).
    x_rn, residual_rn [rows, n]   h_rn = x + residual (the new residual stream), or x itself
    y_rn [rows, n]                mean_r, rstd_r [rows] fp32 (mean unused by RMSNorm)
    weight_n, bias_n [n]          dw_part_pn, db_part_pn [programs, n] fp32 partial weight grads

Forward: one program per tile of BLOCK_R rows (several rows when the hidden size is small, so
small-hidden norms still give each program a few thousand elements), statistics in fp32. With a
residual the kernel writes h rounded to its dtype and normalises that rounded h, so y == norm(h)
exactly as the torch backend computes it, and the backward (which reloads h) differentiates the
function the forward evaluated.
Backward: a fixed number of programs each walks a contiguous chunk of rows tile by tile, writing
dx and accumulating dweight/dbias partial sums in registers; the host adds the partials (no
atomics, so the result is deterministic). A gradient flowing into h from later layers is added
to dx in the same pass (the residual branch's gradient); dx is then also the residual's gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import (INTERPRET, check_tensors, next_pow2, num_programs_for_rows,
                                           row_kernel_warps)

# One row must fit in registers: 64 KB of fp16/bf16, as in Triton's LayerNorm tutorial.
MAX_FUSED_BYTES = 65536


@triton.jit
def _norm_fwd_kernel(X, RES, W, B, Y, H, MEAN, RSTD, stride_x, stride_res, stride_y, stride_h, n_rows, n, eps,
                     IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n
        tl.store(MEAN + rows, mean, mask=row_ok)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(DY, H, W, MEAN, RSTD, DH_IN, DX, DW_PART, DB_PART,
                     stride_dy, stride_h, stride_dh_in, stride_dx, n_rows, n, rows_per_program,
                     IS_RMS: tl.constexpr, HAS_DH_IN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 row indices (the loop variable inherits the bounds' type): rows * stride may pass 2^31.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        # d/dh of norm: rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)); RMSNorm has no mean term.
        c1 = tl.sum(xhat * wdy, axis=1) / n
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / n
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH_IN:
            dx = dx + tl.load(DH_IN + rows[:, None] * stride_dh_in + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)  # rows past the chunk loaded dy = 0
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * n + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n + cols, db, mask=col_ok)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [rows, n] without a copy when rows are evenly strided and columns contiguous."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(n: int, rows: int, dtype: torch.dtype, tile_elems: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N): whole rows, stacked up to tile_elems elements per tile. The interpreter
    uses a quarter of that, so that test-sized inputs still span several tiles and programs."""
    block_n = next_pow2(n)
    if block_n * torch.empty((), dtype=dtype).element_size() > MAX_FUSED_BYTES:
        raise ValueError(f"norm: hidden size {n} is too large for the fused Triton kernel "
                         f"(one row must fit in {MAX_FUSED_BYTES} bytes); use backend 'torch'")
    budget = tile_elems // 4 if INTERPRET else tile_elems
    return max(1, min(next_pow2(rows), budget // block_n)), block_n


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
    block_r, block_n = _blocks(n, rows, out_dtype, tile_elems=4096)
    if rows:
        _norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x_rn, res_rn if res_rn is not None else x_rn, weight, bias if bias is not None else weight,
            y_rn, h_rn if h_rn is not None else y_rn, mean_r, rstd_r,
            x_rn.stride(0), res_rn.stride(0) if res_rn is not None else 0, y_rn.stride(0),
            h_rn.stride(0) if h_rn is not None else 0, rows, n, eps,
            IS_RMS=is_rms, HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_R=block_r,
            BLOCK_N=block_n, num_warps=row_kernel_warps(block_r * block_n))
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
    # The backward keeps ~5 tiles live (h, dy, xhat, w*dy, dx): smaller tiles than the forward.
    block_r, block_n = _blocks(n, triton.cdiv(rows, programs), h.dtype, tile_elems=2048)
    if rows:
        _norm_bwd_kernel[(programs,)](
            dy_rn, h_rn, weight, mean_r, rstd_r, dh_in_rn if dh_in_rn is not None else dy_rn, dx_rn,
            dw_part, db_part, dy_rn.stride(0), h_rn.stride(0),
            dh_in_rn.stride(0) if dh_in_rn is not None else 0, dx_rn.stride(0), rows, n,
            triton.cdiv(rows, programs), IS_RMS=is_rms, HAS_DH_IN=dh_in is not None, HAS_BIAS=has_bias,
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=row_kernel_warps(block_r * block_n))
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx_rn.view(h.shape), dw, db
