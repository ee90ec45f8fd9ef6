"""megaflow ⇄ Hugging Face DeepseekV3ForCausalLM: multi-latent attention (model/mla.py), MoE layers with
DeepSeek-V3's routing after leading dense layers, YaRN.

A Llama-style model with --multi-latent-attention is a DeepSeek-V3 when its MoE layers (if any) follow
its dense ones (--moe-layer-freq [0]*k+[1]*(n-k): first_k_dense_replace = k; a dense model is k = n)
and route as DeepSeek-V3 does: sigmoid scores, the chosen ones renormalised (norm_topk_prob) and scaled
(routed_scaling_factor = --moe-router-topk-scaling-factor), the choice biased by the expert bias
(e_score_correction_bias, "noaux_tc"), groups ranked by their best two scores
(--moe-router-topk / --moe-router-group-topk = 2), and shared experts of n × --moe-ffn-hidden-size.

    self_attention.linear_q_down_proj / q_layernorm / linear_q_up_proj   self_attn.q_a_proj / q_a_layernorm / q_b_proj
    self_attention.linear_q_proj (no --q-lora-rank)                     self_attn.q_proj
    self_attention.linear_kv_down_proj / kv_layernorm / linear_kv_up_proj
                                                       self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj
    self_attention.linear_proj                                          self_attn.o_proj
    mlp.router.weight / expert_bias                                     mlp.gate.weight / e_score_correction_bias
    mlp.experts.local_experts.e.linear_fc1 [gate; up], linear_fc2       mlp.experts.e.gate_proj, up_proj, down_proj
    mlp.shared_experts.linear_fc1 [gate; up], linear_fc2                mlp.shared_experts.gate_proj, up_proj, down_proj

Multi-token prediction (model/mtp.py): DeepSeek-V3's released weights hold module k as decoder layer
num_hidden_layers + k (config num_nextn_predict_layers), which transformers ignores on load. An export
keeps them there only when asked (convert_to_hf.py --export-mtp); an import keeps those it finds:

    mtp.layers.k.enorm / hnorm / eh_proj ([embedding; hidden] inputs)   model.layers.{n+k}.enorm / hnorm / eh_proj
    mtp.layers.k.final_norm                                             model.layers.{n+k}.shared_head.norm
    mtp.layers.k.layer.*                                                model.layers.{n+k}.* (the decoder layer)
    (the model's own embedding and output layer)                        model.layers.{n+k}.embed_tokens / shared_head.head

RoPE layout: DeepSeek's checkpoints (rope_interleave = true, which transformers and vLLM read) store the
positional features of q_b_proj's heads and of kv_a_proj_with_mqa as interleaved pairs (x0, x1), (x2, x3)...;
megaflow rotates halves (kernels/rope.py), so those rows are permuted on the way in and out.
"""
from __future__ import annotations

import torch

DEEPSEEK_V3 = "DeepseekV3ForCausalLM"


def architecture_problem(cfg) -> str | None:
    """Why this MLA model is not a DeepSeek-V3, or None."""
    from megaflow.config import parse_layer_freq
    m, e = cfg.model, cfg.moe
    if not (m.normalization == "RMSNorm" and m.position_embedding_type == "rope" and m.swiglu):
        return "DeepSeek-V3 needs RMSNorm, rope and swiglu"
    if m.add_bias_linear:
        return "DeepSeek-V3 has no biases (--disable-bias-linear)"
    if e.num_experts is None:
        return None
    pattern = parse_layer_freq(e.moe_layer_freq, m.num_layers)
    k = pattern.index(1) if 1 in pattern else m.num_layers
    if pattern != [0] * k + [1] * (m.num_layers - k):
        return "DeepSeek-V3's MoE layers follow its dense ones (--moe-layer-freq [0]*k+[1]*(n-k))"
    if e.moe_router_score_function != "sigmoid":
        return "DeepSeek-V3 routes with sigmoid scores (--moe-router-score-function sigmoid)"
    shared = e.moe_shared_expert_intermediate_size
    if not shared or shared % e.moe_ffn_hidden_size:
        return "DeepSeek-V3 has shared experts: --moe-shared-expert-intermediate-size a multiple of --moe-ffn-hidden-size"
    if e.moe_router_num_groups is not None and e.moe_router_topk // e.moe_router_group_topk != 2:
        return "DeepSeek-V3 ranks expert groups by their best two scores: --moe-router-topk = 2 × --moe-router-group-topk"
    for flag, value in (("--moe-shared-expert-gate", e.moe_shared_expert_gate),
                        ("--moe-expert-capacity-factor", e.moe_expert_capacity_factor)):
        if value:
            return f"{flag} has no DeepSeek-V3 equivalent"
    return None


def _rope_parameters(m) -> dict:
    if m.rope_type != "yarn":
        return {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    return {"rope_type": "yarn", "rope_theta": float(m.rotary_base), "factor": m.rotary_scaling_factor,
            "original_max_position_embeddings": m.original_max_position_embeddings, "beta_fast": m.beta_fast,
            "beta_slow": m.beta_slow, "mscale": m.mscale, "mscale_all_dim": m.mscale_all_dim}


def to_deepseek_config(cfg, common: dict, keep_mtp: bool = False) -> dict:
    """config.json; common holds the fields every architecture writes (vocabulary, ids, dtype, tying).
    keep_mtp: the multi-token-prediction layers are exported too (num_nextn_predict_layers)."""
    from megaflow.config import parse_layer_freq
    m, e = cfg.model, cfg.moe
    moe = e.num_experts is not None
    pattern = parse_layer_freq(e.moe_layer_freq, m.num_layers) if moe else [0] * m.num_layers
    rope = _rope_parameters(m)
    legacy_rope = None if rope["rope_type"] == "default" else dict({k: v for k, v in rope.items() if k != "rope_theta"},
                                                                    type="yarn")
    out = dict(common, architectures=[DEEPSEEK_V3], model_type="deepseek_v3", hidden_size=m.hidden_size,
               intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
               q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
               qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, hidden_act="silu",
               # As transformers writes them: vLLM sizes its RoPE by head_dim (the rotated part).
               head_dim=m.qk_pos_emb_head_dim, qk_head_dim=m.qk_head_dim + m.qk_pos_emb_head_dim,
               rms_norm_eps=m.norm_epsilon, max_position_embeddings=m.max_position_embeddings,
               rope_theta=float(m.rotary_base), rope_parameters=rope, rope_scaling=legacy_rope, rope_interleave=True,
               attention_bias=False, attention_dropout=m.attention_dropout,
               first_k_dense_replace=pattern.index(1) if 1 in pattern else m.num_layers, moe_layer_freq=1,
               num_nextn_predict_layers=(m.mtp_num_layers or 0) if keep_mtp else 0)
    if moe:
        groups = e.moe_router_num_groups
        out.update(n_routed_experts=e.num_experts, num_experts_per_tok=e.moe_router_topk,
                   moe_intermediate_size=e.moe_ffn_hidden_size,
                   n_shared_experts=e.moe_shared_expert_intermediate_size // e.moe_ffn_hidden_size,
                   routed_scaling_factor=e.moe_router_topk_scaling_factor or 1.0,
                   norm_topk_prob=e.moe_router_topk > 1, n_group=groups or 1,
                   topk_group=e.moe_router_group_topk if groups else 1,
                   topk_method="noaux_tc", scoring_func="sigmoid", aux_loss_alpha=e.moe_aux_loss_coeff)
    else:  # transformers still builds a (never used) router shape from these
        out.update(n_routed_experts=1, num_experts_per_tok=1, moe_intermediate_size=m.ffn_hidden_size,
                   n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True, n_group=1, topk_group=1,
                   topk_method="noaux_tc", scoring_func="sigmoid")
    return out


def from_deepseek_config(hf: dict) -> dict:
    """megaflow Config fields of a DeepseekV3 config.json."""
    from megaflow.checkpoint.hf import ConversionError
    rope = hf.get("rope_parameters") or dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ConversionError(f"config.json: RoPE scaling {rope_type!r} is not supported by megaflow (default, yarn)")
    if hf.get("attention_bias"):
        raise ConversionError("config.json: attention_bias (megaflow's MLA has no biases)")
    n, k = hf["num_hidden_layers"], min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"])
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    out = dict(model_style="llama", num_layers=n, hidden_size=hf["hidden_size"],
               ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
               norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=int(theta),
               max_position_embeddings=hf.get("max_position_embeddings", 4096), add_bias_linear=False,
               multi_latent_attention=True, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
               qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
               v_head_dim=hf["v_head_dim"])
    if rope_type == "yarn":
        out.update(rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                   beta_fast=float(rope.get("beta_fast", 32.0)), beta_slow=float(rope.get("beta_slow", 1.0)),
                   mscale=float(rope.get("mscale", 1.0)), mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
    if k < n:
        groups, topk = hf.get("n_group") or 1, hf["num_experts_per_tok"]
        if groups > 1 and topk // hf["topk_group"] != 2:
            raise ConversionError("config.json: megaflow ranks expert groups by their best num_experts_per_tok / "
                                  "topk_group scores; transformers by their best two: needs num_experts_per_tok = "
                                  "2 × topk_group")
        if topk > 1 and not hf.get("norm_topk_prob", True):
            raise ConversionError("config.json: norm_topk_prob false (megaflow renormalises sigmoid top-k weights)")
        scaling = hf.get("routed_scaling_factor", 1.0)
        out.update(num_experts=hf["n_routed_experts"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                   moe_router_topk=topk, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_shared_expert_intermediate_size=hf["moe_intermediate_size"] * hf.get("n_shared_experts", 1),
                   moe_router_topk_scaling_factor=None if scaling == 1.0 else float(scaling),
                   moe_aux_loss_coeff=hf.get("aux_loss_alpha", 0.0),
                   moe_layer_freq="1" if k == 0 else f"([0]*{k}+[1]*{n - k})")
        if groups > 1:
            out.update(moe_router_num_groups=groups, moe_router_group_topk=hf["topk_group"])
    return out


def _interleaved_rows(rope_dim: int) -> torch.Tensor:
    """Row order that turns halves (megaflow) into interleaved pairs (DeepSeek): row 2i <- i, 2i+1 <- d/2 + i."""
    half = torch.arange(rope_dim // 2)
    return torch.stack([half, half + rope_dim // 2], dim=1).reshape(-1)


def _permute_rope_rows(w: torch.Tensor, heads: int, nope: int, rope: int, to_hf: bool) -> torch.Tensor:
    """w's rows are `heads` blocks of [nope features, rope features]; reorder each block's rope rows."""
    order = _interleaved_rows(rope)
    if not to_hf:
        order = torch.argsort(order)
    blocks = w.reshape(heads, nope + rope, *w.shape[1:])
    return torch.cat([blocks[:, :nope], blocks[:, nope:][:, order]], dim=1).reshape(w.shape)


def mla_pairs_to_hf(m, sd: dict, ours: str, theirs: str):
    """(HF name, tensor) of one layer's attention: ours = 'layers.i.self_attention.', theirs = '...self_attn.'."""
    n, nope, rope = m.num_attention_heads, m.qk_head_dim, m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        yield theirs + "q_proj.weight", _permute_rope_rows(sd[ours + "linear_q_proj.weight"], n, nope, rope, True)
    else:
        yield theirs + "q_a_proj.weight", sd[ours + "linear_q_down_proj.weight"]
        yield theirs + "q_a_layernorm.weight", sd[ours + "q_layernorm.weight"]
        yield theirs + "q_b_proj.weight", _permute_rope_rows(sd[ours + "linear_q_up_proj.weight"], n, nope, rope, True)
    yield theirs + "kv_a_proj_with_mqa.weight", _permute_rope_rows(sd[ours + "linear_kv_down_proj.weight"], 1,
                                                                   m.kv_lora_rank, rope, True)
    yield theirs + "kv_a_layernorm.weight", sd[ours + "kv_layernorm.weight"]
    yield theirs + "kv_b_proj.weight", sd[ours + "linear_kv_up_proj.weight"]
    yield theirs + "o_proj.weight", sd[ours + "linear_proj.weight"]


def mla_from_hf(m, take, ours: str, theirs: str) -> dict:
    """megaflow tensors of one layer's attention; take(name) fetches (and marks used) an HF tensor."""
    n, nope, rope = m.num_attention_heads, m.qk_head_dim, m.qk_pos_emb_head_dim
    out = {}
    if m.q_lora_rank is None:
        out[ours + "linear_q_proj.weight"] = _permute_rope_rows(take(theirs + "q_proj.weight"), n, nope, rope, False)
    else:
        out[ours + "linear_q_down_proj.weight"] = take(theirs + "q_a_proj.weight")
        out[ours + "q_layernorm.weight"] = take(theirs + "q_a_layernorm.weight")
        out[ours + "linear_q_up_proj.weight"] = _permute_rope_rows(take(theirs + "q_b_proj.weight"), n, nope, rope,
                                                                   False)
    out[ours + "linear_kv_down_proj.weight"] = _permute_rope_rows(take(theirs + "kv_a_proj_with_mqa.weight"), 1,
                                                                  m.kv_lora_rank, rope, False)
    out[ours + "kv_layernorm.weight"] = take(theirs + "kv_a_layernorm.weight")
    out[ours + "linear_kv_up_proj.weight"] = take(theirs + "kv_b_proj.weight")
    out[ours + "linear_proj.weight"] = take(theirs + "o_proj.weight")
    return out


def mtp_layers_in(hf_sd: dict, num_layers: int) -> int:
    """How many multi-token-prediction modules a DeepSeek-V3 state dict holds after its num_layers."""
    k = 0
    while f"model.layers.{num_layers + k}.eh_proj.weight" in hf_sd:
        k += 1
    return k


# An MTP module's own weights (its decoder layer aside): megaflow's name, DeepSeek's.
_MTP_OWN = (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("final_norm", "shared_head.norm"))


def mtp_pairs_to_hf(sd: dict, ours: str, theirs: str, vocab: int, tied: bool):
    """(HF name, tensor) of an MTP module's own weights (its decoder layer aside), with the copies of the
    embedding and output layer DeepSeek's files keep beside each module."""
    for mine, hf in _MTP_OWN:
        yield theirs + hf + ".weight", sd[ours + mine + ".weight"]
    yield theirs + "embed_tokens.weight", sd["word_embeddings.weight"][:vocab]
    yield theirs + "shared_head.head.weight", sd["word_embeddings.weight" if tied else "output_layer.weight"][:vocab]


def mtp_from_hf(take, ours: str, theirs: str, main: dict, tied: bool) -> dict:
    """An MTP module's own megaflow tensors; its embedding and head copies must equal the model's, which
    megaflow's MTP modules use (main: the tensors imported so far, vocabulary not yet padded)."""
    from megaflow.checkpoint.hf import ConversionError
    out = {ours + mine + ".weight": take(theirs + hf + ".weight") for mine, hf in _MTP_OWN}
    for hf, mine in (("embed_tokens", "word_embeddings"), ("shared_head.head", "word_embeddings" if tied
                                                            else "output_layer")):
        if not torch.equal(take(theirs + hf + ".weight"), main[mine + ".weight"]):
            raise ConversionError(f"{theirs}{hf}.weight differs from the model's {mine}: megaflow's "
                                  "multi-token-prediction modules share the model's embedding and output layer")
    return out
