"""Cross entropy over a vocabulary split across TP ranks, without gathering the full logits.

Per token, in fp32 (FORMATS.md §3): all-reduce MAX of the local max; the target logit is picked on the
rank that owns it and all-reduced SUM; the sum of exp is all-reduced SUM;
loss = log(sum_exp) - target_logit. Backward: softmax - onehot, computed locally.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.kernels.cross_entropy import cross_entropy
from megaflow.parallel import state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """One fp32 [tokens, vocab/tp] buffer: the shifted logits, exponentiated in place once the target
    logit is picked, and turned into the gradient in place by the backward (the softmax's division
    by the sum is folded into that one pass)."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing):
        st = state.get()
        group = st.groups.get("tp")
        vocab_local = logits.shape[-1]
        start = st.tp_rank * vocab_local
        logits_max = logits.detach().amax(dim=-1).float()
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)          # fp32 (promoted), the one buffer

        outside = (target < start) | (target >= start + vocab_local)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        vocab_size = vocab_local * st.tp_size
        sum_shifted = shifted.sum(dim=-1) if label_smoothing > 0 else None
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit
        if label_smoothing > 0:
            # Smoothed loss = (1-e)·nll + e·mean_v(-log p_v); mean over the full vocabulary.
            dist.all_reduce(sum_shifted, group=group)
            mean_log_prob = sum_shifted / vocab_size - sum_exp.log()
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob

        ctx.save_for_backward(exp, sum_exp, local_target, outside)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local_target, outside = ctx.saved_tensors
        eps = ctx.label_smoothing
        g = grad_loss.float()
        grad = exp.mul_((g / sum_exp).unsqueeze(-1))  # in place: g·(softmax - (1-eps)·onehot - eps/V)
        onehot_weight = (~outside).float() * (1.0 - eps) * g
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_weight.unsqueeze(-1))
        if eps > 0:
            grad.sub_((g * (eps / ctx.vocab_size)).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits, target, label_smoothing: float = 0.0, backend: str = "auto"):
    """logits [..., vocab/tp] (this rank's shard), target [...] -> per-token loss [...] in fp32."""
    if state.get().tp_size == 1:
        return cross_entropy(logits, target, label_smoothing=label_smoothing, backend=backend)
    return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing)
