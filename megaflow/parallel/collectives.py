"""Flat collectives shared by data, tensor, context and expert parallelism, fast on every backend.

    reduce_scatter(output, input, group)   output = this rank's 1/N slice of the sum of every rank's input
    all_gather(output, input, group)       output = every rank's input, concatenated in rank order

NCCL (any backend but gloo): torch's own reduce-scatter. gloo, megaflow's CPU backend: its
reduce-scatter costs 2.0-2.3x the wall and CPU time of an all-to-all of the same bytes followed by a
local sum at 3-16 MiB, 1.7x at 64 MiB (bench/gloo_collectives.py, 4 processes), so there each
rank sends slice j of its input to rank j in one all_to_all_single and adds the N slices it receives,
in rank order: ((s0 + s1) + s2) + ..., the same order on every rank, every run and any thread count.
The all-to-all needs a receive buffer as large as the input until the reduction is waited for
(`holds_input_copy`): callers with several reductions in flight bound how many.

Functions are looked up on torch.distributed at call time, so the flight recorder's wrappers
(parallel/flight_recorder.py) see every collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def holds_input_copy(input: torch.Tensor, group=None) -> bool:
    """Does reduce_scatter(…, input) hold a temporary copy of input until it is waited for?"""
    return input.device.type == "cpu" and "gloo" in str(dist.get_backend(group))


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Sum input over the group's ranks and keep this rank's slice: input is [N·k, ...] (N ranks),
    output [k, ...] (it may be a view of input: the ZeRO buckets reduce in place). With async_op a
    handle whose wait() completes it; else None."""
    if not holds_input_copy(input, group):
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return fn(output, input, group=group, async_op=async_op)
    received = torch.empty_like(input)
    if async_op:
        work = dist.all_to_all_single(received, input, group=group, async_op=True)
        return _SumOnWait(work, received, output, dist.get_world_size(group))
    # Without a handle, so torch.compile traces it into the graph (sequence parallelism in a block).
    dist.all_to_all_single(received, input, group=group)
    _sum_slices(received, output, dist.get_world_size(group))
    return None


def all_gather(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """output [N·k, ...] = the N ranks' input [k, ...] in rank order (all_gather_single is torch
    >= 2.13's name for all_gather_into_tensor, deprecated there). On gloo too: an all-to-all of
    the shard repeated N times came within ±10% of it (bench/gloo_collectives.py), for N times the input."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


class _SumOnWait:
    """An all-to-all in flight; wait() completes it and sums the received slices into output."""

    def __init__(self, work, received: torch.Tensor, output: torch.Tensor, world: int):
        self.work, self.received, self.output, self.world = work, received, output, world

    def is_completed(self) -> bool:
        return self.received is None or self.work.is_completed()

    def wait(self, timeout=None) -> bool:
        if self.received is None:
            return True
        self.work.wait() if timeout is None else self.work.wait(timeout)
        with torch.no_grad():
            _sum_slices(self.received, self.output, self.world)
        self.received = None  # the temporary goes now, not when the caller drops the handle
        return True


def _sum_slices(received: torch.Tensor, output: torch.Tensor, world: int) -> None:
    """output = received's world slices summed in rank order."""
    slices = received.view(world, *output.shape)
    output.copy_(slices[0])
    for s in slices[1:]:
        output.add_(s)
