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
from megaflow.parallel.context_parallel import split_for_rank
from megaflow.pipeline.schedules import get_forward_backward_func, microbatch_loss


def autocast_context(cfg):
    """bf16/fp16 autocast on the training device; a null context in fp32."""
    t = cfg.training
    if not (t.bf16 or t.fp16):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if t.bf16 else torch.float16
    return partial(torch.autocast, device_type=state.get().device.type, dtype=dtype)


def _average_over_dp(losses) -> float | None:
    """Mean micro-batch loss over this rank's micro-batches and all DP ranks (last stage only). Under
    context parallelism each CP rank's loss is its share scaled by CP (see _split_for_context_parallel),
    so the mean over the DP×CP group is the mean over DP of whole-sequence losses."""
    if not losses:
        return None
    loss = torch.stack(losses).mean()
    st = state.get()
    if st.dp_size * st.cp_size > 1:
        dist.all_reduce(loss, group=st.groups["dp_cp"])
        loss /= st.dp_size * st.cp_size
    return loss.item()


def _split_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This CP rank's zigzag share (chunks r and 2·CP−1−r of 2·CP, parallel/context_parallel.py) of a
    micro-batch every CP rank of the replica read whole. Positions are split like the tokens, so RoPE
    and learned embeddings see each token's true position; cu_seqlens stay global (attention places
    the chunks). loss_weight = CP · (this share's loss tokens) / (the sequence's): the share's mean
    loss times it, averaged over the CP ranks (gradients are averaged over DP×CP), is the mean loss
    of the whole sequence."""
    out = {k: split_for_rank(batch[k], cp_rank, cp_size) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if "cu_seqlens" in batch:  # drop the padding columns no sample needs (every one equals s)
        cu = batch["cu_seqlens"]
        out["cu_seqlens"] = cu[:, :int((cu < cu[:, -1:]).sum(1).max()) + 1]
    local, total = out["loss_mask"].sum().clamp(min=1.0), batch["loss_mask"].sum().clamp(min=1.0)
    out["loss_weight"] = cp_size * float(local) / float(total)
    return out


def _context_parallel_batches(data_iterator, cp_rank: int, cp_size: int):
    for batch in data_iterator:
        yield _split_for_context_parallel(batch, cp_rank, cp_size)


def _forward_step(model, batch, autocast_ctx, hidden_sbh=None):
    """schedules.forward_step for context parallelism and packed documents: every stage gets the
    positions (RoPE) and document boundaries, and the loss carries the batch's loss_weight."""
    device = state.get().device
    pre, post = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    cu = batch.get("cu_seqlens")
    with autocast_ctx():
        out = model(batch["tokens"].to(device) if pre else None, batch["position_ids"].to(device),
                    labels_bs=batch["labels"].to(device) if post else None, hidden_sbh=hidden_sbh,
                    cu_seqlens_bt=None if cu is None else cu.to(device),
                    loss_mask_bs=batch["loss_mask"].to(device) if post else None)
    if not post:
        return out
    return microbatch_loss(out.float(), batch["loss_mask"].to(device)) * batch["loss_weight"]


def _schedule_inputs(cfg, data_iterator) -> tuple:
    """(data iterator, extra schedule arguments): unchanged unless CP > 1 or sequences are packed or
    positions reset (then the split above and _forward_step)."""
    st, d = state.get(), cfg.data
    if st.cp_size == 1 and not (d.reset_attention_mask or d.reset_position_ids):
        return data_iterator, {}
    return _context_parallel_batches(data_iterator, st.cp_rank, st.cp_size), {"forward_step_func": _forward_step}


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
    data_iterator, extra = _schedule_inputs(cfg, data_iterator)
    losses = get_forward_backward_func()(model, data_iterator, num_microbatches, loss_scale=scale,
                                         autocast_ctx=autocast_context(cfg), **extra)
    optimizer.finish_grad_sync()
    optimizer.prepare_update()       # from here on parameters and optimizer state change
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
    data_iterator, extra = _schedule_inputs(cfg, data_iterator)
    try:
        for _ in range(eval_iters):
            losses += get_forward_backward_func()(model, data_iterator, num_microbatches, forward_only=True,
                                                  autocast_ctx=autocast_context(cfg), **extra)
    finally:
        model.train()
    return _average_over_dp(losses)
