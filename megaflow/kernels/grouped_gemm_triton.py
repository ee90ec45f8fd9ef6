"""Grouped GEMM in Triton: every expert's matmul over its run of rows, in one launch per product.

Legend: N rows (tokens sorted by expert), E experts, offs [E] int32 cumulative row ends
(expert e owns rows [offs[e-1], offs[e])), K the reduced dimension, M the output columns.

    _rows_kernel  Y[rows of e, :] = A[rows of e, :] @ B_e      B_e [K, M] read through strides, so the
                  same kernel does the forward y = x @ w_e.T (B_e = w[e].T) and the input gradient
                  dx = dy @ w_e (B_e = w[e]). Programs: (row tile, column tile); a host-built table
                  maps each row tile to its expert and first row (tiles never straddle experts, an
                  expert with 0 rows has no tile).
    _dw_kernel    dW[e] = A_e.T @ C_e   (dw[e] = dy_e.T @ x_e): programs (expert, n tile, k tile), each
                  walks its expert's rows in BLOCK_R steps; an expert with 0 rows stores zeros.

Operands are cast to fp32 right after loading and accumulated in fp32 (exact fp32 products for fp32
inputs: dot_precision), results cast to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import check_tensors, dot_precision


@triton.jit
def _rows_kernel(A, B, Y, TILE_EXPERT, TILE_ROW, OFFS, K, M,
                 stride_am, stride_ak, stride_be, stride_bk, stride_bm, stride_ym, stride_yn,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(TILE_EXPERT + tile).to(tl.int64)
    row0 = tl.load(TILE_ROW + tile).to(tl.int64)
    row_end = tl.load(OFFS + expert).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, col_ok = rows < row_end, cols < M
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(B + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bm,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dw_kernel(A, C, DW, OFFS, N_OUT, K, stride_am, stride_an, stride_cm, stride_ck,
               stride_we, stride_wn, stride_wk,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    expert = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = ns < N_OUT, ks < K
    start = tl.where(expert > 0, tl.load(OFFS + expert - 1, mask=expert > 0, other=0), 0).to(tl.int64)
    end = tl.load(OFFS + expert).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < end
        a = tl.load(A + rows[:, None] * stride_am + ns[None, :] * stride_an,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)      # [R, N]
        c = tl.load(C + rows[:, None] * stride_cm + ks[None, :] * stride_ck,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)      # [R, K]
        acc += tl.dot(tl.trans(a), c, input_precision=PRECISION)
    tl.store(DW + expert * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
             acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


BLOCK = 32  # rows / columns / reduction per tile: tl.dot needs at least 16


def _tile_table(offs: torch.Tensor, block: int):
    """(expert of each row tile, first row of each tile) for the experts' row runs."""
    ends = offs.tolist()
    experts, rows = [], []
    start = 0
    for e, end in enumerate(ends):
        for r in range(start, end, block):
            experts.append(e)
            rows.append(r)
        start = end
    dev = offs.device
    return torch.tensor(experts, dtype=torch.int32, device=dev), torch.tensor(rows, dtype=torch.int32, device=dev)


def _rows_product(a, b_strides, b, offs, m_out: int, k_red: int):
    check_tensors("grouped GEMM", a, b)
    y = a.new_empty((a.shape[0], m_out))
    tile_expert, tile_row = _tile_table(offs, BLOCK)
    if tile_expert.numel() == 0 or m_out == 0:
        return y.zero_()
    grid = (tile_expert.numel(), triton.cdiv(m_out, BLOCK))
    _rows_kernel[grid](a, b, y, tile_expert, tile_row, offs, k_red, m_out,
                       a.stride(0), a.stride(1), b.stride(0), b_strides[0], b_strides[1], y.stride(0), y.stride(1),
                       BLOCK_R=BLOCK, BLOCK_M=BLOCK, BLOCK_K=BLOCK, PRECISION=dot_precision(a.dtype))
    return y


def grouped_xwt(x, w, offs):
    """y = x_e @ w[e].T per expert: x [N, k], w [E, n, k] -> [N, n]."""
    return _rows_product(x, (w.stride(2), w.stride(1)), w, offs, w.shape[1], w.shape[2])


def grouped_xw(dy, w, offs):
    """dx = dy_e @ w[e] per expert: dy [N, n], w [E, n, k] -> [N, k]."""
    return _rows_product(dy, (w.stride(1), w.stride(2)), w, offs, w.shape[2], w.shape[1])


def grouped_dw(dy, x, offs):
    """dw[e] = dy_e.T @ x_e: dy [N, n], x [N, k] -> [E, n, k] (zeros for an expert without rows)."""
    check_tensors("grouped GEMM", dy, x)
    e, n, k = offs.numel(), dy.shape[1], x.shape[1]
    dw = dy.new_empty((e, n, k))
    grid = (e, triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    _dw_kernel[grid](dy, x, dw, offs, n, k, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                     dw.stride(0), dw.stride(1), dw.stride(2),
                     BLOCK_R=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK, PRECISION=dot_precision(dy.dtype))
    return dw
