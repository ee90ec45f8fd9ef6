"""Saving a distributed run: every rank writes its own pieces (checkpoint/format.py), synchronously or
from a background thread (--async-save), and rank 0 publishes the iteration once all files are flushed.

A save, on every rank:
  1. rank 0 clears debris of interrupted saves and creates iter_{:07d}.tmp/ (barrier);
  2. this rank's pieces are copied to host buffers reused across saves (checkpoint/staging.py; from a
     GPU: non_blocking into page-locked memory, fenced by an event the writer waits for) before save()
     returns, since training may change the parameters right after; with defer_host_copies (the
     trainer's --async-save) CPU tensors are copied by the writer thread instead, and the trainer's
     next update waits for those copies (staging.wait_staged); the index of every rank's pieces is
     gathered on rank 0;
  3. the rank file is written and fsync'ed, in a thread with --async-save;
  4. finalize, a collective: every rank reports its file (size, or the error); rank 0 writes
     metadata.json, renames iter_{:07d}.tmp to iter_{:07d}, then rewrites the tracker, then applies the
     retention flags. An async save is finalized by poll() at the first iteration where every rank's
     thread is done (one small all-reduce per iteration while a save is pending), or by wait().
Which rank writes what: a tensor is written once, by DP rank 0 (every DP rank with ZeRO: each its own
optimizer shard, and at ZeRO-3 its shard of the weights too), by TP rank 0 for tensors replicated across
TP, and not by the last pipeline stage for a tied output layer (a copy of the first stage's word
embeddings). MoE experts, named by their global expert index, are written by expert-DP rank 0 of the
ranks holding them (every expert-DP rank with ZeRO), so a checkpoint holds each expert once whatever the
EP size.
"""
from __future__ import annotations

import os
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

from megaflow.checkpoint import format as fmt
from megaflow.checkpoint.rng import get_rng_state, to_tensors
from megaflow.checkpoint.staging import HostStaging
from megaflow.model.init import full_shape, global_name
from megaflow.parallel import state


def model_chunks(model) -> list:
    return list(model) if isinstance(model, nn.ModuleList) else [model]


def named_parameters(model):
    """(global name, param, is_tied_copy) of every parameter of every chunk."""
    for chunk in model_chunks(model):
        for local, p in chunk.named_parameters():
            name = global_name(chunk, local)
            yield name, p, name == "word_embeddings.weight" and local != name  # a later stage's copy


def _writes(p, is_copy: bool, replicated_over_dp: bool) -> bool:
    st = state.get()
    tp_sharded = getattr(p, "tensor_parallel", False) and st.tp_size > 1
    if getattr(p, "expert_parallel", False):  # MoE expert: unique per (ETP, EP) rank, replicated over expert-DP
        return (st.etp_rank == 0 or tp_sharded) and (st.edp_rank == 0 or not replicated_over_dp)
    # Replicated over DP×CP (context-parallel ranks hold the same weights): one of them writes.
    first_replica = st.dp_rank == 0 and st.cp_rank == 0
    return not is_copy and (st.tp_rank == 0 or tp_sharded) and (first_replica or not replicated_over_dp)


def collect_rank_state(model, optimizer, staging: HostStaging | None = None) -> tuple[dict, dict, dict]:
    """(tensors {key: CPU copy}, index {key: entry with this rank's piece}, scalars) of this rank. With
    a staging area the copies go to its reused host buffers (valid once its fence() has waited)."""
    st = state.get()
    tensors, index, scalars = {}, {}, {}
    if optimizer is not None:
        optimizer.finish_param_sync()  # ZeRO: the last step's parameter all-gathers may be in flight

    def add(kind, name, p, data, lo, hi):
        key = fmt.tensor_key(kind, name)
        tensors[key] = (staging.copy(key, data) if staging is not None
                        else data.detach().to("cpu", copy=True).contiguous())
        index[key] = fmt.piece_entry(fmt.sharding_of(p), data.dtype, full_shape(p), p.shape, st.tp_rank,
                                     st.tp_size, lo, hi)

    copies = set()
    sharded_params = getattr(optimizer, "shards_parameters", False)
    for name, p, is_copy in named_parameters(model):
        if is_copy:
            copies.add(id(p))
        if not sharded_params and _writes(p, is_copy, replicated_over_dp=True):
            add(fmt.MODEL, name, p, p, 0, p.numel())
    if sharded_params:  # ZeRO-3: each DP rank writes the weights of its shard, in the model dtype
        for pc in optimizer.pieces:
            if _writes(pc.param, id(pc.param) in copies, replicated_over_dp=False):
                add(fmt.MODEL, pc.name, pc.param, pc.model.to(pc.param.dtype), pc.lo, pc.hi)
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

    def write(self, path, tensors, header, fence):
        try:
            fence.wait()  # the device-to-host copies have landed
            self.size = fmt.write_rank_file(path, tensors, header)
        except BaseException as e:  # reported to rank 0 at finalize; the tracker is not touched
            self.error = f"{path}: {type(e).__name__}: {e}"


class CheckpointWriter:
    """Saves into one directory; keeps at most one asynchronous save in flight."""

    def __init__(self, root: str, async_save: bool = False, keep_last: int | None = None,
                 retain_interval: int | None = None, defer_host_copies: bool = False):
        """defer_host_copies (with async_save): save() returns before CPU tensors are copied; the caller
        must call staging.wait_staged() before it changes a parameter or optimizer state."""
        self.root, self.async_save = root, async_save
        self.keep_last, self.retain_interval = keep_last, retain_interval
        self.pending: _Pending | None = None
        self.staging = HostStaging(defer_host_copies=defer_host_copies and async_save)
        self.last_stall: float | None = None  # seconds the last save() held up its caller

    def save(self, iteration, model, optimizer, scheduler, scaler, consumed_samples: int, config_json: str,
             extra: dict | None = None) -> str | None:
        """Save (or start saving) `iteration`; returns its folder once complete, None while in flight.
        last_stall is then the time the call took: the whole save when synchronous; with async_save
        the wait for a previous save still writing, the copy to host (unless deferred: then
        staging.waited adds what the loop later waits for it) and the index exchange."""
        start = time.perf_counter()
        try:
            return self._save(iteration, model, optimizer, scheduler, scaler, consumed_samples, config_json, extra)
        finally:
            self.last_stall = time.perf_counter() - start

    def _save(self, iteration, model, optimizer, scheduler, scaler, consumed_samples, config_json, extra):
        self.wait()
        st = state.get()
        tmp = fmt.iteration_dir(self.root, iteration) + ".tmp"
        if st.rank == 0:
            fmt.prepare_tmp_dir(self.root, iteration, config_json)
        _barrier()
        tensors, index, scalars = collect_rank_state(model, optimizer, self.staging)
        fence = self.staging.fence()
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
        args = (os.path.join(tmp, fname), tensors, header, fence)
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
