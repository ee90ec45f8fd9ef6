"""Checkpoints in Megatron's directory layout, written atomically.

    {save}/latest_checkpointed_iteration.txt        the iteration, written last (the tracker file)
    {save}/iter_{:07d}/config.json                  the resolved configuration
    {save}/iter_{:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   model, optimizer, schedule (DP rank 0)
    {save}/iter_{:07d}/mp_rank_.../rng_dp{dp:03d}.pt                     each rank's RNG streams
    {save}/iter_{:07d}/mp_rank_.../distrib_optim_dp{dp:03d}.pt           ZeRO: each DP rank's optimizer shard

Every rank writes into iter_{:07d}.tmp/, all ranks meet at a barrier, then rank 0 renames the folder
and only then points the tracker at it: an interrupted save never looks complete.
Loading uses torch.load(weights_only=True): a checkpoint never executes code.
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from megaflow.checkpoint.rng import get_rng_state
from megaflow.parallel import state

TRACKER = "latest_checkpointed_iteration.txt"
DISTRIBUTED = "distributed"  # model_optim_rng.pt's optimizer entry when each DP rank saved its own


def distrib_optim_name() -> str:
    """ZeRO optimizer state of this DP rank (Megatron keeps a distrib_optim.pt beside the model)."""
    return f"distrib_optim_dp{state.get().dp_rank:03d}.pt"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_dir_name() -> str:
    st = state.get()
    return f"mp_rank_{st.tp_rank:02d}" + (f"_{st.pp_rank:03d}" if st.pp_size > 1 else "")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, scaler, consumed_samples: int,
                    config_json: str, extra: dict | None = None) -> str:
    st = state.get()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if st.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _atomic_write_text(os.path.join(tmp, "config.json"), config_json)
    _barrier()
    rank_dir = os.path.join(tmp, rank_dir_name())
    os.makedirs(rank_dir, exist_ok=True)
    sharded = getattr(optimizer, "sharded", False)
    if sharded:  # ZeRO: every DP rank holds its own part of the optimizer state
        _save(optimizer.state_dict(), os.path.join(rank_dir, distrib_optim_name()))
    if st.dp_rank == 0:
        optim_state = None if optimizer is None else (DISTRIBUTED if sharded else optimizer.state_dict())
        payload = {"iteration": iteration, "consumed_samples": consumed_samples,
                   # Copies: parameters are views into one DP buffer. Saved as views they would still
                   # share that storage once loaded (safetensors refuses such tensors, and saving any
                   # one of them alone would write the whole buffer).
                   "model": {k: v.clone() for k, v in model.state_dict().items()},
                   "optimizer": optim_state,
                   "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "loss_scaler": scaler.state_dict() if scaler is not None else None,
                   "extra": extra or {}}
        _save(payload, os.path.join(rank_dir, "model_optim_rng.pt"))
    _save(get_rng_state(), os.path.join(rank_dir, f"rng_dp{st.dp_rank:03d}.pt"))
    _barrier()
    if st.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


def _save(obj, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def latest_iteration(root: str) -> int | None:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def _load(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, scaler=None, load_rng: bool = True,
                    iteration: int | None = None) -> dict:
    """Restore in place; returns {'iteration', 'consumed_samples', 'extra', 'rng_state'}.

    The RNG state is returned, not applied: the caller applies it (checkpoint.rng.set_rng_state) after
    everything that still draws random numbers during setup (a DataLoader iterator draws its seed)."""
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"--load {root}: no {TRACKER} (nothing saved there yet)")
    rank_dir = os.path.join(iteration_dir(root, iteration), rank_dir_name())
    payload = _load(os.path.join(rank_dir, "model_optim_rng.pt"))
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{rank_dir}: model mismatch (missing {missing}, unexpected {unexpected}); "
                              "was it saved with another layout or model config?")
    if optimizer is not None and payload["optimizer"] is not None:
        saved_sharded = isinstance(payload["optimizer"], str) and payload["optimizer"] == DISTRIBUTED
        if saved_sharded != getattr(optimizer, "sharded", False):
            raise CheckpointError(f"{rank_dir}: optimizer state saved {'with' if saved_sharded else 'without'} "
                                  "--use-distributed-optimizer; load it the same way (or --no-load-optim)")
        sd = _load(os.path.join(rank_dir, distrib_optim_name())) if saved_sharded else payload["optimizer"]
        try:
            optimizer.load_state_dict(sd)
        except ValueError as e:
            raise CheckpointError(f"{rank_dir}: {e}") from e
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload["loss_scaler"] is not None:
        scaler.load_state_dict(payload["loss_scaler"])
    rng_state = _load(os.path.join(rank_dir, f"rng_dp{state.get().dp_rank:03d}.pt")) if load_rng else None
    return {"iteration": payload["iteration"], "consumed_samples": payload["consumed_samples"],
            "extra": payload.get("extra", {}), "rng_state": rng_state}
