"""One optimizer step over a global batch, and one evaluation pass."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megaflow.layers import moe
from megaflow.parallel import state
from megaflow.pipeline.schedules import get_forward_backward_func


def autocast_context(cfg):
    """bf16/fp16 autocast on the training device; a null context in fp32."""
    t = cfg.training
    if not (t.bf16 or t.fp16):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if t.bf16 else torch.float16
    return partial(torch.autocast, device_type=state.get().device.type, dtype=dtype)


def _average_over_dp(losses) -> float | None:
    """Mean micro-batch loss over this rank's micro-batches and all DP ranks (last stage only)."""
    if not losses:
        return None
    loss = torch.stack(losses).mean()
    st = state.get()
    if st.dp_size > 1:
        dist.all_reduce(loss, group=st.groups["dp"])
        loss /= st.dp_size
    return loss.item()


@dataclass
class StepResult:
    loss: float | None
    grad_norm: float | None
    skipped: bool
    loss_scale: float


def train_step(cfg, model, optimizer, scaler, data_iterator, num_microbatches: int) -> StepResult:
    """optimizer: a MegaflowOptimizer (optim/optimizer.py build_optimizer), which owns the gradient
    buffers: it zeroes them, reduces them over DP (from backward hooks with --overlap-grad-reduce),
    and updates (its shard of) the parameters."""
    optimizer.start_step(num_microbatches)
    scale = scaler.scale if scaler is not None else 1.0
    moe.set_aux_loss_scale(scale / num_microbatches)  # MoE balancing losses: same factor as the LM loss
    losses = get_forward_backward_func()(model, data_iterator, num_microbatches, loss_scale=scale,
                                         autocast_ctx=autocast_context(cfg))
    optimizer.finish_grad_sync()
    moe.update_expert_biases(model)  # aux-loss-free balancing: loads of this step (no-op without it)
    found_inf = optimizer.unscale_and_check(scale) if scaler is not None else False
    grad_norm = None
    if not found_inf:
        grad_norm = optimizer.grad_norm()
        if cfg.training.clip_grad > 0:
            optimizer.clip_grads(cfg.training.clip_grad, grad_norm)
        if math.isfinite(grad_norm):
            optimizer.step()
    if scaler is not None:
        scaler.update(found_inf)
    return StepResult(_average_over_dp(losses), grad_norm, found_inf, scale)


@torch.no_grad()
def evaluate(cfg, model, data_iterator, eval_iters: int, num_microbatches: int) -> float | None:
    """Mean loss over eval_iters global batches; None on ranks without the loss (not last stage)."""
    model.eval()
    losses = []
    try:
        for _ in range(eval_iters):
            losses += get_forward_backward_func()(model, data_iterator, num_microbatches, forward_only=True,
                                                  autocast_ctx=autocast_context(cfg))
    finally:
        model.train()
    return _average_over_dp(losses)
