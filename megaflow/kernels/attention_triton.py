"""Flash attention in Triton (FlashAttention-2): forward, backward, causal, grouped-query heads, dropout.

Legend: b batch, h query heads, kvh key/value heads, g = h // kvh query heads per kv head,
s_q / s_k query / key length, d head dim, BLOCK_D = d rounded up to a power of two (>= 16).
    q_bnsd [b, h, s_q, d]   k_bnsd, v_bnsd [b, kvh, s_k, d]   o_bnsd like q
    lse_bns [b, h, s_q] fp32: natural-log logsumexp of each row of scaled scores, saved for backward
    delta_bns [b, h, s_q] fp32: rowsum(dO * O), the softmax-backward correction term

Forward: one program per (BLOCK_M queries, b*h) streams key/value blocks through an online softmax
(running max m_i, running sum l_i, fp32 accumulator), never materialising the s_q x s_k matrix.
Backward recomputes the probabilities from lse: one kernel per key block accumulates dK, dV over the
g query heads that share it (no atomics, deterministic), another per query block accumulates dQ.
Scores are kept in base 2 (scale folded with log2(e)) so the exponentials are exp2.
Causal attention splits each loop into blocks wholly below the diagonal (no masks) and the blocks
on it (masked); this needs BLOCK_M % BLOCK_N == 0 (forward, dQ) and BLOCK_N % BLOCK_M == 0 (dK/dV).
Dropout draws Philox numbers from (seed, flat index of the (b, h, query, key) element), so the
backward regenerates the forward's mask; `dropout_keep_mask` reproduces it for tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import INTERPRET, check_tensors, dot_precision, next_pow2

MAX_HEAD_DIM = 128

# Interpreter blocks: small, so tests at ~40 tokens cross several blocks, and unequal, so the
# diagonal/off-diagonal split is exercised with BLOCK_M != BLOCK_N in both directions.
_INTERPRET_FWD = dict(BLOCK_M=32, BLOCK_N=16)
_INTERPRET_DKDV = dict(BLOCK_M=16, BLOCK_N=32)
_INTERPRET_DQ = dict(BLOCK_M=32, BLOCK_N=16)


def _configs(*specs):
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_stages=s, num_warps=w) for m, n, s, w in specs]


# Candidates (BLOCK_M, BLOCK_N, num_stages, num_warps) for Ampere (A100: 164 KB shared memory per SM,
# sm86/89: ~100 KB) and Hopper (228 KB), after the Triton fused-attention tutorial's choices. Kept
# short because the autotuner compiles and times each once per key; configs that do not fit a GPU's
# shared memory fail to compile and the autotuner skips them.
# Shared memory at head_dim 128, bf16, measured by compiling for sm80 (cp.async-pipelined): forward
# 64-160 KB (128x128 s3: 160 KB, 64x64 s4: 120 KB, the rest <= 96 KB), dK/dV 58-96 KB, dQ 58-96 KB:
# all fit an A100 or H100; on sm86/89 the two largest forward configs drop out.
_FWD_CONFIGS = _configs((128, 64, 3, 4), (128, 64, 3, 8), (128, 128, 2, 8), (128, 128, 3, 8),
                        (64, 64, 3, 4), (64, 64, 4, 4), (128, 32, 3, 4), (64, 32, 4, 4))
_DKDV_CONFIGS = _configs((32, 128, 2, 4), (32, 128, 3, 8), (64, 128, 2, 8), (32, 64, 3, 4),
                         (16, 64, 4, 4), (64, 64, 2, 4))
_DQ_CONFIGS = _configs((128, 32, 3, 4), (128, 32, 2, 8), (128, 64, 2, 8), (64, 32, 3, 4),
                       (64, 64, 2, 4), (64, 16, 4, 4))


def _prune(configs, named_args, interpret_blocks, **kwargs):
    """Interpreter: the one small config (the autotuner then skips timing). GPU: fp32 inputs take
    twice the registers and shared memory per tile, so they keep the smaller tiles only."""
    if INTERPRET:
        return [triton.Config(dict(interpret_blocks), num_warps=4, num_stages=1)]
    q = {**named_args, **kwargs}["Q"]
    if q.dtype == torch.float32:
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or configs[-1:]
    return configs


def _key(names):
    return names + ["seq_bucket"]


@triton.jit
def _keep(seed, rng_base, offs_m, offs_n, s_k, dropout_p):
    """Dropout keep-mask [len(offs_m), len(offs_n)] from the elements' flat (query, key) index."""
    offs = rng_base + offs_m[:, None].to(tl.int64) * s_k + offs_n[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi, s_k,
               qk_scale, seed, rng_base, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, MMA_TY: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_d[None, :] < HEAD_DIM  # all-true unless head_dim was padded
        if BOUNDS:
            kv_mask = kv_mask & (offs_n[:, None] < s_k)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(MMA_TY)), input_precision=PRECISION) * qk_scale
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if BOUNDS:
            qk = tl.where(offs_n[None, :] < s_k, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(seed, rng_base, offs_m, offs_n, s_k, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype).to(MMA_TY), v.to(MMA_TY), acc,
                     input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_key(["BLOCK_D", "CAUSAL", "DROPOUT", "GROUPS"]),
                 prune_configs_by={"early_config_prune":
                                   lambda c, a, **kw: _prune(c, a, _INTERPRET_FWD, **kw)})
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEED,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     n_heads, s_q, s_k, sm_scale, dropout_p, seq_bucket,
                     GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                     MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // GROUPS
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): scores in base 2
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    rng_base = bh.to(tl.int64) * s_q * s_k
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # s_q == s_k: blocks left of the diagonal block are whole, in bounds and unmasked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                   0, start_m, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM,
                                   BLOCK_D, BLOCK_N, False, False, DROPOUT, PRECISION, MMA_TY)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                   start_m, tl.minimum(start_m + BLOCK_M, s_k), s_k, qk_scale, seed,
                                   rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, DROPOUT,
                                   PRECISION, MMA_TY)
    else:
        n_full = (s_k // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                   0, n_full, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM,
                                   BLOCK_D, BLOCK_N, False, False, DROPOUT, PRECISION, MMA_TY)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                                   n_full, s_k, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM,
                                   BLOCK_D, BLOCK_N, False, True, DROPOUT, PRECISION, MMA_TY)
    acc = acc / l_i[:, None]
    row_ok = offs_m < s_q
    tl.store(LSE + bh.to(tl.int64) * s_q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=row_ok)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                                stride_dom, n_heads, s_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 (FlashAttention-2's D; unchanged by dropout)."""
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * s_q + offs_m, delta, mask=offs_m < s_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                offs_d, lo, hi, s_q, s_k, qk_scale, seed, rng_base, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                MMA_TY: tl.constexpr):
    """Accumulate one query head's contribution to a key block's dK, dV (transposed: [keys, queries])."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
        # Rows past s_q get lse = +inf, so their probabilities are exactly 0.
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < s_q, other=float("inf")) * 1.4426950408889634
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep_t = tl.trans(_keep(seed, rng_base, offs_m, offs_n, s_k, dropout_p))
            pd_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        else:
            pd_t = p_t
        dv = tl.dot(pd_t.to(q_base.dtype.element_ty).to(MMA_TY), do, dv,
                    input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=offs_m < s_q, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_base.dtype.element_ty).to(MMA_TY), q, dk,
                    input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_key(["BLOCK_D", "CAUSAL", "DROPOUT", "GROUPS"]),
                 prune_configs_by={"early_config_prune":
                                   lambda c, a, **kw: _prune(c, a, _INTERPRET_DKDV, **kw)})
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEED,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          n_kv_heads, s_q, s_k, sm_scale, dropout_p, seq_bucket,
                          GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                          MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = bkv // n_kv_heads
    kvh = bkv % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
    qk_scale = sm_scale * 1.4426950408889634
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_heads = n_kv_heads * GROUPS
    for g in range(GROUPS):  # the query heads that share this key/value head
        bh = b * n_heads + kvh * GROUPS + g
        q_base = Q + b.to(tl.int64) * stride_qb + (kvh * GROUPS + g).to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + (kvh * GROUPS + g).to(tl.int64) * stride_doh
        lse_base = LSE + bh.to(tl.int64) * s_q
        delta_base = DELTA + bh.to(tl.int64) * s_q
        rng_base = bh.to(tl.int64) * s_q * s_k
        if CAUSAL:  # queries before start_n see none of these keys; the diagonal block is masked
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                 stride_dom, offs_n, offs_d, start_n, tl.minimum(start_n + BLOCK_N, s_q),
                                 s_q, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M,
                                 True, DROPOUT, PRECISION, MMA_TY)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                 stride_dom, offs_n, offs_d, start_n + BLOCK_N, s_q, s_q, s_k, qk_scale,
                                 seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, False, DROPOUT,
                                 PRECISION, MMA_TY)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                 stride_dom, offs_n, offs_d, 0, s_q, s_q, s_k, qk_scale, seed, rng_base,
                                 dropout_p, HEAD_DIM, BLOCK_D, BLOCK_M, False, DROPOUT, PRECISION,
                                 MMA_TY)
    mask = (offs_n[:, None] < s_k) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi, s_k,
              qk_scale, seed, rng_base, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL_MASK: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, MMA_TY: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = offs_d[None, :] < HEAD_DIM  # all-true unless head_dim was padded
        if BOUNDS:
            kv_mask = kv_mask & (offs_n[:, None] < s_k)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(MMA_TY)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        # Keys past s_k need no mask here: they were loaded as zeros, so ds @ k gets nothing from them.
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(seed, rng_base, offs_m, offs_n, s_k, dropout_p), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_base.dtype.element_ty).to(MMA_TY), k, dq,
                    input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_key(["BLOCK_D", "CAUSAL", "DROPOUT", "GROUPS"]),
                 prune_configs_by={"early_config_prune":
                                   lambda c, a, **kw: _prune(c, a, _INTERPRET_DQ, **kw)})
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEED,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                        stride_dqb, stride_dqh, stride_dqm,
                        n_heads, s_q, s_k, sm_scale, dropout_p, seq_bucket,
                        GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                        MMA_TY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // GROUPS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < s_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0).to(MMA_TY)
    row_ok = offs_m < s_q
    lse2 = tl.load(LSE + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * s_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    rng_base = bh.to(tl.int64) * s_q * s_k
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0,
                       start_m, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                       False, False, DROPOUT, PRECISION, MMA_TY)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       start_m, tl.minimum(start_m + BLOCK_M, s_k), s_k, qk_scale, seed, rng_base,
                       dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, True, True, DROPOUT, PRECISION,
                       MMA_TY)
    else:
        n_full = (s_k // BLOCK_N) * BLOCK_N
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0,
                       n_full, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                       False, False, DROPOUT, PRECISION, MMA_TY)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       n_full, s_k, s_k, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N,
                       False, True, DROPOUT, PRECISION, MMA_TY)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, s_q, s_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh.to(tl.int64) * s_q * s_k, offs_m, offs_n, s_k, dropout_p)
    tl.store(KEEP + bh.to(tl.int64) * s_q * s_k + offs_m[:, None] * s_k + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < s_q) & (offs_n[None, :] < s_k))


# ----------------------------------------------------------------------------------------------
# Launchers (the autograd Function is in attention.py)
# ----------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _mma_type(dtype):
    """The dtype of tl.dot operands. On the GPU the storage dtype (fp16/bf16 feed the tensor cores,
    accumulation is fp32; casting to it is a no-op); the interpreter multiplies bf16 bit patterns
    wrongly, so there every operand is cast to fp32 (after rounding p and dS to the storage dtype,
    as the GPU does)."""
    return tl.float32 if INTERPRET else _TL_DTYPES[dtype]


def _statics(q_bnsd, k_bnsd, causal, dropout_p):
    d = q_bnsd.shape[-1]
    return dict(GROUPS=q_bnsd.shape[1] // k_bnsd.shape[1], HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)),
                CAUSAL=bool(causal), DROPOUT=dropout_p > 0, PRECISION=dot_precision(q_bnsd.dtype),
                MMA_TY=_mma_type(q_bnsd.dtype), seq_bucket=next_pow2(k_bnsd.shape[2]))


def check_inputs(q_bnsd, k_bnsd, v_bnsd, causal, dropout_p):
    check_tensors("attention", q_bnsd, k_bnsd, v_bnsd)
    b, h, s_q, d = q_bnsd.shape
    if k_bnsd.shape != v_bnsd.shape or k_bnsd.shape[0] != b or k_bnsd.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q_bnsd.shape)}, k {tuple(k_bnsd.shape)}, "
                         f"v {tuple(v_bnsd.shape)} do not fit [b, heads, s, d] / [b, kv_heads, s, d]")
    if h % k_bnsd.shape[1]:
        raise ValueError(f"attention: {h} query heads is not a multiple of {k_bnsd.shape[1]} kv heads")
    if not (q_bnsd.dtype == k_bnsd.dtype == v_bnsd.dtype) or q_bnsd.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32 (got {q_bnsd.dtype}, "
                         f"{k_bnsd.dtype}, {v_bnsd.dtype})")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention: the Triton kernel supports head_dim <= {MAX_HEAD_DIM}, got {d}")
    if causal and s_q != k_bnsd.shape[2]:
        raise ValueError("attention: causal attention needs as many queries as keys "
                         f"(got {s_q} and {k_bnsd.shape[2]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")


def draw_dropout_seed(device, dropout_p):
    """The Philox seed for one attention call, drawn from torch's generator on the device so that
    torch.manual_seed and the tensor-parallel RNG tracker govern it (and activation recompute,
    which restores the RNG state, redraws the same one); a tensor, so drawing it never syncs."""
    if dropout_p == 0:
        return torch.zeros(1, dtype=torch.int64, device=device)
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def flash_attn_forward(q_bnsd, k_bnsd, v_bnsd, causal, sm_scale, dropout_p, seed):
    """(o_bnsd, lse_bns). Inputs any strides with unit stride on head_dim, checked by check_inputs."""
    b, h, s_q, d = q_bnsd.shape
    s_k = k_bnsd.shape[2]
    # O is laid out [b, s, h, d] in memory: the caller's transpose back to [b, s, h*d] is then free.
    o_bnsd = torch.empty(b, s_q, h, d, dtype=q_bnsd.dtype, device=q_bnsd.device).transpose(1, 2)
    lse_bns = torch.empty(b, h, s_q, dtype=torch.float32, device=q_bnsd.device)
    grid = lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    _attn_fwd_kernel[grid](q_bnsd, k_bnsd, v_bnsd, o_bnsd, lse_bns, seed,
                           *q_bnsd.stride()[:3], *k_bnsd.stride()[:3], *v_bnsd.stride()[:3],
                           *o_bnsd.stride()[:3], n_heads=h, s_q=s_q, s_k=s_k, sm_scale=sm_scale,
                           dropout_p=dropout_p, **_statics(q_bnsd, k_bnsd, causal, dropout_p))
    return o_bnsd, lse_bns


def flash_attn_backward(do_bnsd, q_bnsd, k_bnsd, v_bnsd, o_bnsd, lse_bns, causal, sm_scale, dropout_p, seed):
    b, h, s_q, d = q_bnsd.shape
    kvh, s_k = k_bnsd.shape[1], k_bnsd.shape[2]
    statics = _statics(q_bnsd, k_bnsd, causal, dropout_p)
    delta_bns = torch.empty_like(lse_bns)
    pre_block = 32 if INTERPRET else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(s_q, pre_block), b * h)](
        o_bnsd, do_bnsd, delta_bns, *o_bnsd.stride()[:3], *do_bnsd.stride()[:3], h, s_q,
        HEAD_DIM=d, BLOCK_D=statics["BLOCK_D"], BLOCK_M=pre_block)
    dq_bnsd, dk_bnsd, dv_bnsd = (torch.empty_like(t) for t in (q_bnsd, k_bnsd, v_bnsd))
    common = dict(s_q=s_q, s_k=s_k, sm_scale=sm_scale, dropout_p=dropout_p, **statics)
    grid_kv = lambda meta: (triton.cdiv(s_k, meta["BLOCK_N"]), b * kvh)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q_bnsd, k_bnsd, v_bnsd, do_bnsd, lse_bns, delta_bns, dk_bnsd, dv_bnsd, seed,
                                   *q_bnsd.stride()[:3], *k_bnsd.stride()[:3], *v_bnsd.stride()[:3],
                                   *do_bnsd.stride()[:3], *dk_bnsd.stride()[:3], *dv_bnsd.stride()[:3],
                                   n_kv_heads=kvh, **common)
    grid_q = lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q_bnsd, k_bnsd, v_bnsd, do_bnsd, lse_bns, delta_bns, dq_bnsd, seed,
                                *q_bnsd.stride()[:3], *k_bnsd.stride()[:3], *v_bnsd.stride()[:3],
                                *do_bnsd.stride()[:3], *dq_bnsd.stride()[:3], n_heads=h, **common)
    return dq_bnsd, dk_bnsd, dv_bnsd


def dropout_keep_mask(seed, b, h, s_q, s_k, dropout_p):
    """The keep-mask [b, h, s_q, s_k] (bool) the kernels derive from `seed` (a 1-element int64
    tensor): lets a test build a torch reference that drops exactly the same probabilities."""
    check_tensors("attention", seed)
    keep = torch.empty(b, h, s_q, s_k, dtype=torch.int8, device=seed.device)
    blk = 32
    _dropout_mask_kernel[(triton.cdiv(s_q, blk), triton.cdiv(s_k, blk), b * h)](
        seed, keep, s_q, s_k, float(dropout_p), BLOCK_M=blk, BLOCK_N=blk)
    return keep.bool()
