"""Hugging Face model folders on disk: writing an export, reading one back.

    save_hf_folder(cfg, full_state_dict, out_dir, dtype, max_shard_bytes)   the whole export
    load_hf_folder(path) -> (config.json dict, HF state dict)                 for convert_from_hf

An export holds config.json, generation_config.json, the tokenizer files, and the weights as
model.safetensors, or as model-0000i-of-0000n.safetensors shards with model.safetensors.index.json
once they pass max_shard_bytes (transformers' layout). Reading accepts safetensors, and legacy
pytorch_model*.bin files through torch.load(weights_only=True) only: loading never executes code.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megaflow.checkpoint.hf import to_hf_config, to_hf_state_dict
from megaflow.checkpoint.hf_tokenizer import export_tokenizer

SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default "5GB"


def parse_size(text) -> int:
    """'5GB', '500MB', '2KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "B")
    for suffix, mult in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024), ("B", 1)):
        if s.endswith(suffix):
            return int(float(s[:-len(suffix)]) * mult)
    return int(s)


def save_hf_folder(cfg, state_dict: dict, out_dir: str, dtype: torch.dtype = torch.float32,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: bool = True) -> dict:
    """Export a full megaflow state dict (checkpoint/full_state.py) as an HF folder; returns config.json."""
    os.makedirs(out_dir, exist_ok=True)
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer:
        special = export_tokenizer(cfg.data, out_dir, cfg.model.max_position_embeddings)
    hf_config = to_hf_config(cfg, dtype, **special)
    hf_sd = to_hf_state_dict(cfg, state_dict, dtype)
    _remove_old_weights(out_dir)
    save_safetensors(hf_sd, out_dir, max_shard_bytes)
    _write_json(os.path.join(out_dir, "config.json"), hf_config)
    generation = {k: v for k, v in special.items() if v is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), {"_from_model_config": False, **generation})
    return hf_config


def save_safetensors(hf_sd: dict, out_dir: str, max_shard_bytes: int) -> list[str]:
    """One file, or shards of at most max_shard_bytes (a larger single tensor gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for name, t in hf_sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        # Own storage per tensor: slices of one fused matrix would otherwise share memory, which
        # safetensors refuses (and would write whole).
        save_file({k: v.contiguous().clone() for k, v in shard.items()}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(names) > 1:
        _write_json(os.path.join(out_dir, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _remove_old_weights(out_dir: str) -> None:
    """A re-export with other sharding must not leave stale shards for loaders to pick up."""
    for pattern in ("model*.safetensors", SAFE_INDEX):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(path)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def load_hf_folder(path: str) -> tuple[dict, dict]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
    with open(config_path) as fh:
        hf_config = json.load(fh)
    return hf_config, load_hf_weights(path)


def load_hf_weights(path: str) -> dict:
    files = _weight_files(path, SAFE_INDEX, "model.safetensors", "*.safetensors")
    if files:
        out = {}
        for f in files:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out
    files = _weight_files(path, "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    out = {}
    for f in files:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def _weight_files(path: str, index_name: str, single: str, pattern: str) -> list[str]:
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
        with open(index) as fh:
            return [os.path.join(path, f) for f in sorted(set(json.load(fh)["weight_map"].values()))]
    if os.path.isfile(os.path.join(path, single)):
        return [os.path.join(path, single)]
    return sorted(glob.glob(os.path.join(path, pattern)))
