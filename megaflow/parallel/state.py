"""Process groups in Megatron's rank order (device and backend choice: parallel/device.py).

Rank order "tp-dp-pp": the tensor-parallel index varies fastest, then data-parallel, then pipeline:
    global_rank = tp_rank + TP * (dp_rank + DP * pp_rank)
Example, 8 ranks, TP=2, PP=2, DP=2: TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6] [5,7];
PP groups [0,4] [1,5] [2,6] [3,7]. The embedding group joins the first and last pipeline stage of each
pipeline (tied input/output embeddings keep their shared weight identical through it).

Runs without a launcher too: one process, world size 1, no torch.distributed calls at all.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megaflow.parallel.device import default_backend, default_device, set_current


def layout_ranks(world_size: int, tp: int, pp: int):
    """The rank lists of every TP, DP, PP and embedding group, in Megatron's order (pure function)."""
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} not divisible by TP×PP = {tp}×{pp}")
    dp = world_size // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)  # noqa: E731
    tp_groups = [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_groups = [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)]
    embedding_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    return dict(tp=tp_groups, dp=dp_groups, pp=pp_groups, mp=mp_groups, embedding=embedding_groups)


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    groups: dict = field(default_factory=dict)   # name -> ProcessGroup (None when world size is 1)
    ranks: dict = field(default_factory=dict)    # name -> the global ranks of this rank's group
    virtual_pp_size: int = 1
    virtual_pp_rank: int = 0                     # the model chunk being run (interleaved schedule)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_STATE: Optional[ParallelState] = None


def initialize(tp: int = 1, pp: int = 1, backend: Optional[str] = None, timeout_minutes: float = 10.0,
               device: Optional[str] = None, virtual_pp: int = 1) -> ParallelState:
    """Start torch.distributed from torchrun's environment (if any) and build the groups."""
    global _STATE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    set_current(dev)
    backend = backend or default_backend(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Subgroups default to torch's 30-minute timeout, not the default group's: pass ours on, so a
    # collective or pipeline transfer with a dead peer fails after --distributed-timeout-minutes.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    layout = layout_ranks(world_size, tp, pp)
    state = ParallelState(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp,
                          dp_size=world_size // (tp * pp), device=dev, backend=backend,
                          virtual_pp_size=virtual_pp)
    state.tp_rank = rank % tp
    state.dp_rank = (rank // tp) % state.dp_size
    state.pp_rank = rank // (tp * state.dp_size)
    for name, group_list in layout.items():
        for ranks in group_list:
            # Every rank must call new_group for every group, in the same order.
            pg = dist.new_group(ranks, timeout=timeout) if world_size > 1 else None
            if rank in ranks:
                state.groups[name], state.ranks[name] = pg, ranks
    _STATE = state
    return state


@contextlib.contextmanager
def simulated(world_size: int, tp: int, pp: int, rank: int, device: str = "meta", virtual_pp: int = 1):
    """The parallel state one rank of a layout would have, without process groups: for building that
    rank's model on the meta device (--dry-run, the planner's checks). Restores the previous state."""
    global _STATE
    previous = _STATE
    dp = world_size // (tp * pp)
    st = ParallelState(world_size=world_size, rank=rank, tp_size=tp, pp_size=pp, dp_size=dp,
                       tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp),
                       device=torch.device(device), virtual_pp_size=virtual_pp)
    layout = layout_ranks(world_size, tp, pp)
    for name, group_list in layout.items():
        for ranks in group_list:
            if rank in ranks:
                st.groups[name], st.ranks[name] = None, ranks
    _STATE = st
    try:
        yield st
    finally:
        _STATE = previous


def get() -> ParallelState:
    """The current parallel state; a world-size-1 CPU state if initialize() was never called."""
    global _STATE
    if _STATE is None:
        _STATE = ParallelState(device=default_device())
    return _STATE


def destroy() -> None:
    global _STATE
    from megaflow.parallel import health
    health.stop()
    if dist.is_initialized():
        # Gloo aborts a process that tears down while a peer still talks to it: meet first.
        dist.barrier()
        dist.destroy_process_group()
    _STATE = None


# Getters in Megatron's vocabulary.
def get_tensor_model_parallel_group():
    return get().groups.get("tp")


def get_pipeline_model_parallel_group():
    return get().groups.get("pp")


def get_data_parallel_group():
    return get().groups.get("dp")


def get_embedding_group():
    return get().groups.get("embedding")


def get_tensor_model_parallel_world_size() -> int:
    return get().tp_size


def get_tensor_model_parallel_rank() -> int:
    return get().tp_rank


def get_pipeline_model_parallel_world_size() -> int:
    return get().pp_size


def get_pipeline_model_parallel_rank() -> int:
    return get().pp_rank


def get_data_parallel_world_size() -> int:
    return get().dp_size


def get_data_parallel_rank() -> int:
    return get().dp_rank
