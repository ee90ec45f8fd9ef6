"""Model shape: layers, widths, attention, norms, positions, recompute, kernels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import _f


# Defaults the two model styles apply to fields the user did not set.
MODEL_STYLES = {
    "gpt2": dict(normalization="LayerNorm", position_embedding_type="learned_absolute", swiglu=False,
                 add_bias_linear=True, untie_embeddings_and_output_weights=False),
    "llama": dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True),
}


@dataclass
class ModelConfig:
    model_style: str = _f("gpt2", "preset for the style-dependent fields below", choices=list(MODEL_STYLES))
    num_layers: int = _f(2, "transformer layers")
    hidden_size: int = _f(128, "model width")
    ffn_hidden_size: Optional[int] = _f(None, "MLP width (default 4h, or ~8h/3 rounded to 64 with SwiGLU)")
    num_attention_heads: int = _f(4, "attention heads")
    kv_channels: Optional[int] = _f(None, "head dimension (default hidden/heads)")
    group_query_attention: bool = _f(False, "use grouped-query attention", action="store_true")
    num_query_groups: Optional[int] = _f(None, "key/value heads with --group-query-attention")
    normalization: Optional[str] = _f(None, "norm type", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5, "norm epsilon")
    swiglu: Optional[bool] = _f(None, "SwiGLU MLP instead of GeLU", action="store_true")
    position_embedding_type: Optional[str] = _f(None, "positions", choices=["learned_absolute", "rope"])
    rotary_base: int = _f(10000, "RoPE base (theta)")
    max_position_embeddings: Optional[int] = _f(None, "longest sequence (default --seq-length)")
    untie_embeddings_and_output_weights: Optional[bool] = _f(None, "separate output layer", action="store_true")
    add_bias_linear: Optional[bool] = _f(None, "biases in linear layers", flag="--disable-bias-linear",
                                         action="store_false")
    add_qkv_bias: bool = _f(False, "biases on the Q/K/V projection only, whatever --disable-bias-linear says "
                                   "(Qwen2)", action="store_true")
    qk_layernorm: bool = _f(False, "normalise each query and key head (over the head dimension, before RoPE) "
                                   "with --normalization (Qwen3, OLMo 2)", action="store_true")
    multi_latent_attention: bool = _f(False, "multi-latent attention (DeepSeek-V2/V3): queries and keys/values "
                                             "from low-rank latents, RoPE on a decoupled part of each head",
                                      action="store_true")
    q_lora_rank: Optional[int] = _f(None, "MLA: rank of the query latent (unset: one full-rank query projection)")
    kv_lora_rank: int = _f(32, "MLA: rank of the key/value latent (the generation cache holds it per token)")
    qk_head_dim: int = _f(128, "MLA: query/key head features without positions")
    qk_pos_emb_head_dim: int = _f(64, "MLA: query/key head features RoPE rotates (one key part shared by all heads)")
    v_head_dim: int = _f(128, "MLA: value head dimension")
    rope_type: str = _f("rope", "RoPE frequencies: plain, or YaRN-scaled for long contexts", choices=["rope", "yarn"])
    rotary_scaling_factor: float = _f(1.0, "YaRN: context extension factor")
    original_max_position_embeddings: int = _f(4096, "YaRN: the context length RoPE was trained at")
    beta_fast: float = _f(32.0, "YaRN: rotations per context above which frequencies are kept")
    beta_slow: float = _f(1.0, "YaRN: rotations per context below which frequencies are interpolated")
    mscale: float = _f(1.0, "YaRN: attention temperature coefficient")
    mscale_all_dim: float = _f(0.0, "YaRN: attention temperature coefficient over all dimensions (DeepSeek)")
    mtp_num_layers: Optional[int] = _f(None, "multi-token prediction (DeepSeek-V3): extra modules on the last stage, "
                                              "the k-th predicting the token k+1 ahead")
    mtp_loss_scaling_factor: float = _f(0.1, "weight of the mean multi-token-prediction loss in the training loss")
    init_method_std: float = _f(0.02, "std of the normal init")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    hidden_dropout: float = _f(0.1, "dropout on residual branches and embeddings")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this × TP")
    label_smoothing: float = _f(0.0, "label smoothing of the loss, in [0, 1): (1-ε)·NLL + ε·mean over the "
                                     "true vocabulary of -log p (padding excluded)")
    recompute_granularity: Optional[str] = _f(None, "activation recompute", choices=["full", "selective"])
    recompute_method: Optional[str] = _f(None, "layers to recompute", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = _f(None, "layers per recompute chunk (uniform) or count (block)")
    attention_backend: str = _f("auto", "attention kernel", choices=["auto", "torch", "triton", "flash-attn"])
    norm_backend: str = _f("auto", "norm kernel", choices=["auto", "torch", "triton", "apex"])


def validate_attention(cfg, need) -> None:
    """Multi-latent attention, YaRN and multi-token-prediction checks (called from config/validation.py)."""
    m = cfg.model
    if m.mtp_num_layers is not None:
        need(m.mtp_num_layers >= 1, "--mtp-num-layers must be at least 1 (leave it unset for none)")
        need(m.mtp_loss_scaling_factor >= 0, "--mtp-loss-scaling-factor must be non-negative")
        need(cfg.parallel.context_parallel_size == 1,
             "--mtp-num-layers shifts the sequence by whole tokens; context parallelism splits it into zigzag "
             "chunks: drop one of --mtp-num-layers and --context-parallel-size")
    need(m.rope_type == "rope" or m.position_embedding_type == "rope",
         "--rope-type yarn scales RoPE: it needs --position-embedding-type rope (or --model-style llama)")
    if m.rope_type == "yarn":
        need(m.rotary_scaling_factor >= 1, "--rotary-scaling-factor must be at least 1 with --rope-type yarn")
        need(m.original_max_position_embeddings > 0 and m.beta_fast > m.beta_slow > 0,
             "YaRN needs --original-max-position-embeddings > 0 and --beta-fast > --beta-slow > 0")
    if not m.multi_latent_attention:
        return
    need(m.position_embedding_type == "rope",
         "--multi-latent-attention rotates a decoupled part of each head: it needs --position-embedding-type "
         "rope (or --model-style llama)")
    need(not m.group_query_attention and m.kv_channels is None and not m.add_qkv_bias,
         "--multi-latent-attention sizes its heads with --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim "
         "and shares keys through its latent: drop --group-query-attention, --kv-channels and --add-qkv-bias")
    need(min(m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) > 0
         and (m.q_lora_rank is None or m.q_lora_rank > 0),
         "--q-lora-rank, --kv-lora-rank, --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim must be positive")
    need(m.qk_pos_emb_head_dim % 2 == 0, "--qk-pos-emb-head-dim must be even (RoPE rotates pairs)")
