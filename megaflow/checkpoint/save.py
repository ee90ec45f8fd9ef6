"""Saving a distributed run: every rank writes its own pieces (checkpoint/format.py), synchronously or
from a background thread (--async-save), and rank 0 publishes the iteration once all files are flushed.

A save, on every rank:
  1. rank 0 clears debris of interrupted saves and creates iter_{:07d}.tmp/ (barrier);
  2. this rank's pieces are copied to CPU (synchronously: training may change the parameters as soon
     as save() returns) and the index of every rank's pieces is gathered on rank 0;
  3. the rank file is written and fsync'ed, in a thread with --async-save;
  4. finalize, a collective: every rank reports its file (size, or the error); rank 0 writes
     metadata.json, renames iter_{:07d}.tmp to iter_{:07d}, then rewrites the tracker, then applies the
     retention flags. An async save is finalized by poll() at the first iteration where every rank's
     thread is done (one small all-reduce per iteration while a save is pending), or by wait().
Which rank writes what: a tensor is written once, by DP rank 0 (every DP rank with ZeRO: each its own
optimizer shard), by TP rank 0 for tensors replicated across TP, and not by the last pipeline stage
for a tied output layer (a copy of the first stage's word embeddings).
"""
from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist
from torch import nn

from megaflow.checkpoint import format as fmt
from megaflow.checkpoint.rng import get_rng_state, to_tensors
from megaflow.model.init import full_shape, global_name
from megaflow.parallel import state


def model_chunks(model) -> list:
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def named_parameters(model):
    """(global name, param, is_tied_copy) of every parameter of every chunk."""
    for chunk in model_chunks(model):
        for local, p in chunk.named_parameters():
            name = global_name(chunk, local)
            yield name, p, local == "output_layer.weight" and name == "word_embeddings.weight"


def _writes(p, is_copy: bool, replicated_over_dp: bool) -> bool:
    st = state.get()
    tp_sharded = getattr(p, "tensor_parallel", False) and st.tp_size > 1
    # Replicated over DP×CP (context-parallel ranks hold the same weights): one of them writes.
    first_replica = st.dp_rank == 0 and st.cp_rank == 0
    return not is_copy and (st.tp_rank == 0 or tp_sharded) and (first_replica or not replicated_over_dp)


def collect_rank_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(tensors {key: CPU copy}, index {key: entry with this rank's piece}, scalars) of this rank."""
    st = state.get()
    tensors, index, scalars = {}, {}, {}
    if optimizer is not None:
        optimizer.finish_param_sync()  # ZeRO: the last step's parameter all-gathers may be in flight

    def add(kind, name, p, data, lo, hi):
        key = fmt.tensor_key(kind, name)
        tensors[key] = data.detach().to("cpu", copy=True).contiguous()
        index[key] = fmt.piece_entry(fmt.sharding_of(p), data.dtype, full_shape(p), p.shape, st.tp_rank,
                                     st.tp_size, lo, hi)

    copies = set()
    for name, p, is_copy in named_parameters(model):
        if is_copy:
            copies.add(id(p))
        if _writes(p, is_copy, replicated_over_dp=True):
            add(fmt.MODEL, name, p, p, 0, p.numel())
    if optimizer is not None:
        for pc, s in optimizer.piece_states():
            if not _writes(pc.param, id(pc.param) in copies, replicated_over_dp=not optimizer.sharded):
                continue
            for k, v in s.items():
                if v.dim() == 0:
                    scalars[fmt.tensor_key(f"optim.{k}", pc.name)] = v.item()
                else:
                    add(f"optim.{k}", pc.name, pc.param, v.reshape(-1), pc.lo, pc.hi)
    return tensors, index, scalars


def _gather_to_rank0(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast_from_rank0(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class _Pending:
    def __init__(self, iteration, metadata, fname):
        self.iteration, self.metadata, self.fname = iteration, metadata, fname
        self.size, self.error, self.thread = None, None, None

    def write(self, path, tensors, header):
        try:
            self.size = fmt.write_rank_file(path, tensors, header)
        except BaseException as e:  # reported to rank 0 at finalize; the tracker is not touched
            self.error = f"{path}: {type(e).__name__}: {e}"


class CheckpointWriter:
    """Saves into one directory; keeps at most one asynchronous save in flight."""

    def __init__(self, root: str, async_save: bool = False, keep_last: int | None = None,
                 retain_interval: int | None = None):
        self.root, self.async_save = root, async_save
        self.keep_last, self.retain_interval = keep_last, retain_interval
        self.pending: _Pending | None = None

    def save(self, iteration, model, optimizer, scheduler, scaler, consumed_samples: int, config_json: str,
             extra: dict | None = None) -> str | None:
        """Save (or start saving) `iteration`; returns its folder once complete, None while in flight."""
        self.wait()
        st = state.get()
        tmp = fmt.iteration_dir(self.root, iteration) + ".tmp"
        if st.rank == 0:
            fmt.prepare_tmp_dir(self.root, iteration, config_json)
        _barrier()
        tensors, index, scalars = collect_rank_state(model, optimizer)
        rng_tensors, rng_rest = to_tensors(get_rng_state())
        tensors.update({f"rng/{k}": v for k, v in rng_tensors.items()})
        # One file per rank: its index in the DP×CP group (cp + CP·dp; the DP rank when CP = 1).
        fname = fmt.rank_file_name(st.tp_rank, st.pp_rank, st.cp_rank + st.cp_size * st.dp_rank)
        header = {"rank": st.rank, "tp_rank": st.tp_rank, "pp_rank": st.pp_rank, "dp_rank": st.dp_rank,
                  "cp_rank": st.cp_rank, "rng": rng_rest}
        gathered = _gather_to_rank0((fname, index, scalars))
        metadata = None
        if st.rank == 0:
            merged_scalars = {}
            for _f, _i, s in gathered:
                merged_scalars.update(s)
            metadata = {"format": fmt.FORMAT, "iteration": iteration, "consumed_samples": consumed_samples,
                        "layout": {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "cp": st.cp_size,
                                   "vpp": len(model_chunks(model)), "world_size": st.world_size,
                                   "distributed_optimizer": bool(getattr(optimizer, "sharded", False))},
                        "optimizer": None if optimizer is None else type(optimizer.optimizer).__name__,
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "loss_scaler": scaler.state_dict() if scaler is not None else None,
                        "extra": extra or {}, "rng": True,
                        "tensors": fmt.merge_indices({f: i for f, i, _s in gathered}),
                        "scalars": merged_scalars}
        job = _Pending(iteration, metadata, fname)
        args = (os.path.join(tmp, fname), tensors, header)
        if self.async_save:
            job.thread = threading.Thread(target=job.write, args=args, name=f"checkpoint-{iteration}", daemon=True)
            job.thread.start()
            self.pending = job
            return None
        job.write(*args)
        self.pending = job
        return self._finalize()

    def poll(self) -> str | None:
        """Finalize the async save in flight if every rank's thread is done (collective: every rank
        calls it at the same point). Returns the folder when it finalized one."""
        if self.pending is None:
            return None
        done = torch.tensor([0.0 if self.pending.thread.is_alive() else 1.0], device=state.get().device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self._finalize() if done.item() == 1.0 else None

    def wait(self) -> str | None:
        """Block until the save in flight is complete and published (collective)."""
        return None if self.pending is None else self._finalize()

    def _finalize(self) -> str:
        job, self.pending = self.pending, None
        if job.thread is not None:
            job.thread.join()
        reports = _gather_to_rank0((job.fname, job.size, job.error))
        outcome = None
        if state.get().rank == 0:
            errors = [e for _f, _s, e in reports if e]
            if errors:
                outcome = f"checkpoint of iteration {job.iteration} failed, the tracker is unchanged: " + \
                          "; ".join(errors)
            else:
                try:
                    job.metadata["files"] = {f: s for f, s, _e in reports}
                    fmt.finalize(self.root, job.iteration, job.metadata)
                except OSError as e:  # reported to every rank rather than leaving them waiting
                    outcome = f"checkpoint of iteration {job.iteration} could not be published: {e}"
                else:
                    try:
                        fmt.apply_retention(self.root, job.iteration, self.keep_last, self.retain_interval)
                    except OSError as e:  # the new checkpoint is published: a leftover old one is no error
                        print(f"WARNING: could not delete old checkpoints in {self.root}: {e}", flush=True)
        outcome = _broadcast_from_rank0(outcome)  # also: no rank returns before the tracker is written
        if outcome:
            raise fmt.CheckpointError(outcome)
        return fmt.iteration_dir(self.root, job.iteration)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, scaler, consumed_samples: int,
                    config_json: str, extra: dict | None = None) -> str:
    """A synchronous save (CheckpointWriter for --async-save and retention)."""
    return CheckpointWriter(root).save(iteration, model, optimizer, scheduler, scaler, consumed_samples,
                                       config_json, extra)
