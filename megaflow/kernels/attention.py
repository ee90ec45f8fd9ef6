"""Causal self-attention with grouped-query heads.

Shapes: q_bnsd [batch, heads, seq, head_dim]; k_bnsd, v_bnsd [batch, kv_heads, seq, head_dim]
with heads a multiple of kv_heads. Returns [batch, heads, seq, head_dim].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import resolve_backend


def attention_reference(q_bnsd, k_bnsd, v_bnsd, causal=True, softmax_scale=None):
    """Plain torch, materialised probabilities, computed in fp32: the numerical reference."""
    groups = q_bnsd.shape[1] // k_bnsd.shape[1]
    k = k_bnsd.float().repeat_interleave(groups, dim=1)
    v = v_bnsd.float().repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else q_bnsd.shape[-1] ** -0.5
    scores = (q_bnsd.float() @ k.transpose(-1, -2)) * scale
    if causal:
        s = q_bnsd.shape[2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q_bnsd.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q_bnsd.dtype)


def attention(q_bnsd, k_bnsd, v_bnsd, causal=True, dropout_p=0.0, softmax_scale=None, backend="auto"):
    """The model's single attention entry point."""
    backend = resolve_backend(backend, q_bnsd, optional_package="flash_attn")
    if backend == "torch":
        return F.scaled_dot_product_attention(
            q_bnsd, k_bnsd, v_bnsd, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale,
            enable_gqa=k_bnsd.shape[1] != q_bnsd.shape[1])
    raise NotImplementedError(f"attention backend {backend!r}")
