"""Forward/backward schedules over the micro-batches of one global batch.

The loss of a micro-batch is its token-mean over the loss mask; backward runs on
loss · loss_scale / num_microbatches, so gradients are the mean over micro-batches (and, after the DP
average, over the whole global batch), exactly as Megatron-LM's GPT does, whatever the schedule.

    forward_backward_no_pipelining                  PP = 1: gradient accumulation, F B F B ...
    forward_backward_pipelining_without_interleaving  1F1B: warmup forwards, steady (F, B), cooldown
    forward_backward_pipelining_with_interleaving   1F1B over V model chunks per rank (virtual stages)

The two pipelined schedules run a plan (plan.py: which step, which transfer, in which order) with real
tensors. Transfers are posted asynchronously (p2p.post): a received tensor is waited for only by the
step that consumes it, and sends are waited for at the end of the step (finished ones are dropped on
the way), so no stage idles until its neighbour is ready to receive and transfers overlap compute.
Memory: once a stage output has been sent, its values are freed and only its autograd node
kept (deallocate_output; an in-flight send holds the storage until it completes), so a 1F1B stage holds
the activations of at most PP − rank micro-batches.
Each schedule returns the detached per-micro-batch losses on the last stage, [] elsewhere.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from megaflow.parallel import p2p, state
from megaflow.pipeline import timeline
from megaflow.pipeline.plan import ACT, BACKWARD, FORWARD, Comm, build_plan, virtual_stage


def microbatch_loss(loss_bs: torch.Tensor, loss_mask_bs: torch.Tensor) -> torch.Tensor:
    mask = loss_mask_bs.to(loss_bs.dtype)
    return (loss_bs * mask).sum() / mask.sum().clamp(min=1.0)


def forward_step(model, batch, autocast_ctx, hidden_sbh=None):
    """One model chunk on one micro-batch: the micro-batch loss on the chunk that holds the output
    layer (post_process), otherwise the hidden state [s, b, h] for the next stage."""
    device = state.get().device
    pre, post = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    with autocast_ctx():
        out = model(batch["tokens"].to(device) if pre else None,
                    batch["position_ids"].to(device) if pre else None,
                    labels_bs=batch["labels"].to(device) if post else None, hidden_sbh=hidden_sbh,
                    loss_mask_bs=batch["loss_mask"].to(device) if post else None)
    return microbatch_loss(out.float(), batch["loss_mask"].to(device)) if post else out


def forward_backward_no_pipelining(model, data_iterator, num_microbatches: int, forward_only: bool = False,
                                   loss_scale: float = 1.0, autocast_ctx=contextlib.nullcontext,
                                   forward_step_func=forward_step):
    """Gradient accumulation: forward and backward each micro-batch in turn. Returns the detached
    per-micro-batch losses."""
    losses = []
    for mb in range(num_microbatches):
        with timeline.record(FORWARD, 0, mb):
            loss = forward_step_func(model, next(data_iterator), autocast_ctx)
        if not forward_only:
            with timeline.record(BACKWARD, 0, mb):
                (loss * (loss_scale / num_microbatches)).backward()
        losses.append(loss.detach())
    return losses


def deallocate_output(out: torch.Tensor) -> None:
    """Free a sent stage output's values but keep its autograd node: the data becomes one element
    expanded to the full shape, so torch.autograd.backward(out, grad) still checks the gradient against
    the real shape. Only valid because the op that produced `out` (the residual add) does not save its
    result for backward; a view would keep its base alive, so views are refused."""
    if out._base is not None:
        raise RuntimeError("deallocate_output: the stage output is a view; freeing it would not free memory")
    out.data = torch.empty(1, dtype=out.dtype, device=out.device).expand(out.shape)


def model_chunks(model) -> list[nn.Module]:
    """A model is one chunk, or an nn.ModuleList of V chunks (interleaved schedule; build_model)."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


class _PlanRun:
    """State of one pipelined forward/backward pass: tensors keyed by (chunk, micro-batch)."""

    def __init__(self, chunks, data_iterator, num_microbatches, forward_only, loss_scale, autocast_ctx,
                 forward_step_func, shape, dtype, deallocate):
        st = state.get()
        self.chunks, self.data, self.m, self.forward_only = chunks, data_iterator, num_microbatches, forward_only
        self.scale, self.autocast_ctx, self.step_func = loss_scale, autocast_ctx, forward_step_func
        self.shape, self.dtype, self.deallocate = shape, dtype, deallocate
        self.rank, self.pp = st.pp_rank, st.pp_size
        self.last_stage = self.pp * len(chunks) - 1
        self.batches, self.batches_read, self.forwards_done = {}, 0, {}
        self.inputs, self.outputs, self.output_grads, self.input_grads = {}, {}, {}, {}
        self.losses = {}
        self.sends_in_flight = []  # p2p.Outgoing of the batches posted so far, until they complete

    def _received(self, table, key):
        """The tensor a step needs from `table` (inputs or output_grads), waiting for its transfer."""
        incoming = table.get(key)
        if not isinstance(incoming, p2p.Incoming):
            return incoming
        with timeline.record("wait", -1, -1):
            tensor = incoming.wait()
        if table is self.inputs:
            tensor.requires_grad_(not self.forward_only)
        table[key] = tensor
        return tensor

    def _batch(self, mb):
        while self.batches_read <= mb:  # micro-batches are first touched in order
            self.batches[self.batches_read] = next(self.data)
            self.batches_read += 1
        batch = self.batches[mb]
        self.forwards_done[mb] = self.forwards_done.get(mb, 0) + 1
        if self.forwards_done[mb] == len(self.chunks):
            del self.batches[mb]
        return batch

    def forward(self, chunk, mb):
        key = (chunk, mb)
        x = self._received(self.inputs, key)
        if self.forward_only:
            self.inputs.pop(key, None)
        with timeline.record(FORWARD, chunk, mb):
            out = self.step_func(self.chunks[chunk], self._batch(mb), self.autocast_ctx, hidden_sbh=x)
        if virtual_stage(self.rank, self.pp, chunk) == self.last_stage:
            self.losses[mb] = out.detach()
            if not self.forward_only:
                self.outputs[key] = out * (self.scale / self.m)
        else:
            self.outputs[key] = out

    def backward(self, chunk, mb):
        key = (chunk, mb)
        self._received(self.output_grads, key)
        out, x, grad = self.outputs.pop(key), self.inputs.pop(key, None), self.output_grads.pop(key, None)
        with timeline.record(BACKWARD, chunk, mb):
            torch.autograd.backward(out, grad_tensors=grad)
        if virtual_stage(self.rank, self.pp, chunk) > 0:
            self.input_grads[key] = x.grad

    def communicate(self, comm: Comm):
        sends = []
        for t in comm.sends:
            key = (t.chunk, t.microbatch)
            sends.append((t.peer, t.kind, self.outputs[key] if t.kind == ACT else self.input_grads.pop(key)))
        incoming, outgoing = p2p.post(sends, [(t.peer, t.kind) for t in comm.recvs], self.shape, self.dtype)
        self.sends_in_flight = [o for o in self.sends_in_flight if not o.done()] + [outgoing]
        for t in comm.sends:
            if t.kind == ACT:
                key = (t.chunk, t.microbatch)
                if self.forward_only:
                    del self.outputs[key]
                elif self.deallocate:
                    deallocate_output(self.outputs[key])
        for t, tensor in zip(comm.recvs, incoming):
            key = (t.chunk, t.microbatch)
            (self.inputs if t.kind == ACT else self.output_grads)[key] = tensor

    def run(self, plan):
        for action in plan:
            if isinstance(action, Comm):
                self.communicate(action)
            elif action.op == FORWARD:
                self.forward(action.chunk, action.microbatch)
            else:
                self.backward(action.chunk, action.microbatch)
        with timeline.record("wait", -1, -1):
            for outgoing in self.sends_in_flight:
                outgoing.wait()
        self.sends_in_flight = []
        leftovers = [d for d in (self.inputs, self.output_grads, self.input_grads) if d]
        if leftovers or (self.outputs and not self.forward_only):
            raise RuntimeError(f"pipeline plan left tensors behind: {leftovers or self.outputs}")
        return [self.losses[mb] for mb in sorted(self.losses)]


def _run_pipelined(model, data_iterator, num_microbatches, forward_only, loss_scale, autocast_ctx,
                   forward_step_func, tensor_shape, deallocate_outputs):
    st = state.get()
    chunks = model_chunks(model)
    shape = tuple(tensor_shape or p2p.activation_shape(chunks[0].cfg))
    dtype = next(chunks[0].parameters()).dtype
    plan = build_plan(st.pp_rank, st.pp_size, num_microbatches, len(chunks), forward_only)
    run = _PlanRun(chunks, data_iterator, num_microbatches, forward_only, loss_scale, autocast_ctx,
                   forward_step_func, shape, dtype, deallocate_outputs)
    return run.run(plan)


def forward_backward_pipelining_without_interleaving(
        model, data_iterator, num_microbatches: int, forward_only: bool = False, loss_scale: float = 1.0,
        autocast_ctx=contextlib.nullcontext, forward_step_func=forward_step, tensor_shape=None,
        deallocate_outputs: bool = True):
    """1F1B: min(PP − rank − 1, M) warmup forwards, then (F, B) pairs, then the remaining backwards."""
    if len(model_chunks(model)) != 1:
        raise ValueError("1F1B runs one model chunk per rank; this model has "
                         f"{len(model_chunks(model))} (use the interleaved schedule)")
    return _run_pipelined(model, data_iterator, num_microbatches, forward_only, loss_scale, autocast_ctx,
                          forward_step_func, tensor_shape, deallocate_outputs)


def forward_backward_pipelining_with_interleaving(
        model, data_iterator, num_microbatches: int, forward_only: bool = False, loss_scale: float = 1.0,
        autocast_ctx=contextlib.nullcontext, forward_step_func=forward_step, tensor_shape=None,
        deallocate_outputs: bool = True):
    """Interleaved 1F1B over the V chunks of an nn.ModuleList; M must be a multiple of PP."""
    if len(model_chunks(model)) < 2:
        raise ValueError("the interleaved schedule needs the V >= 2 model chunks build_model returns with "
                         "--num-layers-per-virtual-pipeline-stage")
    return _run_pipelined(model, data_iterator, num_microbatches, forward_only, loss_scale, autocast_ctx,
                          forward_step_func, tensor_shape, deallocate_outputs)


def get_forward_backward_func():
    """The schedule for the current parallel state (Megatron's choice)."""
    st = state.get()
    if st.pp_size == 1:
        return forward_backward_no_pipelining
    if st.virtual_pp_size > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving
