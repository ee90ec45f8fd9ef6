"""megaflow MoE models ⇄ Hugging Face MixtralForCausalLM (config.json) and the MoE layers' weights of
Mixtral and Qwen3-MoE (checkpoint/hf_qwen.py has Qwen3-MoE's config).

A Llama-style model whose every layer is an MoE layer with Mixtral's routing (softmax over all experts,
top-k, renormalised; no shared expert, no expert bias, no groups, no capacity) is a Mixtral:

    layers.i.mlp.router.weight                          model.layers.i.block_sparse_moe.gate.weight
    layers.i.mlp.experts.local_experts.e.linear_fc1     .block_sparse_moe.experts.e.w1 (gate) / .w3 (up)
    layers.i.mlp.experts.local_experts.e.linear_fc2     .block_sparse_moe.experts.e.w2 (down)

(the per-expert names transformers writes and vLLM reads). Qwen3-MoE and DeepSeek-V3 name the same
tensors mlp.gate.weight and mlp.experts.e.gate_proj / up_proj / down_proj; DeepSeek-V3 adds the expert
bias (mlp.gate.e_score_correction_bias, zeros when megaflow trained without one) and the shared experts
(mlp.shared_experts.gate_proj / up_proj / down_proj). Attention, norms and embeddings map as in
checkpoint/hf.py's Llama table.
"""
from __future__ import annotations

MIXTRAL = "MixtralForCausalLM"
# HF names of an MoE layer, after "model.layers.i.": (router, expert e's prefix, (gate, up, down)).
_NAMES = {MIXTRAL: ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2")),
          "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj")),
          "DeepseekV3ForCausalLM": ("mlp.gate.weight", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"))}


def mixtral_problem(cfg) -> str | None:
    """Why this MoE model is not a Mixtral, or None."""
    from megaflow.config import parse_layer_freq
    e = cfg.moe
    if any(v == 0 for v in parse_layer_freq(e.moe_layer_freq, cfg.model.num_layers)):
        return "every layer must be an MoE layer (--moe-layer-freq 1)"
    if e.moe_router_score_function != "softmax" or e.moe_router_pre_softmax:
        return "Mixtral routes with a softmax renormalised over the top k (no --moe-router-pre-softmax, no sigmoid)"
    for flag, value in (("--moe-shared-expert-intermediate-size", e.moe_shared_expert_intermediate_size),
                        ("--moe-router-enable-expert-bias", e.moe_router_enable_expert_bias),
                        ("--moe-router-num-groups", e.moe_router_num_groups),
                        ("--moe-router-topk-scaling-factor", e.moe_router_topk_scaling_factor),
                        ("--moe-expert-capacity-factor", e.moe_expert_capacity_factor)):
        if value:
            return f"{flag} has no Mixtral equivalent"
    return None


def to_mixtral_config(cfg, llama_config: dict) -> dict:
    e = cfg.moe
    out = {k: v for k, v in llama_config.items() if k not in ("mlp_bias", "attention_bias")}
    out.update(architectures=[MIXTRAL], model_type="mixtral", intermediate_size=e.moe_ffn_hidden_size,
               num_local_experts=e.num_experts, num_experts_per_tok=e.moe_router_topk,
               router_aux_loss_coef=e.moe_aux_loss_coeff, output_router_logits=False, router_jitter_noise=0.0,
               sliding_window=None)
    return out


def from_mixtral_config(hf: dict) -> dict:
    """Config fields of the MoE section (the Llama fields are read as for Llama)."""
    return dict(num_experts=hf["num_local_experts"], moe_ffn_hidden_size=hf["intermediate_size"],
                moe_router_topk=hf["num_experts_per_tok"], moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0),
                moe_layer_freq="1")


def moe_pairs_to_hf(cfg, arch: str, sd: dict, ours: str, theirs: str):
    """(HF name, tensor) of one MoE layer: ours = 'layers.i.mlp.', theirs = 'model.layers.i.'."""
    router, expert, (w_gate, w_up, w_down) = _NAMES[arch]
    yield theirs + router, sd[ours + "router.weight"]
    if arch == "DeepseekV3ForCausalLM":
        bias = sd.get(ours + "router.expert_bias")
        yield theirs + "mlp.gate.e_score_correction_bias", bias if bias is not None else sd[ours + "router.weight"].new_zeros(
            cfg.moe.num_experts)
        gate, up = sd[ours + "shared_experts.linear_fc1.weight"].chunk(2)
        yield from ((theirs + "mlp.shared_experts." + k, v) for k, v in (
            ("gate_proj.weight", gate), ("up_proj.weight", up),
            ("down_proj.weight", sd[ours + "shared_experts.linear_fc2.weight"])))
    for e in range(cfg.moe.num_experts):
        p, h = f"{ours}experts.local_experts.{e}.", theirs + expert.format(e)
        gate, up = sd[p + "linear_fc1.weight"].chunk(2)
        yield h + w_gate + ".weight", gate
        yield h + w_up + ".weight", up
        yield h + w_down + ".weight", sd[p + "linear_fc2.weight"]


def moe_from_hf(cfg, arch: str, take, ours: str, theirs: str) -> dict:
    """megaflow tensors of one MoE layer; take(name) fetches (and marks used) an HF tensor."""
    import torch
    router, expert, (w_gate, w_up, w_down) = _NAMES[arch]
    out = {ours + "router.weight": take(theirs + router)}
    if arch == "DeepseekV3ForCausalLM":
        out[ours + "router.expert_bias"] = take(theirs + "mlp.gate.e_score_correction_bias").float()
        h = theirs + "mlp.shared_experts."
        out[ours + "shared_experts.linear_fc1.weight"] = torch.cat([take(h + "gate_proj.weight"),
                                                                    take(h + "up_proj.weight")])
        out[ours + "shared_experts.linear_fc2.weight"] = take(h + "down_proj.weight")
    for e in range(cfg.moe.num_experts):
        p, h = f"{ours}experts.local_experts.{e}.", theirs + expert.format(e)
        out[p + "linear_fc1.weight"] = torch.cat([take(h + w_gate + ".weight"), take(h + w_up + ".weight")])
        out[p + "linear_fc2.weight"] = take(h + w_down + ".weight")
    return out
