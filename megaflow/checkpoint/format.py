"""megaflow's checkpoint format on disk: per-rank safetensors files of tensor *pieces*, one JSON index.

    {save}/latest_checkpointed_iteration.txt     the last complete iteration (Megatron's tracker file)
    {save}/iter_{:07d}/config.json               the run's resolved configuration
    {save}/iter_{:07d}/metadata.json             iteration, data position, layout, scheduler and loss
                                                 scaler state, every rank file's size, the tensor index
    {save}/iter_{:07d}/mp_rank_{tp:02d}_{pp:03d}_dp{dp:03d}.safetensors   each rank's pieces and RNG

A *tensor* is named "{kind}/{global name}": kind "model" (the parameter), or "optim.{state}" (Adam's
exp_avg and exp_avg_sq, the fp32 main_param of bf16/fp16 models, SGD's momentum_buffer). Global names
are the single-process model's (model/init.py), so layer numbers do not depend on the pipeline split.
Its index entry in metadata.json:

    {"shape": [global shape], "dtype": "float32", "partition_dim": 0 | null, "fused_sizes": [...] | null,
     "vocab_rows": real vocabulary rows | null,
     "pieces": [{"file": "mp_rank_...safetensors", "tp_rank": t, "tp_size": T, "local_shape": [...],
                 "range": [lo, hi]}, ...]}

A piece holds elements [lo, hi) of the flattened TP shard t of T (layers/sharding.shard of the global
tensor; T = 1 for tensors replicated across TP). Model pieces are whole shards; optimizer pieces of a
ZeRO run are the part of the shard one DP rank owned. Each tensor is stored once: replicas (other DP
ranks without ZeRO, other TP ranks of replicated tensors, a tied output layer's copy) are not written.
Loading at any layout = assemble the global tensor from its pieces, then cut this rank's part.
Scalars (Adam's step) are in metadata.json under "scalars".

Safety: only safetensors and JSON are read (nothing is unpickled, no code runs); metadata.json records
every file's size, so a truncated file is named before it is parsed; an iteration folder is complete
once its name has no suffix (written as iter_{:07d}.tmp, renamed when every rank's file is flushed),
and the tracker is updated only after that rename.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megaflow.errors import UserError
from megaflow.layers.sharding import unshard

FORMAT = "megaflow.checkpoint/2"
TRACKER = "latest_checkpointed_iteration.txt"
METADATA, CONFIG = "metadata.json", "config.json"
MODEL = "model"
_ITER = re.compile(r"^iter_(\d{7})$")
_DEBRIS = re.compile(r"^iter_\d{7}\.(tmp|trash)$")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                                      torch.int64, torch.int32, torch.uint8)}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the file."""
    kind = "checkpoint error"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_dp{dp_rank:03d}.safetensors"


def tensor_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- writing --------------------------------------------------------------------------------------
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def write_rank_file(path: str, tensors: dict, header: dict) -> int:
    """One rank's tensors (contiguous CPU tensors, none sharing storage) with a JSON header; flushed to
    disk before returning its size."""
    save_file(tensors, path, metadata={"megaflow": json.dumps(header)})
    _fsync_path(path)
    return os.path.getsize(path)


def sharding_of(p) -> dict:
    """How a parameter (or a meta parameter of the full model) is split over TP (layers/sharding.py)."""
    return {"tensor_parallel": bool(getattr(p, "tensor_parallel", False)),
            "partition_dim": getattr(p, "partition_dim", None), "fused_sizes": getattr(p, "fused_sizes", None),
            "vocab_rows": getattr(p, "vocab_rows", None)}


def piece_entry(sharding: dict, dtype, global_shape, local_shape, tp_rank: int, tp_size: int, lo: int,
                hi: int) -> dict:
    """An index entry holding one piece (its file is filled in when the ranks' indices are merged)."""
    tp = sharding["tensor_parallel"] and tp_size > 1
    return {"shape": list(global_shape), "dtype": dtype_name(dtype),
            "partition_dim": sharding["partition_dim"] if tp else None,
            "fused_sizes": sharding["fused_sizes"] if tp else None, "vocab_rows": sharding["vocab_rows"],
            "pieces": [{"tp_rank": tp_rank if tp else 0, "tp_size": tp_size if tp else 1,
                        "local_shape": list(local_shape), "range": [lo, hi]}]}


def merge_indices(per_file: dict) -> dict:
    """{file name: {key: entry}} -> one index; the entries of a tensor must agree on everything but pieces."""
    merged = {}
    for fname, index in per_file.items():
        for key, entry in index.items():
            pieces = [dict(p, file=fname) for p in entry["pieces"]]
            if key not in merged:
                merged[key] = dict(entry, pieces=pieces)
                continue
            known = merged[key]
            for field in ("shape", "dtype", "partition_dim", "fused_sizes"):
                if known[field] != entry[field]:
                    raise CheckpointError(f"{key}: ranks disagree on {field} ({known[field]} vs {entry[field]})")
            known["pieces"] += pieces
    return merged


def prepare_tmp_dir(root: str, iteration: int, config_json: str) -> str:
    """Remove debris of interrupted saves, then create iter_{:07d}.tmp/ with config.json."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if _DEBRIS.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = iteration_dir(root, iteration) + ".tmp"
    os.makedirs(tmp)
    atomic_write_text(os.path.join(tmp, CONFIG), config_json)
    return tmp


def finalize(root: str, iteration: int, metadata: dict) -> str:
    """Every rank file is flushed: write metadata.json, rename the folder, then point the tracker at it."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    atomic_write_text(os.path.join(tmp, METADATA), json.dumps(metadata, indent=1))
    _fsync_path(tmp)
    if os.path.exists(final):  # the same iteration saved again: move the old one aside first
        os.replace(final, final + ".trash")
    os.replace(tmp, final)
    _fsync_path(root)
    atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    shutil.rmtree(final + ".trash", ignore_errors=True)
    return final


def saved_iterations(root: str) -> list[int]:
    return sorted(int(m.group(1)) for m in map(_ITER.match, os.listdir(root)) if m)


def apply_retention(root: str, latest: int, keep_last: int | None, retain_interval: int | None) -> list[int]:
    """Delete complete checkpoints older than `latest` that are neither among the keep_last most recent
    nor a multiple of retain_interval (Megatron's --save-retain-interval). Later iterations (another
    run's) are never touched. Returns the deleted iterations."""
    if keep_last is None and retain_interval is None:
        return []
    older = [it for it in saved_iterations(root) if it <= latest]
    recent = set(older[-(keep_last or 1):])
    doomed = [it for it in older if it not in recent and not (retain_interval and it % retain_interval == 0)]
    for it in doomed:  # out of sight atomically, then removed (a kill leaves only .trash debris)
        path = iteration_dir(root, it)
        os.replace(path, path + ".trash")
        shutil.rmtree(path + ".trash", ignore_errors=True)
    return doomed


def latest_iteration(root: str) -> int | None:
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        text = fh.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


# -- reading --------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e


class CheckpointReader:
    """One iteration of a checkpoint: its metadata, and global tensors assembled from their pieces.
    Files are opened lazily and only the pieces asked for are read."""

    def __init__(self, root: str, iteration: int | None = None):
        if not os.path.isdir(root):
            raise CheckpointError(f"{root}: no such checkpoint directory")
        it = latest_iteration(root) if iteration is None else iteration
        if it is None:
            raise CheckpointError(f"{root}: no {TRACKER} (nothing saved there yet)")
        self.root, self.iteration, self.dir = root, it, iteration_dir(root, it)
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"missing checkpoint folder {self.dir}")
        if not os.path.exists(os.path.join(self.dir, METADATA)):
            raise CheckpointError(f"missing checkpoint file {os.path.join(self.dir, METADATA)} (not a megaflow "
                                  f"checkpoint, or written by a megaflow older than {FORMAT})")
        self.meta = read_json(os.path.join(self.dir, METADATA))
        if self.meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.dir}: not a {FORMAT} checkpoint (format {self.meta.get('format')!r})")
        self.config = read_json(os.path.join(self.dir, CONFIG))
        self.index = self.meta["tensors"]
        self._files = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def names(self, kind: str) -> list[str]:
        prefix = kind + "/"
        return [k[len(prefix):] for k in self.index if k.startswith(prefix)]

    def kinds(self) -> set[str]:
        return {k.split("/", 1)[0] for k in self.index}

    def open(self, fname: str):
        if fname not in self._files:
            path = os.path.join(self.dir, fname)
            expected = self.meta["files"].get(fname)
            if not os.path.exists(path):
                raise CheckpointError(f"missing checkpoint file {path}")
            size = os.path.getsize(path)
            if expected is not None and size != expected:
                raise CheckpointError(f"{path}: truncated or modified ({size} bytes; metadata.json records "
                                      f"{expected})")
            try:
                self._files[fname] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
        return self._files[fname]

    def file_header(self, fname: str) -> dict:
        return json.loads((self.open(fname).metadata() or {}).get("megaflow", "{}"))

    def read(self, fname: str, key: str) -> torch.Tensor:
        try:
            handle = self.open(fname)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (needed for {key})") from e
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.dir, fname)}: cannot read tensor {key}: {e}") from e

    def assemble(self, key: str) -> torch.Tensor:
        """The global tensor `key` from its pieces (every element must be covered exactly once)."""
        if key not in self.index:
            raise CheckpointError(f"{self.dir}: the checkpoint has no tensor {key}")
        entry = self.index[key]
        by_rank: dict[int, list] = {}
        for p in entry["pieces"]:
            by_rank.setdefault(p["tp_rank"], []).append(p)
        tp_size = entry["pieces"][0]["tp_size"]
        if sorted(by_rank) != list(range(tp_size)):
            raise CheckpointError(f"{self.dir}: {key} has pieces of TP ranks {sorted(by_rank)}, "
                                  f"expected 0..{tp_size - 1}")
        dtype = DTYPES[entry["dtype"]]
        shards = []
        for t in range(tp_size):
            pieces = sorted(by_rank[t], key=lambda p: p["range"][0])
            local_shape = pieces[0]["local_shape"]
            flat, end = torch.empty(math.prod(local_shape), dtype=dtype), 0
            for p in pieces:
                lo, hi = p["range"]
                if lo != end:
                    raise CheckpointError(f"{self.dir}: {key}, TP shard {t}: elements [{end}, {lo}) are in no file")
                data = self.read(p["file"], key)
                if data.numel() != hi - lo or data.dtype != dtype:
                    raise CheckpointError(f"{os.path.join(self.dir, p['file'])}: {key} holds {data.numel()} "
                                          f"{data.dtype} elements, metadata.json says {hi - lo} {dtype}")
                flat[lo:hi] = data.reshape(-1)
                end = hi
            if end != flat.numel():
                raise CheckpointError(f"{self.dir}: {key}, TP shard {t}: elements [{end}, {flat.numel()}) "
                                      "are in no file")
            shards.append(flat.view(local_shape))
        full = shards[0] if tp_size == 1 else unshard(shards, entry["partition_dim"], entry["fused_sizes"])
        if list(full.shape) != entry["shape"]:
            raise CheckpointError(f"{self.dir}: {key} assembles to shape {list(full.shape)}, metadata.json "
                                  f"says {entry['shape']}")
        return full

    def close(self) -> None:
        self._files.clear()


def fit_vocab_rows(full: torch.Tensor, rows: int, real_rows: int | None, key: str) -> torch.Tensor:
    """A vocabulary tensor (embedding/output layer, or its optimizer state) padded for another TP size:
    rows up to the smaller padding are kept (real and padding rows alike, so an unchanged padded size is
    exact), new padding rows are zeros, and only padding can be cut."""
    if full.shape[0] == rows:
        return full
    if real_rows is None or rows < real_rows:
        raise CheckpointError(f"{key}: {full.shape[0]} rows in the checkpoint, the model has {rows}")
    out = full.new_zeros((rows,) + tuple(full.shape[1:]))
    keep = min(rows, full.shape[0])
    out[:keep] = full[:keep]
    return out
