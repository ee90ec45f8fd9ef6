"""Cross entropy over a large (possibly vocab-parallel) vocabulary in Triton, softmax never stored.

Legend: r = rows (tokens), v = vocabulary columns held by this tensor (the whole vocabulary, or one
tensor-parallel shard starting at global column `vocab_start`), n <= v = its real columns (the rest is
vocabulary padding, which takes no part), V = the true global vocabulary size.
    logits_rv [r, v] (unit stride on v)   labels_r [r] int (global ids; ignore_index rows are skipped)
    lse_r, target_r, sum_r [r] fp32        grad_r [r] (dloss per row; may be an expanded scalar)

stats kernel (one program per row, BLOCK_V-column chunks): per-lane online logsumexp (running max
and rescaled sum per lane, combined once at the end, so the loop has no cross-lane reductions),
the logit of the label if it falls in this shard (else 0), and the row sum (for label smoothing),
all over the n real columns only (a shard without any: lse = -inf, no launch).
grad kernel (one program per (row, chunk)): g * (softmax - (1-eps)*onehot - eps/V) from the
global lse on real columns, 0 on padding columns, written in the logits' dtype into a new tensor or
over the logits themselves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megaflow.kernels.triton_utils import INTERPRET, check_tensors, next_pow2


@triton.jit
def _ce_stats_kernel(LOGITS, LABELS, LSE, TARGET, SUM, stride_l, v, vocab_start, ignore_index,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    local = tl.where(label == ignore_index, -1, label - vocab_start)  # -1 matches no column
    m_vec = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, v, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < v
        x = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        # Lanes that have seen only -inf (masked tail, -inf logits) rescale by a finite 0, keeping
        # s = 0 instead of exp(-inf - -inf) = nan.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        s_vec = s_vec * tl.exp(m_vec - m_ref) + tl.exp(x - m_ref)
        m_vec = m_new
        sum_vec += tl.where(mask, x, 0.0)
        t_vec += tl.where(mask & (cols == local), x, 0.0)
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    tl.store(LSE + row, m + tl.log(s))
    tl.store(TARGET + row, tl.sum(t_vec, axis=0))
    tl.store(SUM + row, tl.sum(sum_vec, axis=0))


@triton.jit
def _ce_grad_kernel(LOGITS, LABELS, LSE, GRAD, DLOGITS, stride_l, stride_g, stride_d, v, n_real, vocab_start,
                    ignore_index, smooth_over_v, one_minus_smooth, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < v
    label = tl.load(LABELS + row).to(tl.int64)
    g = tl.load(GRAD + row * stride_g).to(tl.float32)
    g = tl.where(label == ignore_index, 0.0, g)
    x = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
    grad = tl.exp(x - tl.load(LSE + row)) - smooth_over_v
    grad = tl.where(cols == label - vocab_start, grad - one_minus_smooth, grad)
    grad = tl.where(cols < n_real, grad, 0.0)  # vocabulary padding: no part in the loss
    # Same program reads then writes each element, so DLOGITS may be LOGITS (in-place backward).
    tl.store(DLOGITS + row * stride_d + cols, (grad * g).to(DLOGITS.dtype.element_ty), mask=mask)


def _rows(logits):
    logits_rv = logits.reshape(-1, logits.shape[-1])
    return logits_rv if logits_rv.stride(-1) == 1 else logits_rv.contiguous()


def shard_stats(logits, labels, vocab_start, ignore_index, n_real=None):
    """(lse_r, target_r, sum_r) for logits [..., v], labels [...], over the first n_real columns (all
    when None); see cross_entropy.py."""
    check_tensors("cross_entropy", logits, labels)
    logits_rv = _rows(logits)
    labels_r = labels.reshape(-1)
    r, v = logits_rv.shape
    if labels_r.shape[0] != r:
        raise ValueError(f"cross_entropy: {labels_r.shape[0]} labels for {r} rows of logits")
    n = v if n_real is None else n_real  # the kernel scans the real columns only (row stride unchanged)
    lse_r, target_r, sum_r = (torch.empty(r, dtype=torch.float32, device=logits.device) for _ in range(3))
    # GPU: 4K-column chunks, 8 warps (16 fp32 per thread per array); interpreter: smaller chunks
    # so that test vocabularies of a few hundred columns cross several of them.
    if n == 0:  # a shard made only of padding: nothing to scan
        return (torch.full(labels.shape, float("-inf"), device=logits.device),
                torch.zeros(labels.shape, device=logits.device), torch.zeros(labels.shape, device=logits.device))
    block = min(next_pow2(n), 128 if INTERPRET else 4096)
    if r:
        _ce_stats_kernel[(r,)](logits_rv, labels_r, lse_r, target_r, sum_r, logits_rv.stride(0), n,
                               vocab_start, ignore_index, BLOCK_V=block, num_warps=8)
    return lse_r.view(labels.shape), target_r.view(labels.shape), sum_r.view(labels.shape)


def shard_grad(logits, labels, vocab_start, lse, grad_loss, vocab_size, label_smoothing, ignore_index,
               inplace):
    """dloss/dlogits for this shard (dtype of logits); written over `logits` when inplace. vocab_size is
    the true global vocabulary: columns at global id >= vocab_size get 0."""
    check_tensors("cross_entropy", logits, labels, lse, grad_loss)
    logits_rv = _rows(logits)
    labels_r = labels.reshape(-1)
    lse_r = lse.reshape(-1).float().contiguous()
    grad_r = grad_loss.reshape(-1).float()
    r, v = logits_rv.shape
    n_real = max(0, min(v, vocab_size - vocab_start))
    inplace = inplace and logits_rv.data_ptr() == logits.data_ptr()  # a view, not a copy
    dlogits_rv = logits_rv if inplace else torch.empty_like(logits_rv)
    block = min(next_pow2(v), 128 if INTERPRET else 2048)
    if r:
        _ce_grad_kernel[(r, triton.cdiv(v, block))](
            logits_rv, labels_r, lse_r, grad_r, dlogits_rv, logits_rv.stride(0), grad_r.stride(0),
            dlogits_rv.stride(0), v, n_real, vocab_start, ignore_index, label_smoothing / vocab_size,
            1.0 - label_smoothing, BLOCK_V=block, num_warps=8)
    if inplace:
        # The kernel wrote behind autograd's back: bump the version so any other saved use of
        # these logits fails loudly instead of reading gradients.
        torch.autograd.graph.increment_version(logits)
        return logits
    return dlogits_rv.view(logits.shape)
