"""Flash attention by global position in Triton: one block of queries against one block of keys,
causal by the tokens' global positions, optionally per document (cu_seqlens), returning the LSE.
The kernels behind kernels/attention_blocks.py's "triton" backend: ring attention (context
parallelism) and packed sequences. The same FlashAttention-2 scheme as attention_triton.py (online
softmax in base 2, backward recomputing probabilities from the LSE, dK/dV per key block over the
query heads sharing it, dQ per query block), generalised and without dropout.

Legend: b batch, h query heads, g = h // kvh query heads per kv head, d head dim.
    q_bnsd [b, h, s_q, d] at global positions q_start + i;  k_bnsd, v_bnsd [b, kvh, s_k, d] at k_start + j
    query i sees key j  iff  j + k_start <= i + q_start  (causal offset = q_start − k_start)
                         and doc_start(i + q_start) <= j + k_start        (VARLEN only)
    cu [b, t] int32: each sample's document boundaries, nondecreasing, 0 first and the sequence
        length last (padded by repeating it); doc_start(p) is found by a binary search in the row,
        so no s_q × s_k mask exists anywhere.
    o [b, h, s_q, d] fp32, lse [b, h, s_q] fp32 (natural log; −inf and o = 0 for a query seeing nothing)

Each program only visits the key (or query) blocks its tile can see: keys from the first row's
document start to the last row's diagonal; in the backward, queries from the key block's diagonal to
the end of the last key's document.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megaflow.kernels.attention_triton import _mma_type
from megaflow.kernels.triton_utils import INTERPRET, check_tensors, dot_precision, next_pow2

LOG2E = 1.4426950408889634
# Interpreter: small unequal blocks so the tests cross several; GPU: one robust FA2 shape.
_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16) if INTERPRET else dict(BLOCK_M=64, BLOCK_N=64)
_LAUNCH = {} if INTERPRET else dict(num_warps=4, num_stages=2)


@triton.jit
def _doc_index(cu_row, pos, n_cu, LOG_CU: tl.constexpr):
    """For each global position, the index i of its document: the last i with cu[i] <= pos."""
    lo = pos * 0
    hi = lo + n_cu
    for _ in tl.static_range(LOG_CU):  # invariant: cu[lo] <= pos < cu[hi] (cu[n_cu] = +inf)
        mid = (lo + hi) // 2
        go = tl.load(cu_row + mid, mask=mid < n_cu, other=0) <= pos
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _row_doc_start(cu_row, pos, n_cu, VARLEN: tl.constexpr, LOG_CU: tl.constexpr):
    """Global start of each position's document (0 without VARLEN)."""
    if VARLEN:
        return tl.load(cu_row + _doc_index(cu_row, pos, n_cu, LOG_CU))
    return pos * 0


@triton.jit
def _blk_fwd_kernel(Q, K, V, O, LSE, CU,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_cub,
                    n_heads, s_q, s_k, q_start, k_start, n_cu, sm_scale,
                    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    VARLEN: tl.constexpr, LOG_CU: tl.constexpr, PRECISION: tl.constexpr,
                    MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // GROUPS
    offset = q_start - k_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    # Keys as local indices: row i sees [doc_start(i) − k_start, i + offset].
    first_key = _row_doc_start(CU + b.to(tl.int64) * stride_cub, offs_m + q_start, n_cu, VARLEN, LOG_CU) - k_start
    lo = (tl.maximum(tl.min(first_key, 0), 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + offset, s_k)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(MMA_TY)), input_precision=PRECISION) * qk_scale
        seen = (offs_n[None, :] <= offs_m[:, None] + offset) & (offs_n[None, :] < s_k) \
            & (offs_n[None, :] >= first_key[:, None])
        qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that have seen nothing yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype).to(MMA_TY), v.to(MMA_TY), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < s_q
    tl.store(LSE + bh.to(tl.int64) * s_q + offs_m, lse, mask=row_ok)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :], acc, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _blk_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                         stride_dkb, stride_dkh, stride_dkn, stride_cub,
                         n_kv_heads, s_q, s_k, q_start, k_start, n_cu, sm_scale,
                         GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         VARLEN: tl.constexpr, LOG_CU: tl.constexpr, PRECISION: tl.constexpr,
                         MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = bkv // n_kv_heads
    kvh = bkv % n_kv_heads
    offset = q_start - k_start
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
    cu_row = CU + b.to(tl.int64) * stride_cub
    # Queries that see a key of this block: from its first key's diagonal to the end of its last
    # key's document (local query indices).
    lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
    hi = s_q
    if VARLEN:
        last = tl.minimum(start_n + BLOCK_N, s_k) - 1 + k_start + tl.zeros([1], dtype=tl.int32)
        doc_end = tl.load(cu_row + _doc_index(cu_row, last, n_cu, LOG_CU) + 1)
        hi = tl.minimum(tl.max(doc_end, 0) - q_start, s_q)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_heads = n_kv_heads * GROUPS
    for g in range(GROUPS):
        h = kvh * GROUPS + g
        bh = b * n_heads + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
            lse2 = tl.load(LSE + bh.to(tl.int64) * s_q + offs_m, mask=offs_m < s_q, other=0.0) * 1.4426950408889634
            first_key = _row_doc_start(cu_row, offs_m + q_start, n_cu, VARLEN, LOG_CU) - k_start
            seen_t = (offs_n[:, None] <= offs_m[None, :] + offset) & (offs_m[None, :] < s_q) \
                & (offs_n[:, None] >= first_key[None, :])
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            p_t = tl.where(seen_t, tl.math.exp2(qk_t * qk_scale - lse2[None, :]), 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
            dv = tl.dot(p_t.to(MMA_TY), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            delta = tl.load(DELTA + bh.to(tl.int64) * s_q + offs_m, mask=offs_m < s_q, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(MMA_TY), q, dk, input_precision=PRECISION)
    out = b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out, dk * sm_scale, mask=kv_mask)
    tl.store(DV + out, dv, mask=kv_mask)


@triton.jit
def _blk_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                       stride_dqb, stride_dqh, stride_dqm, stride_cub,
                       n_heads, s_q, s_k, q_start, k_start, n_cu, sm_scale,
                       GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       VARLEN: tl.constexpr, LOG_CU: tl.constexpr, PRECISION: tl.constexpr,
                       MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // GROUPS
    offset = q_start - k_start
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    row_ok = offs_m < s_q
    lse2 = tl.load(LSE + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    first_key = _row_doc_start(CU + b.to(tl.int64) * stride_cub, offs_m + q_start, n_cu, VARLEN, LOG_CU) - k_start
    lo = (tl.maximum(tl.min(first_key, 0), 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + offset, s_k)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
        seen = (offs_n[None, :] <= offs_m[:, None] + offset) & (offs_n[None, :] < s_k) & row_ok[:, None] \
            & (offs_n[None, :] >= first_key[:, None])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.where(seen, tl.math.exp2(qk * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(MMA_TY), k, dq, input_precision=PRECISION)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :], dq * sm_scale, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# Launchers (kernels/attention_blocks.py calls them)
# ----------------------------------------------------------------------------------------------

def _prepare(q_bnsd, k_bnsd, v_bnsd, cu_seqlens_bt):
    check_tensors("block attention", q_bnsd, k_bnsd, v_bnsd)
    if q_bnsd.shape[-1] > 128:
        raise ValueError(f"block attention: the Triton kernel supports head_dim <= 128, got {q_bnsd.shape[-1]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_bnsd, k_bnsd, v_bnsd))
    varlen = cu_seqlens_bt is not None
    cu = (cu_seqlens_bt.to(device=q.device, dtype=torch.int32).contiguous() if varlen
          else torch.zeros(1, 1, dtype=torch.int32, device=q.device))
    n_cu = cu.shape[1]
    d = q.shape[-1]
    statics = dict(GROUPS=q.shape[1] // k.shape[1], HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), VARLEN=varlen,
                   LOG_CU=max(1, math.ceil(math.log2(n_cu)) + 1), PRECISION=dot_precision(q.dtype),
                   MMA_TY=_mma_type(q.dtype), **_BLOCKS, **_LAUNCH)
    return q, k, v, cu, n_cu, statics


def flash_attn_block_forward(q_bnsd, k_bnsd, v_bnsd, sm_scale, q_start, k_start, cu_seqlens_bt=None):
    """(o fp32, lse fp32) of the block; see the module docstring."""
    q, k, v, cu, n_cu, statics = _prepare(q_bnsd, k_bnsd, v_bnsd, cu_seqlens_bt)
    b, h, s_q, d = q.shape
    o = torch.empty(b, h, s_q, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s_q, statics["BLOCK_M"]), b * h)
    _blk_fwd_kernel[grid](q, k, v, o, lse, cu, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                          *o.stride()[:3], cu.stride(0), h, s_q, k.shape[2], int(q_start), int(k_start), n_cu,
                          float(sm_scale), **statics)
    return o, lse


def flash_attn_block_backward(do_bnsd, q_bnsd, k_bnsd, v_bnsd, o_bnsd, lse_bns, sm_scale, q_start, k_start,
                              cu_seqlens_bt=None):
    """(dq, dk, dv) in fp32 of the block's share, from the whole attention's output and LSE."""
    q, k, v, cu, n_cu, statics = _prepare(q_bnsd, k_bnsd, v_bnsd, cu_seqlens_bt)
    do = do_bnsd if do_bnsd.stride(-1) == 1 else do_bnsd.contiguous()
    b, h, s_q, d = q.shape
    kvh, s_k = k.shape[1], k.shape[2]
    lse = lse_bns.float().contiguous()
    delta = (do.float() * o_bnsd.float()).sum(-1).contiguous()    # rowsum(dO · O), FlashAttention-2's D
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    common = (s_q, s_k, int(q_start), int(k_start), n_cu, float(sm_scale))
    _blk_bwd_dkdv_kernel[(triton.cdiv(s_k, statics["BLOCK_N"]), b * kvh)](
        q, k, v, do, lse, delta, dk, dv, cu, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], cu.stride(0), kvh, *common, **statics)
    _blk_bwd_dq_kernel[(triton.cdiv(s_q, statics["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, cu, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], cu.stride(0), h, *common, **statics)
    return dq, dk, dv
