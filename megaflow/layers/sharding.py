"""How a tensor-parallel parameter's shard relates to the full (single-process) tensor.

Every sharded parameter carries three attributes, set by the layer that owns it:
    tensor_parallel  True
    partition_dim    the dimension split across TP ranks
    fused_sizes      None, or the full sizes of sub-blocks concatenated along partition_dim
                     (e.g. [q, k, v] rows of a fused QKV weight, [gate, up] of a SwiGLU fc1). Each
                     block is split on its own, so rank r holds [q_r; k_r; v_r] whatever TP is.
Initialisation, checkpoint resharding and HF conversion all go through these two functions.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def shard(full: torch.Tensor, partition_dim: int, tp_rank: int, tp_size: int,
          fused_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's piece of a full tensor."""
    blocks = full.split(list(fused_sizes), dim=partition_dim) if fused_sizes else [full]
    pieces = []
    for block in blocks:
        if block.shape[partition_dim] % tp_size:
            raise ValueError(f"dimension {partition_dim} of size {block.shape[partition_dim]} "
                             f"is not divisible by TP size {tp_size}")
        pieces.append(block.chunk(tp_size, dim=partition_dim)[tp_rank])
    return torch.cat(pieces, dim=partition_dim).contiguous()


def unshard(shards: Sequence[torch.Tensor], partition_dim: int,
            fused_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The full tensor from every rank's shard, in TP-rank order (inverse of shard)."""
    tp_size = len(shards)
    if not fused_sizes:
        return torch.cat(list(shards), dim=partition_dim)
    local_sizes = [s // tp_size for s in fused_sizes]
    per_rank_blocks = [s.split(local_sizes, dim=partition_dim) for s in shards]
    blocks = [torch.cat([blocks[i] for blocks in per_rank_blocks], dim=partition_dim)
              for i in range(len(fused_sizes))]
    return torch.cat(blocks, dim=partition_dim)


def mark_tensor_parallel(param: torch.nn.Parameter, partition_dim: int,
                         fused_sizes: Optional[Sequence[int]] = None) -> None:
    param.tensor_parallel = True
    param.partition_dim = partition_dim
    param.fused_sizes = list(fused_sizes) if fused_sizes else None
