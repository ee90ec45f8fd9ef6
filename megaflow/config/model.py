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
