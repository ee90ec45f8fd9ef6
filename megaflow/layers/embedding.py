"""VocabParallelEmbedding: the (padded) vocabulary split into contiguous ranges across TP ranks.

Each rank looks up the ids in its range, zeroes the rest, and the partial embeddings are summed by an
all-reduce (or reduce-scattered along the sequence with sequence parallelism).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaflow.layers.sharding import mark_tensor_parallel
from megaflow.parallel import mappings, state


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02,
                 unpadded_vocab_size: int | None = None):
        super().__init__()
        st = state.get()
        if num_embeddings % st.tp_size:
            raise ValueError(f"padded vocabulary {num_embeddings} not divisible by TP size {st.tp_size}")
        self.num_embeddings = num_embeddings
        per_rank = num_embeddings // st.tp_size
        self.vocab_start, self.vocab_end = st.tp_rank * per_rank, (st.tp_rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=st.device))
        self.weight.init_std = init_std
        # Rows past the real vocabulary are padding: initialised to 0 (model/init.py) and never
        # looked up nor given a gradient by the loss, so the real rows are the same whatever padding
        # the TP size implies.
        self.weight.vocab_rows = unpadded_vocab_size
        mark_tensor_parallel(self.weight, 0)

    def forward(self, ids):
        """ids [...] -> embeddings [..., h]; the reduction over TP happens in the caller's mapping."""
        return _lookup(self.weight, ids)

    def forward_reduced(self, ids, sequence_parallel: bool = False):
        """Lookup followed by the sum over TP ranks; ids are [s, b] when sequence_parallel."""
        out = self(ids)  # through __call__: forward hooks (ZeRO parameter all-gather) must run
        return _reduce(out, sequence_parallel)


def _lookup(weight, ids):
    st = state.get()
    if st.tp_size == 1:
        return F.embedding(ids, weight)
    start = st.tp_rank * weight.shape[0]
    outside = (ids < start) | (ids >= start + weight.shape[0])
    out = F.embedding((ids - start).masked_fill(outside, 0), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def _reduce(out, sequence_parallel: bool):
    if sequence_parallel:
        return mappings.reduce_scatter_to_sequence_parallel_region(out)
    return mappings.reduce_from_tensor_parallel_region(out)


def vocab_parallel_lookup(weight, ids, sequence_parallel: bool = False):
    """forward_reduced with another vocabulary-parallel table [vocab/tp, h] (a tied output layer's)."""
    return _reduce(_lookup(weight, ids), sequence_parallel)
