"""Key/value cache for incremental decoding.

GPTModel.forward(ids, inference_cache=cache) treats ids as the continuation of the tokens already in
the cache: their positions start at cache.offset, every attention layer appends their keys/values
(update) and attends over all cached tokens, and the model advances the offset afterwards.

Feed the prompt in one call, then one token per call: the attention kernel's causal mask is aligned
to the first key, which is right for a whole sequence (queries = keys) and for a single new query
(sees everything), not for several new tokens after a cached prefix.

Shapes: k_bgsd/v_bgsd [batch, kv heads, seq, head_dim] (MLA stores its latent and positional key
there: one "head" each, widths of their own); buffers hold max_length positions.
"""
from __future__ import annotations

import torch


class InferenceCache:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0          # tokens already cached (the next token's position)
        self._kv = {}            # attention module -> (k buffer, v buffer)

    def position_ids(self, input_ids_bs: torch.Tensor) -> torch.Tensor:
        b, s = input_ids_bs.shape
        return torch.arange(self.offset, self.offset + s, device=input_ids_bs.device).expand(b, s)

    def update(self, layer, k_bgsd: torch.Tensor, v_bgsd: torch.Tensor):
        """Store this layer's new keys/values; returns every cached key/value, the new ones included."""
        b, g, s = k_bgsd.shape[:3]
        if self.offset and s != 1:
            raise ValueError("after the prompt, feed the cache one token at a time")
        end = self.offset + s
        if end > self.max_length:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's max_length {self.max_length}")
        if layer not in self._kv:
            self._kv[layer] = tuple(t.new_empty(*t.shape[:2], self.max_length, t.shape[3]) for t in (k_bgsd, v_bgsd))
        k_buf, v_buf = self._kv[layer]
        k_buf[:, :, self.offset:end] = k_bgsd
        v_buf[:, :, self.offset:end] = v_bgsd
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def advance(self, n: int) -> None:
        self.offset += n
