"""Hugging Face model folders on disk: writing an export, reading one back.

    save_hf_folder(cfg, full_state_dict, out_dir, dtype, max_shard_bytes)   the whole export
    load_hf_folder(path) -> (config.json dict, HF state dict)                 for convert_from_hf

An export holds config.json, generation_config.json, the tokenizer files, and the weights as
model.safetensors, or as model-0000i-of-0000n.safetensors shards with model.safetensors.index.json
once they pass the maximum shard size. The split is huggingface_hub's split_torch_state_dict_into_shards,
the function transformers' save_pretrained uses, with its size semantics ("5GB" = 5·10^9 bytes; a
tensor larger than the limit gets a shard of its own) and transformers' default limit, so the shards
and the index are the ones save_pretrained writes for the same state dict. Reading accepts safetensors, and legacy
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
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default (5.x)
DEFAULT_MAX_SHARD_BYTES = 50 * 10 ** 9


def parse_size(text) -> int:
    """'5GB', '500MB', '40KB' or a byte count -> bytes, as huggingface_hub reads them (powers of ten;
    a bad unit raises ValueError naming the accepted ones)."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    if s.isdigit():
        return int(s)
    from huggingface_hub.serialization._base import parse_size_to_int  # the parser its splitter uses
    return parse_size_to_int(s)


def save_hf_folder(cfg, state_dict: dict, out_dir: str, dtype: torch.dtype = torch.float32,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: bool = True,
                   keep_mtp: bool = False) -> dict:
    """Export a full megaflow state dict (checkpoint/full_state.py) as an HF folder; returns config.json.
    keep_mtp: also the multi-token-prediction layers, in DeepSeek-V3's layout."""
    os.makedirs(out_dir, exist_ok=True)
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer:
        special = export_tokenizer(cfg.data, out_dir, cfg.model.max_position_embeddings)
    hf_config = to_hf_config(cfg, dtype, **special, keep_mtp=keep_mtp)
    hf_sd = to_hf_state_dict(cfg, state_dict, dtype, keep_mtp)
    _remove_old_weights(out_dir)
    save_safetensors(hf_sd, out_dir, max_shard_bytes)
    _write_json(os.path.join(out_dir, "config.json"), hf_config)
    generation = {k: v for k, v in special.items() if v is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), {"_from_model_config": False, **generation})
    return hf_config


def save_safetensors(hf_sd: dict, out_dir: str, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards of at most max_shard_bytes (an int, or a size such as "5GB") plus
    the index, exactly as transformers' save_pretrained names and fills them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    # save_pretrained of a loaded model fills shards in "natural" name order (layers.2 before layers.10);
    # the same order here gives the same shards and keeps each layer's tensors together.
    hf_sd = dict(sorted(hf_sd.items(), key=lambda kv: _natural_key(kv[0])))
    split = split_torch_state_dict_into_shards(hf_sd, max_shard_size=max_shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        # Own storage per tensor: slices of one fused matrix would otherwise share memory, which
        # safetensors refuses (and would write whole).
        save_file({k: hf_sd[k].contiguous().clone() for k in names}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
    if split.is_sharded:
        total_parameters = sum(t.numel() for t in hf_sd.values())
        _write_json(os.path.join(out_dir, SAFE_INDEX), {
            "metadata": {**split.metadata, "total_parameters": total_parameters},
            "weight_map": split.tensor_to_filename})
    return list(split.filename_to_tensors)


def _natural_key(name: str) -> list:
    """Dotted parts compared as numbers when they are digits, and by text then trailing number otherwise."""
    key = []
    for part in name.split("."):
        text = part.rstrip("0123456789")
        if not text:
            key.append((0, int(part)))
        else:
            key.append((1, text, int(part[len(text):])) if text != part else (1, text))
    return key


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
