"""Multi-latent attention (DeepSeek-V2/V3; Megatron-Core's MLASelfAttention), --multi-latent-attention.

Per token, with r_q = --q-lora-rank, r = --kv-lora-rank, d = --qk-head-dim, d_r = --qk-pos-emb-head-dim,
d_v = --v-head-dim, n heads:

    c_q  = norm(x W_dq)              [r_q]        (or no latent: q = x W_q when --q-lora-rank is unset)
    q    = c_q W_uq                  [n, d + d_r]  -> q_nope [n, d], q_pos [n, d_r] -> RoPE(q_pos)
    c_kv, k_pos = x W_dkv            [r], [d_r]   -> c_kv = norm(c_kv), RoPE(k_pos): ONE key part for all heads
    k_nope, v = c_kv W_ukv           [n, d], [n, d_v]
    attention(q = [q_nope, q_pos], k = [k_nope, k_pos], v), softmax scale 1/sqrt(d + d_r) (YaRN-corrected)
    out  = attn W_o

Tensor parallelism (Megatron's layout): the down-projections W_dq, W_dkv and the latent norms are small
and replicated (layers/linear.py ReplicatedLinear), each rank computing the whole latent of its tokens;
the up-projections W_uq, W_ukv are column-parallel (heads split) and W_o row-parallel. The up-projections
make the latents' gradient whole (all-reduce, or reduce-scatter under sequence parallelism); k_pos
bypasses them and feeds every local head, so it enters the TP region explicitly (copy, or an all-gather
along the sequence under sequence parallelism) and its gradient is summed over the ranks' heads too.
Under sequence parallelism the down-projections see only this rank's tokens: their weight gradients
(and the latent norms') are summed over TP.

Generation caches the compressed state, c_kv and the rotated k_pos (r + d_r values per token instead of
n·(d + d_r + d_v)), and expands it through W_ukv at each step, as transformers does.
"""
from __future__ import annotations

import torch

from megaflow.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, build_norm
from megaflow.model.attention import AttentionCore
from megaflow.parallel import mappings, state


class MultiLatentAttention(AttentionCore):
    def __init__(self, cfg, output_std: float):
        m, sp, tp = cfg.model, cfg.parallel.sequence_parallel, state.get().tp_size
        self.nope_dim, self.pos_dim, self.v_dim = m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim
        super().__init__(cfg, self.nope_dim + self.pos_dim)
        self.kv_rank = m.kv_lora_rank
        self.n_local = m.num_attention_heads // tp
        self.sequence_parallel = sp and tp > 1
        n, h, std = m.num_attention_heads, m.hidden_size, m.init_method_std
        qk_dim = self.nope_dim + self.pos_dim
        if m.q_lora_rank is None:
            self.linear_q_proj = ColumnParallelLinear(h, n * qk_dim, bias=False, sequence_parallel=sp, init_std=std)
        else:
            self.linear_q_down_proj = ReplicatedLinear(h, m.q_lora_rank, sequence_parallel=self.sequence_parallel,
                                                       init_std=std)
            self.q_layernorm = build_norm(m.normalization, m.q_lora_rank, m.norm_epsilon, m.norm_backend,
                                          self.sequence_parallel)
            self.linear_q_up_proj = ColumnParallelLinear(m.q_lora_rank, n * qk_dim, bias=False,
                                                         sequence_parallel=sp, init_std=std)
        self.linear_kv_down_proj = ReplicatedLinear(h, self.kv_rank + self.pos_dim,
                                                    sequence_parallel=self.sequence_parallel, init_std=std)
        self.kv_layernorm = build_norm(m.normalization, self.kv_rank, m.norm_epsilon, m.norm_backend,
                                       self.sequence_parallel)
        self.linear_kv_up_proj = ColumnParallelLinear(self.kv_rank, n * (self.nope_dim + self.v_dim), bias=False,
                                                      sequence_parallel=sp, init_std=std)
        self.linear_proj = RowParallelLinear(n * self.v_dim, h, bias=m.add_bias_linear, sequence_parallel=sp,
                                             init_std=output_std)

    def _queries(self, x_sbh):
        if hasattr(self, "linear_q_proj"):
            return self.linear_q_proj(x_sbh)
        return self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x_sbh)))

    def forward(self, x_sbh, inference_cache=None, context=None):
        """context: (rotary tables from the tokens' position ids or None, cu_seqlens [b, t] or None)."""
        rotary, cu_seqlens_bt = context or (None, None)
        q = self._queries(x_sbh)                                              # [s, b, n·(d + d_r)]
        s, b = q.shape[:2]
        q_bnsd = q.reshape(s, b, self.n_local, self.nope_dim + self.pos_dim).permute(1, 2, 0, 3)
        q_nope, q_pos = q_bnsd.split([self.nope_dim, self.pos_dim], dim=-1)
        c_kv, k_pos = self.linear_kv_down_proj(x_sbh).split([self.kv_rank, self.pos_dim], dim=-1)
        c_kv = self.kv_layernorm(c_kv)                                        # [s(/tp), b, r]
        if self.sequence_parallel:
            k_pos = mappings.gather_from_sequence_parallel_region(k_pos)      # [s, b, d_r]
        else:
            k_pos = mappings.copy_to_tensor_parallel_region(k_pos)
        q_pos, k_pos = self.rotate(q_pos.contiguous(), k_pos.unsqueeze(2).permute(1, 2, 0, 3), rotary,
                                   inference_cache)                           # k_pos [b, 1, s, d_r]
        if inference_cache is not None:  # cache the compressed state; expand every cached token below
            if self.sequence_parallel:
                raise ValueError("generation runs without --sequence-parallel")
            c_b1sr, k_pos = inference_cache.update(self, c_kv.unsqueeze(2).permute(1, 2, 0, 3), k_pos)
            c_kv = c_b1sr[:, 0].transpose(0, 1)                               # [all tokens, b, r]
        kv = self.linear_kv_up_proj(c_kv)                                     # [s_k, b, n·(d + d_v)]
        kv_bnsd = kv.reshape(kv.shape[0], b, self.n_local, self.nope_dim + self.v_dim).permute(1, 2, 0, 3)
        k_nope, v_bnsd = kv_bnsd.split([self.nope_dim, self.v_dim], dim=-1)
        k_bnsd = torch.cat([k_nope, k_pos.expand(-1, self.n_local, -1, -1)], dim=-1)
        q_bnsd = torch.cat([q_nope, q_pos], dim=-1)
        out_bnsd = self.attend(q_bnsd, k_bnsd, v_bnsd.contiguous(), cu_seqlens_bt, cached=inference_cache is not None)
        out_sbh = out_bnsd.permute(2, 0, 1, 3).reshape(s, b, self.n_local * self.v_dim)
        return self.linear_proj(out_sbh)
