"""Forward/backward schedules over the micro-batches of one global batch.

The loss of a micro-batch is its token-mean over the loss mask; backward runs on
loss / num_microbatches, so gradients are the mean over micro-batches (and, after the DP average, over
the whole global batch), exactly as Megatron-LM's GPT does.
"""
from __future__ import annotations

import contextlib

import torch

from megaflow.parallel import state


def microbatch_loss(loss_bs: torch.Tensor, loss_mask_bs: torch.Tensor) -> torch.Tensor:
    mask = loss_mask_bs.to(loss_bs.dtype)
    return (loss_bs * mask).sum() / mask.sum().clamp(min=1.0)


def forward_step(model, batch, autocast_ctx):
    device = state.get().device
    with autocast_ctx():
        loss_bs = model(batch["tokens"].to(device), batch["position_ids"].to(device),
                        labels_bs=batch["labels"].to(device))
    return microbatch_loss(loss_bs.float(), batch["loss_mask"].to(device))


def forward_backward_no_pipelining(model, data_iterator, num_microbatches: int, forward_only: bool = False,
                                   loss_scale: float = 1.0, autocast_ctx=contextlib.nullcontext):
    """Gradient accumulation: forward and backward each micro-batch in turn. Returns the detached
    per-micro-batch losses."""
    losses = []
    for _ in range(num_microbatches):
        loss = forward_step(model, next(data_iterator), autocast_ctx)
        if not forward_only:
            (loss * (loss_scale / num_microbatches)).backward()
        losses.append(loss.detach())
    return losses


def get_forward_backward_func():
    if state.get().pp_size > 1:
        raise NotImplementedError("pipeline parallelism (PP > 1) is not available yet")
    return forward_backward_no_pipelining
