"""Cross entropy over a vocabulary split across TP ranks, without gathering the full logits.

Per token, in fp32 (FORMATS.md §3): all-reduce MAX of the local max; the target logit is picked on the
rank that owns it and all-reduced SUM; the sum of exp is all-reduced SUM;
loss = log(sum_exp) - target_logit. Backward: softmax - onehot, computed locally.

Vocabulary padding never takes part: the output layer has padded_vocab_size rows (a multiple of
--make-vocab-size-divisible-by × TP), but only the first `vocab_size` (the tokenizer's) are real. The
padding columns count as -inf logits: outside the softmax sums and the label-smoothing mean, gradient
exactly 0. So the loss is the same whatever padding the layout needs, and padding rows of the output
layer (and of a tied embedding) never receive a gradient.

VocabParallelCrossEntropy (the module the model builds) learns the true vocabulary size and the
label smoothing in its constructor; vocab_parallel_cross_entropy is the function behind it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaflow.kernels.cross_entropy import (cross_entropy, loss_from_stats, real_columns, vocab_shard_grad,
                                            vocab_shard_stats)
from megaflow.kernels.dispatch import resolve_backend
from megaflow.parallel import state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Plain torch. One fp32 [tokens, vocab/tp] buffer: the shifted logits, exponentiated in place once
    the target logit is picked, and turned into the gradient in place by the backward (the softmax's
    division by the sum is folded into that one pass)."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing, vocab_size):
        st = state.get()
        group = st.groups.get("tp")
        vocab_local = logits.shape[-1]
        start = st.tp_rank * vocab_local
        n = real_columns(vocab_local, start, vocab_size)     # this rank's real columns come first
        if n:
            logits_max = logits[..., :n].detach().amax(dim=-1).float()
        else:                                                # a shard made only of padding
            logits_max = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)          # fp32 (promoted), the one buffer
        shifted[..., n:] = float("-inf")                     # padding: exp 0, no gradient

        outside = (target < start) | (target >= start + n)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        sum_shifted = shifted[..., :n].sum(dim=-1) if label_smoothing > 0 else None
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit
        if label_smoothing > 0:
            # Smoothed loss = (1-e)·nll + e·mean_v(-log p_v); mean over the true vocabulary.
            dist.all_reduce(sum_shifted, group=group)
            mean_log_prob = sum_shifted / vocab_size - sum_exp.log()
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob

        ctx.save_for_backward(exp, sum_exp, local_target, outside)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype, ctx.n = label_smoothing, vocab_size, logits.dtype, n
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
            grad[..., :ctx.n].sub_((g * (eps / ctx.vocab_size)).unsqueeze(-1))  # real columns only
        return grad.to(ctx.logits_dtype), None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Triton (or any kernels/ backend): per-shard statistics from the kernel, combined by two
    all-reduces (kernels/cross_entropy.py's recipe); saves the logits and the fp32 lse, not the
    softmax, and the backward kernel writes the gradient of this shard."""

    @staticmethod
    def forward(ctx, logits, target, label_smoothing, vocab_size, backend):
        st = state.get()
        group = st.groups.get("tp")
        start = st.tp_rank * logits.shape[-1]
        stats = vocab_shard_stats(logits, target, start, backend=backend, vocab_size=vocab_size)
        lse = stats.lse.clone()
        dist.all_reduce(lse, op=dist.ReduceOp.MAX, group=group)
        parts = torch.stack([(stats.lse - lse).exp(), stats.target, stats.sum_logits])
        dist.all_reduce(parts, group=group)                   # one collective for three sums
        lse = lse + parts[0].log()
        ctx.save_for_backward(logits, target, lse)
        ctx.label_smoothing, ctx.vocab_size, ctx.start, ctx.backend = label_smoothing, vocab_size, start, backend
        return loss_from_stats(lse, parts[1], parts[2], target, label_smoothing, vocab_size)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        grad = vocab_shard_grad(logits, target, ctx.start, lse, grad_loss, ctx.vocab_size, ctx.label_smoothing,
                                backend=ctx.backend)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, label_smoothing: float = 0.0, backend: str = "auto",
                                 vocab_size: int | None = None):
    """logits [..., padded vocab/tp] (this rank's shard), target [...] -> per-token loss [...] in fp32.
    vocab_size: the true (global) vocabulary; logits columns past it are padding and take no part
    (None: every column is real)."""
    st = state.get()
    if vocab_size is None:
        vocab_size = logits.shape[-1] * st.tp_size
    if not 0 < vocab_size <= logits.shape[-1] * st.tp_size:
        raise ValueError(f"vocab_parallel_cross_entropy: vocabulary {vocab_size} for {logits.shape[-1]} logits "
                         f"columns × TP {st.tp_size}")
    if st.tp_size == 1:
        return cross_entropy(logits, target, label_smoothing=label_smoothing, backend=backend,
                             vocab_size=vocab_size)
    backend = resolve_backend(backend, logits)
    if backend == "torch":
        return _VocabParallelCrossEntropy.apply(logits, target, float(label_smoothing), int(vocab_size))
    return _ShardedCrossEntropy.apply(logits, target, float(label_smoothing), int(vocab_size), backend)


class VocabParallelCrossEntropy(nn.Module):
    """The language-model loss of the last stage: per-token cross entropy over the true vocabulary
    (vocab_size, the tokenizer's), with optional label smoothing (torch's convention: (1-ε)·NLL +
    ε·mean over the vocabulary of -log p). Padding columns of the logits are excluded (module doc)."""

    def __init__(self, vocab_size: int, label_smoothing: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        self.vocab_size, self.label_smoothing, self.backend = int(vocab_size), float(label_smoothing), backend

    def forward(self, logits, target):
        """logits [..., padded vocab/tp], target [...] -> per-token loss [...] (fp32)."""
        return vocab_parallel_cross_entropy(logits, target, self.label_smoothing, self.backend, self.vocab_size)

    def mask_padding(self, logits):
        """The logits with their padding columns set to -inf (what generation and any other consumer
        of raw logits see: padding ids can never be chosen or sampled)."""
        start = state.get().tp_rank * logits.shape[-1]
        n = real_columns(logits.shape[-1], start, self.vocab_size)
        if n == logits.shape[-1]:
            return logits
        padding = torch.arange(logits.shape[-1], device=logits.device) >= n
        return logits.masked_fill(padding, float("-inf"))

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, label_smoothing={self.label_smoothing}"
