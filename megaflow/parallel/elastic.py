"""torchrun's restarts (--max-restarts): the attempt number, and a rendezvous store of its own per attempt.

When torchrun restarts a job's workers, they reconnect to the same store (its agent hosts it,
TORCHELASTIC_USE_AGENT_STORE=True) under the same key names: the addresses the previous attempt's
processes published for their gloo/NCCL connections are still there, and a new process that reads one
before its peer overwrote it connects to a dead process ("Connection refused"). Each attempt therefore
works under its own key prefix.
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def attempt() -> int:
    """How many times torchrun restarted this job's workers (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_store(timeout_minutes: float):
    """A store for init_process_group with this attempt's key prefix when torchrun's agent hosts the
    store; None otherwise (init_process_group then builds its own from MASTER_ADDR/PORT)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False,
                          timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.PrefixStore(f"megaflow/attempt{attempt()}", store)


def store_hosted_here(rank: int) -> bool:
    """Does this process serve the rendezvous store? Rank 0 does without torchrun's agent store (its
    exit takes the store away from the others); under torchrun the agent serves it."""
    return rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
