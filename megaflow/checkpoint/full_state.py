"""The full model as one state dict, whatever layout a checkpoint was saved with.

    load_full_state_dict(ckpt_dir, iteration=None) -> (cfg, {global name: full tensor})
    save_full_state_dict(cfg, state_dict, save_dir, tp, pp, iteration=0) -> iteration folder

"Full" means single-process: global layer numbers, tensor-parallel shards concatenated back (with the
one rule in layers/sharding.py), vocabulary still padded to cfg.padded_vocab_size. Tied embeddings
appear once, as word_embeddings.weight. Tools (HF conversion, generation) work on this form only; the
on-disk format behind these two functions is checkpoint/format.py (any TP/PP/DP/ZeRO layout, the
interleaved pipeline schedule included). The writer produces checkpoints of model weights only (no
optimizer state, no RNG): load them with --finetune.
"""
from __future__ import annotations

import copy

import torch

from megaflow.checkpoint import format as fmt
from megaflow.checkpoint.format import CheckpointError
from megaflow.checkpoint.reshard import offline_expert_layout, parameter_layout, read_all, write_layout
from megaflow.config import Config, pad_vocab_size, validate


def read_config(ckpt_dir: str, iteration: int | None = None) -> tuple[Config, int]:
    reader = fmt.CheckpointReader(ckpt_dir, iteration)
    return Config.from_dict(reader.config), reader.iteration


def load_full_state_dict(ckpt_dir: str, iteration: int | None = None) -> tuple[Config, dict]:
    """The model's global tensors, assembled from a checkpoint of any layout (DP and ZeRO do not matter:
    model tensors are stored once)."""
    cfg, _meta, tensors = read_all(ckpt_dir, iteration, kinds={fmt.MODEL})
    return cfg, {key.split("/", 1)[1]: t for key, t in tensors.items()}


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
    cfg.parallel.num_layers_per_virtual_pipeline_stage = None
    cfg.world_size = tp * pp
    offline_expert_layout(cfg)
    validate(cfg)  # heads, query groups, FFN divisible by TP: else shards would cut heads apart
    layout = parameter_layout(cfg)
    missing, extra = sorted(set(layout) - set(state_dict)), sorted(set(state_dict) - set(layout))
    if missing or extra:
        raise CheckpointError(f"state dict does not match the config: missing {missing}, unexpected {extra}")
    for name, t in state_dict.items():
        if tuple(t.shape) != tuple(layout[name].shape):
            raise CheckpointError(f"{name}: shape {tuple(t.shape)}, the config implies {tuple(layout[name].shape)}")
    tensors = {fmt.tensor_key(fmt.MODEL, name): t for name, t in state_dict.items()}
    meta = {"consumed_samples": 0, "optimizer": None, "scheduler": None, "loss_scaler": None, "extra": {}}
    return write_layout(save_dir, iteration, cfg, tensors, meta, tp, pp)
