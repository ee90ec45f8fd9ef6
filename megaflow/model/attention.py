"""Attention blocks. SelfAttention (multi-head / grouped-query, fused [Q; K; V] projection) here;
MultiLatentAttention (DeepSeek-V3's MLA) in mla.py. Both take x_sbh and return the projected output;
what they share lives in AttentionCore: RoPE tables (plain or YaRN), the attention kernel with its
dropout stream, the context-parallel / packed-document path and selective recompute.

Shape legend as in gpt.py: s sequence, b batch, n heads on this rank, g query groups on this rank,
d head dim.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from megaflow.kernels.attention import attention
from megaflow.kernels.rope import YarnScaling, apply_rotary, rotary_cos_sin, yarn_softmax_scale_factor
from megaflow.layers import ColumnParallelLinear, RowParallelLinear, build_norm
from megaflow.layers.context_attention import context_parallel_attention
from megaflow.parallel import random, state


def rope_scaling(m) -> Optional[YarnScaling]:
    """The YaRN parameters of --rope-type yarn, or None for plain RoPE."""
    if m.rope_type != "yarn":
        return None
    return YarnScaling(factor=m.rotary_scaling_factor,
                       original_max_position_embeddings=m.original_max_position_embeddings,
                       beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim)


def rotary_dim(m) -> int:
    """Features RoPE rotates per head: the whole head, or MLA's decoupled positional part."""
    if m.multi_latent_attention:
        return m.qk_pos_emb_head_dim
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def rotary_tables(m, seq_len: int, device, position_ids=None):
    return rotary_cos_sin(seq_len, rotary_dim(m), m.rotary_base, device=device, position_ids=position_ids,
                          scaling=rope_scaling(m))


class AttentionCore(nn.Module):
    """softmax scale: the kernels' default 1/sqrt(query-key dim), times YaRN's correction if any."""

    def __init__(self, cfg, qk_dim: int):
        super().__init__()
        m = cfg.model
        self.model_cfg = m
        self.rope = m.position_embedding_type == "rope"
        scaling = rope_scaling(m)
        factor = yarn_softmax_scale_factor(scaling) if scaling is not None else 1.0
        self.softmax_scale = None if factor == 1.0 else qk_dim ** -0.5 * factor
        self.dropout_p = m.attention_dropout
        self.backend = m.attention_backend
        self.recompute_core = m.recompute_granularity == "selective"
        # Tokens spread over CP ranks (zigzag) or packed documents: the block-attention path.
        self.context_parallel = state.get().cp_size > 1
        self.cp_comm_type = cfg.parallel.cp_comm_type

    def _rotary_tables(self, seq_len, device):
        # Same tables every step: compute once per sequence length (not a parameter, not saved).
        key = (seq_len, device)
        if getattr(self, "_rotary_key", None) != key:
            self._rotary = rotary_tables(self.model_cfg, seq_len, device)
            self._rotary_key = key
        return self._rotary

    def rotate(self, q_bnsd, k_bgsd, rotary=None, inference_cache=None):
        """RoPE on queries and keys: at each token's own position when rotary tables come with the
        batch (CP chunks, reset positions), else at 0..s-1 after the cached tokens."""
        if not self.rope:
            return q_bnsd, k_bgsd
        if rotary is None:
            # With a cache these s tokens sit at positions offset..offset+s-1 of a longer sequence.
            s = q_bnsd.shape[2]
            offset = inference_cache.offset if inference_cache is not None else 0
            table_len = inference_cache.max_length if inference_cache is not None else s
            rotary = tuple(t[offset:offset + s] for t in self._rotary_tables(table_len, q_bnsd.device))
        return (apply_rotary(q_bnsd, *rotary, backend=self.backend),
                apply_rotary(k_bgsd, *rotary, backend=self.backend))

    def _core(self, q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt=None, scale=None):
        if self.context_parallel or cu_seqlens_bt is not None:  # (config refuses dropout here)
            return context_parallel_attention(q_bnsd, k_bgsd, v_bgsd, self.cp_comm_type, cu_seqlens_bt,
                                              softmax_scale=scale, backend=self.backend)
        if not (self.training and self.dropout_p > 0):
            return attention(q_bnsd, k_bgsd, v_bgsd, causal=True, softmax_scale=scale, backend=self.backend)
        with random.model_parallel_rng():  # this rank's heads: its own dropout stream
            return attention(q_bnsd, k_bgsd, v_bgsd, causal=True, dropout_p=self.dropout_p,
                             softmax_scale=scale, backend=self.backend)

    def attend(self, q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt=None, cached=False):
        """Causal attention; `cached`: the keys are the cache's (every earlier token plus the new ones)."""
        dqk, dv = q_bnsd.shape[-1], v_bgsd.shape[-1]
        if dqk == dv:
            return self._attend(q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt, cached, self.softmax_scale)
        # The fused kernels take one head dimension for q, k and v (MLA's differ; torch's CPU SDPA would
        # fall back to its math path, which keeps the s×s probabilities): zero features add nothing to
        # scores or outputs, so pad to the larger one and cut the output back.
        width, scale = max(dqk, dv), self.softmax_scale or dqk ** -0.5
        pad = lambda t: F.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        return self._attend(pad(q_bnsd), pad(k_bgsd), pad(v_bgsd), cu_seqlens_bt, cached, scale)[..., :dv]

    def _attend(self, q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt, cached, scale):
        if cached:
            return attention(q_bnsd, k_bgsd, v_bgsd, causal=k_bgsd.shape[2] == q_bnsd.shape[2],
                             softmax_scale=scale, backend=self.backend)
        if self.recompute_core and self.training:
            # Selective recompute: attention's activations are the largest and cheapest to redo.
            return random.checkpoint(self._core, q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt, scale)
        return self._core(q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt, scale)


class SelfAttention(AttentionCore):
    def __init__(self, cfg, output_std: float):
        m, sp, tp = cfg.model, cfg.parallel.sequence_parallel, state.get().tp_size
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        super().__init__(cfg, head_dim)
        self.head_dim = head_dim
        self.n_local = m.num_attention_heads // tp
        self.g_local = m.num_query_groups // tp
        q_size, kv_size = m.num_attention_heads * self.head_dim, m.num_query_groups * self.head_dim
        # Fused [Q; K; V] projection; each block is split across TP on its own (layers/sharding.py).
        self.linear_qkv = ColumnParallelLinear(m.hidden_size, q_size + 2 * kv_size,
                                               bias=m.add_bias_linear or m.add_qkv_bias,
                                               sequence_parallel=sp, fused_sizes=[q_size, kv_size, kv_size],
                                               init_std=m.init_method_std, separate_blocks=True)
        self.linear_proj = RowParallelLinear(q_size, m.hidden_size, bias=m.add_bias_linear,
                                             sequence_parallel=sp, init_std=output_std)
        if m.qk_layernorm:
            # One weight over the head dimension, shared by every head: replicated across TP while each
            # rank normalises its own heads, so its gradient is summed over TP, as sequence-parallel
            # norms' are (the flag only marks that sum).
            tp_partial = tp > 1
            self.q_layernorm = build_norm(m.normalization, self.head_dim, m.norm_epsilon, m.norm_backend, tp_partial)
            self.k_layernorm = build_norm(m.normalization, self.head_dim, m.norm_epsilon, m.norm_backend, tp_partial)

    def forward(self, x_sbh, inference_cache=None, context=None):
        """context: (rotary tables from the tokens' position ids or None, cu_seqlens [b, t] or None)."""
        rotary, cu_seqlens_bt = context or (None, None)
        q, k, v = self.linear_qkv(x_sbh)                               # [s, b, n·d], [s, b, g·d] x2
        s, b = q.shape[:2]
        q_sbnd, k_sbgd = q.reshape(s, b, self.n_local, self.head_dim), k.reshape(s, b, self.g_local, self.head_dim)
        if hasattr(self, "q_layernorm"):  # QK-norm: each head over its d features, before RoPE
            q_sbnd, k_sbgd = self.q_layernorm(q_sbnd), self.k_layernorm(k_sbgd)
        q_bnsd, k_bgsd = q_sbnd.permute(1, 2, 0, 3), k_sbgd.permute(1, 2, 0, 3)
        v_bgsd = v.reshape(s, b, self.g_local, self.head_dim).permute(1, 2, 0, 3)
        q_bnsd, k_bgsd = self.rotate(q_bnsd, k_bgsd, rotary, inference_cache)
        if inference_cache is not None:  # generation: attend over every cached token, new ones included
            k_bgsd, v_bgsd = inference_cache.update(self, k_bgsd, v_bgsd)
        out_bnsd = self.attend(q_bnsd, k_bgsd, v_bgsd, cu_seqlens_bt, cached=inference_cache is not None)
        out_sbh = out_bnsd.permute(2, 0, 1, 3).reshape(s, b, self.n_local * self.head_dim)
        return self.linear_proj(out_sbh)
