"""Layout-independent initialisation and names.

Every parameter has a *global name*: its name in the single-process model (layer indices are global
layer numbers). Its initial value is drawn for the full tensor from a generator seeded by
(seed, global name), then this rank keeps its tensor-parallel shard. So the same --seed gives the
same full weights at any TP/PP/DP layout, and runs at different layouts can be compared directly.
"""
from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from megaflow.layers.sharding import shard
from megaflow.parallel import state

_LAYER = re.compile(r"^layers\.(\d+)\.")


def global_name(model: nn.Module, local_name: str) -> str:
    """'layers.0.mlp...' on a stage holding layers 4..7 -> 'layers.4.mlp...'; a tied output layer on the
    last stage maps to the word embeddings it copies."""
    match = _LAYER.match(local_name)
    if match:
        number = model.layers[int(match.group(1))].layer_number
        return f"layers.{number}." + local_name[match.end():]
    if local_name == "output_layer.weight" and getattr(model, "share_embeddings", False):
        return "word_embeddings.weight"
    if local_name == "mtp_embeddings.weight":  # the last stage's copy for multi-token prediction
        return "word_embeddings.weight"
    return local_name


def global_named_parameters(model: nn.Module):
    """(global name, param) of a model, or of every chunk of an interleaved model (nn.ModuleList)."""
    if isinstance(model, nn.ModuleList):
        for chunk in model:
            yield from global_named_parameters(chunk)
        return
    for name, param in model.named_parameters():
        yield global_name(model, name), param


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_parallel", False):
        shape[param.partition_dim] *= state.get().tp_size
    return shape


def _draw_full(name: str, shape: list[int], std: float, seed: int, vocab_rows=None) -> torch.Tensor:
    if vocab_rows is None or vocab_rows >= shape[0]:
        return torch.randn(shape, generator=_generator(seed, name)) * std
    # Real vocabulary rows are drawn for the real rows only, so they do not depend on how much
    # padding this TP size needs; padding rows are zeros. The loss never looks at them and their
    # gradient is exactly 0, so they stay 0 through any optimizer (Adam's update of a zero gradient
    # is 0, decoupled weight decay of 0 is 0): identical whatever the padding.
    real = torch.randn([vocab_rows] + shape[1:], generator=_generator(seed, name)) * std
    return torch.cat([real, real.new_zeros([shape[0] - vocab_rows] + shape[1:])])


@torch.no_grad()
def initialize_weights(model: nn.Module, seed: int) -> None:
    """Normal(0, init_std) for every parameter that declares an init_std; others (norm weights = 1,
    biases = 0) keep the value their layer gave them."""
    st = state.get()
    for name, param in global_named_parameters(model):
        std = getattr(param, "init_std", None)
        if std is None:
            continue
        full = _draw_full(name, full_shape(param), std, seed, getattr(param, "vocab_rows", None))
        if getattr(param, "tensor_parallel", False):
            full = shard(full, param.partition_dim, st.tp_rank, st.tp_size, param.fused_sizes)
        param.copy_(full.to(param.dtype))
