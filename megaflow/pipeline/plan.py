"""Pipeline schedules as plans: for one pipeline rank, the order of its forward and backward steps and
the batched point-to-point transfers between them. Pure functions of (rank, PP, V, M): the executor
(schedules.py) runs a plan with real tensors, the simulator (simulate.py) checks plans for every rank
and draws their ideal timelines.

Vocabulary. The model is cut into S = PP·V *virtual stages*; rank r holds V *chunks*, chunk c being
virtual stage c·PP + r (Megatron's interleaved assignment; V = 1 is plain 1F1B). A step is F or B of
(chunk, micro-batch). Activations travel to the next virtual stage (rank r+1, or rank 0's next chunk
from the last rank), gradients to the previous one.

Step order (FORMATS.md §3):
    1F1B:        warmup = min(PP − rank − 1, M) forwards, then M − warmup (F, B) pairs, then the
                 remaining backwards. With PP = 1 this is F, B, F, B, ...: plain gradient accumulation.
    interleaved: the k-th forward runs chunk (k // PP) % V on micro-batch (k // (PP·V))·PP + k % PP
                 (groups of PP micro-batches walk through the chunks); backwards walk the chunks in
                 reverse. warmup = (PP − rank − 1)·2 + (V − 1)·PP forwards (at most M·V), then pairs.
    forward only: every forward in order.

Transfers are posted asynchronously and waited for only where needed (p2p.post): a step waits for the
receive it consumes, nobody waits for a send until the end of the step. Before each step one batch
posts the previous step's sends and the receives of the step *after* this one (before the first step
also its own), so a receive is posted a whole step before it is needed and the transfer lands while
this rank computes. Sends on gloo and NCCL complete only when the receiver posts the matching receive;
a sender does not wait for that, so the only dependencies are step -> its received input, and every
plan is checked for deadlocks and misdelivered tensors under exactly that rule (simulate.py).
Every transfer carries a tag by kind (ACT, GRAD): with PP = 2 both neighbours are the same rank and
activations and gradients flow both ways between it and us; per (peer, tag) messages arrive in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megaflow.parallel.p2p import NEXT, PREV  # noqa: F401 (the peers a Transfer names)

FORWARD, BACKWARD = "F", "B"
ACT, GRAD = 0, 1          # message kinds, also the P2P tags


@dataclass(frozen=True)
class Step:
    op: str          # FORWARD or BACKWARD
    chunk: int       # model chunk on this rank (0 without interleaving)
    microbatch: int


@dataclass(frozen=True)
class Transfer:
    peer: str        # NEXT or PREV pipeline rank (ring order: the last rank's next is rank 0)
    kind: int        # ACT (forward activations, to NEXT) or GRAD (input gradients, to PREV)
    chunk: int       # this rank's chunk the tensor belongs to
    microbatch: int


@dataclass(frozen=True)
class Comm:
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]


Action = Union[Step, Comm]


def warmup_steps(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
                 forward_only: bool = False) -> int:
    total = num_microbatches * num_chunks
    if forward_only:
        return total
    if num_chunks == 1:
        return min(pp_size - pp_rank - 1, total)
    return min((pp_size - pp_rank - 1) * 2 + (num_chunks - 1) * pp_size, total)


def _kth(k: int, pp_size: int, num_chunks: int, forward: bool) -> tuple[int, int]:
    """(chunk, micro-batch) of the k-th forward (or backward) step of a rank."""
    group, within = divmod(k, pp_size * num_chunks)
    chunk = within // pp_size
    if not forward:
        chunk = num_chunks - 1 - chunk
    return chunk, group * pp_size + within % pp_size


def step_order(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
               forward_only: bool = False) -> list[Step]:
    """The compute steps of one rank, in order."""
    if num_chunks > 1 and num_microbatches % pp_size:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) "
                         f"to be a multiple of the pipeline size ({pp_size})")
    total = num_microbatches * num_chunks
    warmup = warmup_steps(pp_rank, pp_size, num_microbatches, num_chunks, forward_only)
    fwd = [Step(FORWARD, *_kth(k, pp_size, num_chunks, True)) for k in range(total)]
    if forward_only:
        return fwd
    bwd = [Step(BACKWARD, *_kth(k, pp_size, num_chunks, False)) for k in range(total)]
    order = fwd[:warmup]
    for i in range(total - warmup):
        order += [fwd[warmup + i], bwd[i]]
    return order + bwd[total - warmup:]


def virtual_stage(pp_rank: int, pp_size: int, chunk: int) -> int:
    return chunk * pp_size + pp_rank


def needs(step: Step, pp_rank: int, pp_size: int, num_chunks: int) -> tuple[Transfer, ...]:
    """What a step must receive first: its input (F, unless the first virtual stage) or its output's
    gradient (B, unless the last virtual stage, which starts from the loss)."""
    v = virtual_stage(pp_rank, pp_size, step.chunk)
    if step.op == FORWARD and v > 0:
        return (Transfer(PREV, ACT, step.chunk, step.microbatch),)
    if step.op == BACKWARD and v < pp_size * num_chunks - 1:
        return (Transfer(NEXT, GRAD, step.chunk, step.microbatch),)
    return ()


def produces(step: Step, pp_rank: int, pp_size: int, num_chunks: int) -> tuple[Transfer, ...]:
    """What a step sends on: its output (F, unless the last virtual stage) or its input's gradient
    (B, unless the first virtual stage)."""
    v = virtual_stage(pp_rank, pp_size, step.chunk)
    if step.op == FORWARD and v < pp_size * num_chunks - 1:
        return (Transfer(NEXT, ACT, step.chunk, step.microbatch),)
    if step.op == BACKWARD and v > 0:
        return (Transfer(PREV, GRAD, step.chunk, step.microbatch),)
    return ()


def build_plan(pp_rank: int, pp_size: int, num_microbatches: int, num_chunks: int = 1,
               forward_only: bool = False) -> list[Action]:
    """Steps with the transfers woven in: [receives of steps 0 and 1], step 0, [sends of step 0 +
    receives of step 2], step 1, [sends of step 1 + receives of step 3], step 2, ... With one stage
    there is nothing to transfer (and gloo cannot send to itself)."""
    steps = step_order(pp_rank, pp_size, num_microbatches, num_chunks, forward_only)
    if pp_size == 1:
        return list(steps)
    recvs_of = [needs(s, pp_rank, pp_size, num_chunks) for s in steps]
    plan: list[Action] = []
    pending: tuple[Transfer, ...] = ()
    for k, step in enumerate(steps):
        recvs = (recvs_of[0] if k == 0 else ()) + (recvs_of[k + 1] if k + 1 < len(steps) else ())
        if pending or recvs:
            plan.append(Comm(pending, recvs))
        plan.append(step)
        pending = produces(step, pp_rank, pp_size, num_chunks)
    if pending:
        plan.append(Comm(pending, ()))
    return plan


def source_of(transfer: Transfer, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """(rank, chunk) at the other end of a transfer received by (pp_rank, transfer.chunk)."""
    if transfer.peer == PREV:
        return (pp_rank - 1) % pp_size, transfer.chunk - (1 if pp_rank == 0 else 0)
    return (pp_rank + 1) % pp_size, transfer.chunk + (1 if pp_rank == pp_size - 1 else 0)
