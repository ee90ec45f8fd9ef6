"""The full model as one state dict, whatever layout a checkpoint was saved with.

    load_full_state_dict(ckpt_dir, iteration=None) -> (cfg, {global name: full tensor})
    save_full_state_dict(cfg, state_dict, save_dir, tp, pp, iteration=0) -> iteration folder

"Full" means single-process: global layer numbers, tensor-parallel shards concatenated back (with the
one rule in layers/sharding.py), vocabulary still padded to cfg.padded_vocab_size. Tied embeddings
appear once, as word_embeddings.weight. Tools (HF conversion, generation) work on this form only, so
the on-disk format behind these two functions can change (sharded checkpoints, issue 8) without them.

Today's format (checkpoint/io.py): iter_{:07d}/config.json and one mp_rank_{tp:02d}[_{pp:03d}]/
model_optim_rng.pt per model-parallel rank holding that stage's state dict under *local* names.
The writer produces checkpoints without optimizer state and RNG files: load them with --finetune.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil

import torch

from megaflow.checkpoint.io import (TRACKER, CheckpointError, _atomic_write_text, _load, _save, iteration_dir,
                                    latest_iteration)
from megaflow.config import Config, pad_vocab_size, validate
from megaflow.layers.sharding import shard, unshard
from megaflow.parallel import state

MODEL_FILE = "model_optim_rng.pt"
_LAYER = re.compile(r"^layers\.(\d+)\.")


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


@contextlib.contextmanager
def _meta_single_process():
    """Build models as one process on the meta device: shapes and sharding attributes, no memory.
    (Layers take their device from the parallel state, so a meta state is swapped in briefly.)"""
    saved = state._STATE
    state._STATE = state.ParallelState(device=torch.device("meta"))
    try:
        yield
    finally:
        state._STATE = saved


def parameter_layout(cfg: Config) -> dict:
    """{global name: meta parameter} of the full model: .shape (padded vocab), and for tensor-parallel
    parameters .partition_dim / .fused_sizes (full sizes, the same at every TP)."""
    from megaflow.model import GPTModel  # the model defines which parameters exist and how they shard
    with _meta_single_process():
        model = GPTModel(cfg)
    return dict(model.named_parameters())


def stage_local_names(cfg: Config, pp_rank: int, pp_size: int) -> dict:
    """{local name: global name} of one pipeline stage's parameters (a tied output layer on a last
    stage that lacks the embedding maps to word_embeddings.weight, which it copies)."""
    from megaflow.model import GPTModel, stage_layer_numbers
    from megaflow.model.init import global_name
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    with _meta_single_process():
        stage = GPTModel(cfg, pre_process=first, post_process=last,
                         layer_numbers=stage_layer_numbers(cfg, pp_rank, pp_size))
    return {name: global_name(stage, name) for name, _ in stage.named_parameters()}


def read_config(ckpt_dir: str, iteration: int | None = None) -> tuple[Config, int]:
    it = latest_iteration(ckpt_dir) if iteration is None else iteration
    if it is None:
        raise CheckpointError(f"{ckpt_dir}: no {TRACKER} (not a megaflow checkpoint directory?)")
    path = os.path.join(iteration_dir(ckpt_dir, it), "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"missing {path} (iteration {it} not saved, or saved by an older megaflow)")
    with open(path) as fh:
        return Config.from_dict(json.load(fh)), it


def load_full_state_dict(ckpt_dir: str, iteration: int | None = None) -> tuple[Config, dict]:
    """Assemble the single-process state dict from a checkpoint of any TP/PP layout (DP and ZeRO do
    not matter: DP rank 0 saves the model, whose parameters are whole on every DP rank)."""
    cfg, it = read_config(ckpt_dir, iteration)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if pp > 1 and cfg.parallel.num_layers_per_virtual_pipeline_stage:
        raise CheckpointError(f"{ckpt_dir}: checkpoints of the interleaved pipeline schedule (model chunks "
                              "per stage) cannot be read yet")
    layout = parameter_layout(cfg)
    pieces: dict[str, list] = {}
    for pp_rank in range(pp):
        names = stage_local_names(cfg, pp_rank, pp)
        for tp_rank in range(tp):
            rank_dir = os.path.join(iteration_dir(ckpt_dir, it), rank_dir_name(tp_rank, pp_rank, pp))
            model_sd = _load(os.path.join(rank_dir, MODEL_FILE))["model"]
            if set(model_sd) != set(names):
                raise CheckpointError(f"{rank_dir}: parameters {sorted(set(model_sd) ^ set(names))} do not "
                                      "match the model its config.json describes")
            for local, tensor in model_sd.items():
                per_tp = pieces.setdefault(names[local], [None] * tp)
                if per_tp[tp_rank] is None:  # a tied output layer's copy: keep the first stage's
                    per_tp[tp_rank] = tensor
    full = {}
    for name, param in layout.items():
        shards = pieces.get(name)
        if shards is None:
            raise CheckpointError(f"{ckpt_dir} iteration {it}: no stage holds {name}")
        if getattr(param, "tensor_parallel", False):
            tensor = unshard(shards, param.partition_dim, param.fused_sizes)
        else:
            tensor = shards[0]  # replicated across TP: every rank saved the same values
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{name}: assembled shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(param.shape)}")
        full[name] = tensor
    return cfg, full


def repad_vocab(cfg: Config, state_dict: dict, tp: int) -> tuple[Config, dict]:
    """A copy of (cfg, state_dict) for another TP size: the vocabulary padded to that TP's multiple.
    Real rows are kept; new padding rows are zeros (they are never looked up, and generation masks
    their logits)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.padded_vocab_size = pad_vocab_size(cfg.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    out = dict(state_dict)
    for name in ("word_embeddings.weight", "output_layer.weight"):
        if name in out:
            out[name] = pad_rows(out[name], cfg.vocab_size, cfg.padded_vocab_size)
    return cfg, out


def pad_rows(tensor: torch.Tensor, real_rows: int, padded_rows: int) -> torch.Tensor:
    real = tensor[:real_rows]
    pad = real.new_zeros((padded_rows - real_rows,) + tuple(real.shape[1:]))
    return torch.cat([real, pad]).contiguous()


def save_full_state_dict(cfg: Config, state_dict: dict, save_dir: str, tp: int = 1, pp: int = 1,
                         iteration: int = 0) -> str:
    """Write a full state dict as a checkpoint at TP=tp, PP=pp (model weights only; load it with
    --finetune). The vocabulary is re-padded for tp. Written into a temporary folder, renamed, and
    only then the tracker file: an interrupted write never looks complete."""
    cfg, state_dict = repad_vocab(cfg, state_dict, tp)
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.world_size = tp * pp
    validate(cfg)  # heads, query groups, FFN divisible by TP: else shards would cut heads apart
    layout = parameter_layout(cfg)
    missing = sorted(set(layout) - set(state_dict))
    extra = sorted(set(state_dict) - set(layout))
    if missing or extra:
        raise CheckpointError(f"state dict does not match the config: missing {missing}, unexpected {extra}")
    stages = [stage_local_names(cfg, pp_rank, pp) for pp_rank in range(pp)]  # checks the layer split
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _atomic_write_text(os.path.join(tmp, "config.json"), cfg.to_json())
    for pp_rank, names in enumerate(stages):
        for tp_rank in range(tp):
            model_sd = {}
            for local, name in names.items():
                param, full = layout[name], state_dict[name]
                if tuple(full.shape) != tuple(param.shape):
                    raise CheckpointError(f"{name}: shape {tuple(full.shape)}, the config implies "
                                          f"{tuple(param.shape)}")
                if getattr(param, "tensor_parallel", False):
                    full = shard(full, param.partition_dim, tp_rank, tp, param.fused_sizes)
                model_sd[local] = full.detach().clone().contiguous()
            rank_dir = os.path.join(tmp, rank_dir_name(tp_rank, pp_rank, pp))
            os.makedirs(rank_dir)
            _save({"iteration": iteration, "consumed_samples": 0, "model": model_sd, "optimizer": None,
                   "scheduler": None, "loss_scaler": None, "extra": {}}, os.path.join(rank_dir, MODEL_FILE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(os.path.join(save_dir, TRACKER), str(iteration))
    return final
