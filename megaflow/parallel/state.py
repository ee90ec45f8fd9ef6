"""Process groups in Megatron's rank order (device and backend choice: parallel/device.py).

Dense view, rank order "tp-cp-dp-pp": the tensor-parallel index varies fastest, then context-parallel,
then data-parallel, then pipeline:
    global_rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank))
Example, 8 ranks, TP=2, PP=2, DP=2 (CP=1): TP groups [0,1] [2,3] [4,5] [6,7]; DP groups [0,2] [1,3] [4,6]
[5,7]; PP groups [0,4] [1,5] [2,6] [3,7]. The embedding group joins the first and last pipeline stage of
each pipeline (tied input/output embeddings keep their shared weight identical through it).

Expert view (MoE layers), rank order "etp-ep-edp-pp": inside each pipeline stage the same TP·CP·DP ranks
are regrouped as expert-tensor-parallel (fastest), expert-parallel, expert-data-parallel:
    global_rank = etp_rank + ETP * (ep_rank + EP * edp_rank) + (TP·CP·DP) * pp_rank
so EP is carved out of data (and context) parallelism, as in Megatron-Core. With CP = EP = 1 and
ETP = TP the expert groups coincide with the dense ones.

Every group comes from one ordered list of (dimension, size): a group is the set of ranks that differ
only along the named dimensions.

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
from megaflow.parallel.elastic import attempt_store

# Group name -> the dimensions its ranks vary along, per view. "dp_cp" reduces dense gradients (data and
# context parallel ranks see different tokens of the same weights); "mp" is the model-parallel group.
DENSE_GROUPS = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "dp_cp": ("cp", "dp"), "tp_cp": ("tp", "cp"),
                "pp": ("pp",), "mp": ("tp", "pp")}
EXPERT_GROUPS = {"etp": ("etp",), "ep": ("ep",), "edp": ("edp",), "etp_ep": ("etp", "ep")}


def dense_dims(world_size: int, tp: int, pp: int, cp: int = 1):
    """[(name, size)], fastest first, of the dense view."""
    if world_size % (tp * cp * pp):
        raise ValueError(f"world size {world_size} not divisible by TP×CP×PP = {tp}×{cp}×{pp}")
    return [("tp", tp), ("cp", cp), ("dp", world_size // (tp * cp * pp)), ("pp", pp)]


def expert_dims(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1, etp: Optional[int] = None):
    """[(name, size)], fastest first, of the expert view (ETP defaults to TP, as in Megatron-Core)."""
    etp = tp if etp is None else etp
    per_stage = world_size // pp
    if world_size % pp or per_stage % (etp * ep):
        raise ValueError(f"TP×CP×DP = {per_stage} ranks per pipeline stage not divisible by "
                         f"ETP×EP = {etp}×{ep}")
    return [("etp", etp), ("ep", ep), ("edp", per_stage // (etp * ep)), ("pp", pp)]


def coordinates(rank: int, dims) -> dict:
    """A rank's index along each dimension (the first varies fastest)."""
    coords = {}
    for name, size in dims:
        coords[name], rank = rank % size, rank // size
    return coords


def groups_along(world_size: int, dims, varying) -> list:
    """Every group of ranks that differ only along the dimensions in `varying`: ranks ascending, groups
    ordered by their first rank (Megatron's order)."""
    by_key = {}
    for r in range(world_size):
        c = coordinates(r, dims)
        by_key.setdefault(tuple(v for k, v in c.items() if k not in varying), []).append(r)
    return sorted(by_key.values(), key=lambda g: g[0])


def layout_ranks(world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1, etp: Optional[int] = None):
    """The rank lists of every group of both views, in Megatron's order (pure function)."""
    dense = dense_dims(world_size, tp, pp, cp)
    expert = expert_dims(world_size, tp, pp, cp, ep, etp)
    out = {name: groups_along(world_size, dense, varying) for name, varying in DENSE_GROUPS.items()}
    out.update({name: groups_along(world_size, expert, varying) for name, varying in EXPERT_GROUPS.items()})
    out["embedding"] = [sorted({g[0], g[-1]}) for g in out["pp"]]
    return out


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    cp_size: int = 1
    ep_size: int = 1
    etp_size: int = 1
    edp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
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


def _state_for(world_size: int, rank: int, tp: int, pp: int, cp: int, ep: int, etp: Optional[int],
               **kw) -> tuple:
    """A ParallelState with every size and rank filled in, and the layout it came from."""
    dense, expert = dense_dims(world_size, tp, pp, cp), expert_dims(world_size, tp, pp, cp, ep, etp)
    st = ParallelState(world_size=world_size, rank=rank, **kw)
    for dims in (dense, expert):
        coords = coordinates(rank, dims)
        for name, size in dims:
            setattr(st, f"{name}_size", size)
            setattr(st, f"{name}_rank", coords[name])
    return st, layout_ranks(world_size, tp, pp, cp, ep, etp)


def initialize(tp: int = 1, pp: int = 1, backend: Optional[str] = None, timeout_minutes: float = 10.0,
               device: Optional[str] = None, virtual_pp: int = 1, cp: int = 1, ep: int = 1,
               etp: Optional[int] = None) -> ParallelState:
    """Start torch.distributed from torchrun's environment (if any) and build the groups."""
    global _STATE
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    set_current(dev)
    backend = backend or default_backend(dev)
    if world_size > 1 and not dist.is_initialized():
        store = attempt_store(timeout_minutes)  # under torchrun: keys of this restart attempt only
        where = {"store": store, "rank": int(os.environ["RANK"]), "world_size": world_size} if store else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None, **where)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Subgroups default to torch's 30-minute timeout, not the default group's: pass ours on, so a
    # collective or pipeline transfer with a dead peer fails after --distributed-timeout-minutes.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    state, layout = _state_for(world_size, rank, tp, pp, cp, ep, etp, device=dev, backend=backend,
                               virtual_pp_size=virtual_pp)
    for name, group_list in layout.items():
        for ranks in group_list:
            # Every rank must call new_group for every group, in the same order. Each name gets its own
            # group even where rank lists coincide (e.g. "dp" and "dp_cp" when CP = 1), as in Megatron:
            # code and tests may tell collectives apart by their group.
            pg = dist.new_group(ranks, timeout=timeout) if world_size > 1 else None
            if rank in ranks:
                state.groups[name], state.ranks[name] = pg, ranks
    _STATE = state
    return state


@contextlib.contextmanager
def simulated(world_size: int, tp: int, pp: int, rank: int, device: str = "meta", virtual_pp: int = 1,
              cp: int = 1, ep: int = 1, etp: Optional[int] = None):
    """The parallel state one rank of a layout would have, without process groups: for building that
    rank's model on the meta device (--dry-run, the planner's checks). Restores the previous state."""
    global _STATE
    previous = _STATE
    st, layout = _state_for(world_size, rank, tp, pp, cp, ep, etp, device=torch.device(device),
                            virtual_pp_size=virtual_pp)
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


def get_context_parallel_group():
    return get().groups.get("cp")


def get_data_parallel_group_with_context_parallel():
    """Dense gradients are reduced over data AND context parallel ranks."""
    return get().groups.get("dp_cp")


def get_expert_model_parallel_group():
    return get().groups.get("ep")


def get_expert_tensor_parallel_group():
    return get().groups.get("etp")


def get_expert_data_parallel_group():
    """Expert gradients are reduced over the ranks that hold the same experts."""
    return get().groups.get("edp")
