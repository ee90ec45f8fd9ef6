"""Loading a checkpoint saved at any layout into this rank's model and optimizer.

For every tensor this rank holds (a parameter's TP shard; an optimizer piece: elements [lo, hi) of that
shard, the part of a ZeRO bucket this DP rank owns), the global tensor is assembled from the pieces
the checkpoint's index lists (format.CheckpointReader.assemble), its vocabulary rows re-padded when
the TP size changes the padding, and this rank's part cut out with the same rule that made it
(layers/sharding.shard, then the flat range). TP, PP (interleaved or not), DP, ZeRO and bucket sizes may
all differ from the saving run; the model must be the same (names and global shapes are checked).

Weights come from the fp32 main parameters when the checkpoint has them (a bf16/fp16 run), otherwise
from the model tensors; the optimizer's fp32 main copies are set from the same source.
RNG streams belong to ranks: they are restored only at the saving run's TP×PP×DP layout; otherwise the
result says why not and the trainer re-seeds (training/trainer.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.checkpoint import format as fmt
from megaflow.checkpoint.rng import from_tensors
from megaflow.checkpoint.save import named_parameters
from megaflow.layers.sharding import shard
from megaflow.model.init import full_shape
from megaflow.parallel import state


def _local(reader: fmt.CheckpointReader, key: str, p) -> torch.Tensor:
    """This rank's TP shard of tensor `key`, for parameter p."""
    st = state.get()
    entry = reader.index.get(key)
    if entry is None:
        raise fmt.CheckpointError(f"{reader.dir}: the checkpoint has no tensor {key}")
    full = reader.assemble(key)
    want = full_shape(p)
    if entry.get("vocab_rows") is not None and getattr(p, "vocab_rows", None) is not None:
        full = fmt.fit_vocab_rows(full, want[0], entry["vocab_rows"], key)
    if list(full.shape) != want:
        files = sorted({pc["file"] for pc in entry["pieces"]})
        raise fmt.CheckpointError(f"{reader.dir}/{files[0]}: tensor {key} has shape {list(full.shape)}, the "
                                  f"model expects {want} (another model configuration?)")
    if getattr(p, "tensor_parallel", False) and st.tp_size > 1:
        full = shard(full, p.partition_dim, st.tp_rank, st.tp_size, p.fused_sizes)
    return full


def _weights_key(reader, name: str) -> str:
    main = fmt.tensor_key("optim.main_param", name)
    return main if main in reader else fmt.tensor_key(fmt.MODEL, name)


def _check_names(reader, names: set) -> None:
    """The union of every rank's parameters must be the checkpoint's (collective)."""
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(names))
        names = set().union(*map(set, everyone))
    saved = set(reader.names(fmt.MODEL))
    missing, unexpected = sorted(names - saved), sorted(saved - names)
    if missing or unexpected:
        raise fmt.CheckpointError(f"{reader.dir}: the model and the checkpoint differ (missing in the checkpoint: "
                                  f"{missing[:5]}{'...' if len(missing) > 5 else ''}; not in the model: "
                                  f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); another model "
                                  "configuration?")


@torch.no_grad()
def _load_optimizer(reader, optimizer, load_state: bool) -> None:
    if load_state:
        saved, mine = reader.meta.get("optimizer"), type(optimizer.optimizer).__name__
        if saved is None:
            raise fmt.CheckpointError(f"{reader.dir}: saved without optimizer state (weights only); load it with "
                                      "--finetune or --no-load-optim")
        if saved != mine:
            raise fmt.CheckpointError(f"{reader.dir}: optimizer state of {saved}, this run uses {mine}; "
                                      "load it with --no-load-optim")
    kinds = sorted(k.removeprefix("optim.") for k in reader.kinds() if k.startswith("optim."))
    scalars = reader.meta.get("scalars", {})
    scalar_kinds = sorted({k.split("/", 1)[0].removeprefix("optim.") for k in scalars})
    states = []
    for pc in optimizer.pieces:
        s = {}
        if pc.main is not pc.model:
            s["main_param"] = _local(reader, _weights_key(reader, pc.name), pc.param).reshape(-1)[pc.lo:pc.hi].float()
        if load_state:
            # Kinds exist per parameter: Muon's weights have a momentum buffer, the others Adam's moments
            # and step (optim/muon.py), so a parameter takes the kinds saved for it.
            for k in kinds:
                key = fmt.tensor_key(f"optim.{k}", pc.name)
                if k != "main_param" and key in reader.index:
                    s[k] = _local(reader, key, pc.param).reshape(-1)[pc.lo:pc.hi]
            for k in scalar_kinds:
                key = fmt.tensor_key(f"optim.{k}", pc.name)
                if key in scalars:
                    s[k] = torch.tensor(scalars[key], dtype=torch.float32)
            if any(k != "main_param" for k in kinds) and not any(k != "main_param" for k in s):
                raise fmt.CheckpointError(f"{reader.dir}: no optimizer state for {pc.name}")
        states.append(s)
    optimizer.load_piece_states(states)


def _rng_state(reader, load_rng: bool):
    """(RNG state of this rank or None, why not)."""
    if not load_rng:
        return None, None
    st, saved = state.get(), reader.meta["layout"]
    if not reader.meta.get("rng"):
        return None, "the checkpoint holds no RNG state"
    if (saved["tp"], saved["pp"], saved["dp"]) != (st.tp_size, st.pp_size, st.dp_size):
        return None, (f"saved at TP={saved['tp']} PP={saved['pp']} DP={saved['dp']}, loaded at TP={st.tp_size} "
                      f"PP={st.pp_size} DP={st.dp_size}: random streams belong to ranks and cannot be resharded")
    # CP may differ: the CP ranks of a replica draw from the same streams (seeded by TP and PP rank
    # only), so the state of the saved replica's first CP rank is this rank's.
    fname = fmt.rank_file_name(st.tp_rank, st.pp_rank, saved.get("cp", 1) * st.dp_rank)
    handle = reader.open(fname)
    tensors = {k.removeprefix("rng/"): handle.get_tensor(k).clone() for k in handle.keys() if k.startswith("rng/")}
    return from_tensors(tensors, reader.file_header(fname)["rng"]), None


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, scaler=None, load_rng: bool = True,
                    iteration: int | None = None, load_optim: bool = True) -> dict:
    """Restore in place from a checkpoint of any layout. `optimizer`: its fp32 main copies are always set
    from the loaded weights; its state (and the scheduler's) only with load_optim. Returns
    {'iteration', 'consumed_samples', 'extra', 'config', 'layout', 'rng_state', 'rng_note'}.

    The RNG state is returned, not applied: the caller applies it (checkpoint.rng.set_rng_state) after
    everything that still draws random numbers during setup (a DataLoader iterator draws its seed);
    rng_note says why it is None when it could not be restored."""
    reader = fmt.CheckpointReader(root, iteration)
    try:
        params = list(named_parameters(model))
        _check_names(reader, {name for name, _p, _c in params})
        if optimizer is not None:
            optimizer.finish_param_sync()  # no all-gather may land on the loaded weights
        with torch.no_grad():
            if getattr(optimizer, "shards_parameters", False):  # ZeRO-3: only this rank's shards exist
                for pc in optimizer.pieces:
                    full = _local(reader, _weights_key(reader, pc.name), pc.param).reshape(-1)[pc.lo:pc.hi]
                    pc.model.copy_(full)  # the fp32 shard: from the fp32 main weights when saved
            else:
                for name, p, _copy in params:
                    p.copy_(_local(reader, _weights_key(reader, name), p).to(p.dtype))
        if optimizer is not None:
            _load_optimizer(reader, optimizer, load_optim)
        meta = reader.meta
        if load_optim and scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("loss_scaler") is not None:
            scaler.load_state_dict(meta["loss_scaler"])
        rng_state, rng_note = _rng_state(reader, load_rng)
        return {"iteration": meta["iteration"], "consumed_samples": meta["consumed_samples"],
                "extra": meta.get("extra", {}), "config": reader.config, "layout": meta["layout"],
                "rng_state": rng_state, "rng_note": rng_note}
    finally:
        reader.close()
