"""megaflow ⇄ Hugging Face Qwen2ForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM (config.json).

All three are Llama-shaped (RMSNorm, RoPE, SwiGLU, grouped-query attention); what tells them apart:

    Qwen2       biases on Q/K/V only                    --add-qkv-bias
    Qwen3       QK-norm: RMSNorm over each head's d     --qk-layernorm   (attention_bias: also on Q/K/V/O)
    Qwen3-MoE   Qwen3 with MoE layers: softmax router, top-k, renormalised when norm_topk_prob
                (megaflow: --moe-router-pre-softmax off), no shared expert; dense layers where
                mlp_only_layers says (megaflow: 0 in --moe-layer-freq)

Weights map as Llama's (checkpoint/hf.py) plus

    self_attention.q_layernorm / k_layernorm     self_attn.q_norm / k_norm
    the MoE layer                                mlp.gate, mlp.experts.e.{gate,up,down}_proj (hf_moe.py)
"""
from __future__ import annotations

QWEN2, QWEN3, QWEN3_MOE = "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
MODEL_TYPES = {QWEN2: "qwen2", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe"}


def architecture(cfg) -> tuple[str | None, str | None]:
    """(Qwen architecture, None) for a Llama-shaped model with Qwen's attention, or (None, why not)."""
    from megaflow.config import parse_layer_freq
    m, e = cfg.model, cfg.moe
    if e.num_experts is not None:
        if not m.qk_layernorm or m.add_qkv_bias:
            return None, "Qwen3-MoE has QK-norm (--qk-layernorm) and no --add-qkv-bias"
        if m.add_bias_linear:
            return None, "Qwen3-MoE has no MLP biases (drop the biases: --disable-bias-linear)"
        if e.moe_router_score_function != "softmax":
            return None, "Qwen3-MoE routes with a softmax (no sigmoid)"
        for flag, value in (("--moe-shared-expert-intermediate-size", e.moe_shared_expert_intermediate_size),
                            ("--moe-router-enable-expert-bias", e.moe_router_enable_expert_bias),
                            ("--moe-router-num-groups", e.moe_router_num_groups),
                            ("--moe-router-topk-scaling-factor", e.moe_router_topk_scaling_factor),
                            ("--moe-expert-capacity-factor", e.moe_expert_capacity_factor)):
            if value:
                return None, f"{flag} has no Qwen3-MoE equivalent"
        if 0 in parse_layer_freq(e.moe_layer_freq, m.num_layers) and not m.ffn_hidden_size:
            return None, "dense layers need --ffn-hidden-size"
        return QWEN3_MOE, None
    if m.qk_layernorm:
        if m.add_bias_linear:
            return None, "Qwen3's attention_bias puts biases on Q/K/V/O but never on the MLP: drop the biases"
        if m.add_qkv_bias:
            return None, "Qwen3 has biases on all four attention projections or none: drop --add-qkv-bias"
        return QWEN3, None
    if m.add_qkv_bias:
        if m.add_bias_linear:
            return None, "Qwen2 has biases on Q/K/V only: add --disable-bias-linear"
        if (m.kv_channels or m.hidden_size // m.num_attention_heads) * m.num_attention_heads != m.hidden_size:
            return None, "Qwen2's head dimension is hidden/heads: drop --kv-channels"
        return QWEN2, None
    return None, None


def to_qwen_config(cfg, arch: str, llama: dict) -> dict:
    """config.json of a Qwen model from the Llama one of the same attention/MLP shapes."""
    from megaflow.config import parse_layer_freq
    m, e = cfg.model, cfg.moe
    out = {k: v for k, v in llama.items() if k not in ("mlp_bias", "attention_bias", "pretraining_tp")}
    out.update(architectures=[arch], model_type=MODEL_TYPES[arch], use_sliding_window=False, sliding_window=None,
               max_window_layers=m.num_layers)
    if arch != QWEN2:
        out["attention_bias"] = False
    if arch == QWEN3_MOE:
        dense = [i for i, v in enumerate(parse_layer_freq(e.moe_layer_freq, m.num_layers)) if v == 0]
        out.update(intermediate_size=m.ffn_hidden_size or e.moe_ffn_hidden_size,
                   moe_intermediate_size=e.moe_ffn_hidden_size, num_experts=e.num_experts,
                   num_experts_per_tok=e.moe_router_topk, norm_topk_prob=not e.moe_router_pre_softmax,
                   decoder_sparse_step=1, mlp_only_layers=dense, router_aux_loss_coef=e.moe_aux_loss_coeff,
                   output_router_logits=False)
    return out


def from_qwen_config(hf: dict, model_type: str) -> dict:
    """Config fields beyond the Llama ones (checkpoint/hf.py reads those)."""
    from megaflow.checkpoint.hf import ConversionError
    if hf.get("use_sliding_window"):
        raise ConversionError("config.json: sliding-window attention (use_sliding_window) is not supported by megaflow")
    if model_type == "qwen2":
        return dict(add_qkv_bias=True)
    if hf.get("attention_bias"):
        raise ConversionError("config.json: attention_bias puts biases on Q/K/V/O but not on the MLP; megaflow "
                              "has biases on Q/K/V only (--add-qkv-bias) or everywhere")
    out = dict(qk_layernorm=True)
    if model_type == "qwen3_moe":
        n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(n)]
        out.update(num_experts=hf["num_experts"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                   moe_router_topk=hf["num_experts_per_tok"], moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
                   moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0),
                   moe_layer_freq="1" if all(pattern) else "[" + ",".join(map(str, pattern)) + "]")
    return out
