"""megaflow ⇄ Hugging Face: parameter names, layouts and config.json (FORMATS.md §5).

Works on *full* state dicts keyed by megaflow's global names (checkpoint/full_state.py) and on HF
state dicts as safetensors holds them; no parallel state, no files.

    Llama style -> LlamaForCausalLM          GPT-2 style -> GPT2LMHeadModel
    (Mixtral: hf_moe.py; Qwen2, Qwen3, Qwen3-MoE: hf_qwen.py; same table plus their layers;
     DeepSeek-V3: hf_deepseek.py, the same table with multi-latent attention)
    word_embeddings      model.embed_tokens      transformer.wte
    position_embeddings  -                       transformer.wpe
    layers.i.input_norm  .input_layernorm        .ln_1
    linear_qkv [Q;K;V]   .q_proj/.k_proj/.v_proj .attn.c_attn (one fused matrix, transposed)
    linear_proj          .o_proj                 .attn.c_proj (transposed)
    pre_mlp_norm         .post_attention_layernorm  .ln_2
    linear_fc1 [gate;up] .gate_proj/.up_proj     .mlp.c_fc (transposed)
    linear_fc2           .down_proj              .mlp.c_proj (transposed)
    final_norm           model.norm              transformer.ln_f
    output_layer         lm_head (untied only)   lm_head (untied only)

No Q/K permutation: megaflow's RoPE rotates halves, as HF Llama does (kernels/rope.py); GPT-2's Conv1D
stores weights as [in, out], hence the transposes. The HF side never carries vocabulary padding.
"""
from __future__ import annotations

import torch

from megaflow.checkpoint import hf_deepseek, hf_moe, hf_qwen
from megaflow.checkpoint.full_state import pad_rows
from megaflow.config import Config, config_from_kwargs, set_vocab_size
from megaflow.errors import UserError
from megaflow.model.spec import is_moe_layer

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
# Llama-shaped: their weights map by one table (Qwen adds QK-norm and Q/K/V biases, MoE its experts).
LLAMA_FAMILY = (LLAMA, hf_moe.MIXTRAL, hf_qwen.QWEN2, hf_qwen.QWEN3, hf_qwen.QWEN3_MOE, hf_deepseek.DEEPSEEK_V3)
# Buffers some HF checkpoints carry that are not weights (causal masks, RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class ConversionError(UserError, ValueError):
    """The model cannot be expressed in the other format; the message says which feature."""
    kind = "conversion error"


def _head_dim(m) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def hf_architecture(cfg: Config) -> str:
    """Which HF class represents this model; decided by its features, not by --model-style."""
    m = cfg.model
    if m.multi_latent_attention:
        problem = hf_deepseek.architecture_problem(cfg)
        if problem:
            raise ConversionError(f"no Hugging Face architecture for this multi-latent-attention model: {problem}")
        return hf_deepseek.DEEPSEEK_V3
    if m.qk_layernorm or m.add_qkv_bias:  # Qwen's attention
        if not (m.normalization == "RMSNorm" and m.position_embedding_type == "rope" and m.swiglu):
            raise ConversionError("no Hugging Face architecture for QK-norm or Q/K/V-only biases without "
                                  "RMSNorm, rope and swiglu (Qwen2/Qwen3 are Llama-shaped)")
        arch, problem = hf_qwen.architecture(cfg)
        if problem:
            raise ConversionError(f"no Hugging Face architecture for this model: {problem}")
        return arch
    if cfg.moe.num_experts is not None:  # MoE: Mixtral, when the model is a Llama with Mixtral's routing
        problem = None if (m.normalization == "RMSNorm" and m.position_embedding_type == "rope" and m.swiglu) \
            else "Mixtral needs RMSNorm, rope and swiglu"
        problem = problem or hf_moe.mixtral_problem(cfg)
        if problem:
            raise ConversionError(f"no Hugging Face architecture for this MoE model: {problem}")
        return hf_moe.MIXTRAL
    if m.normalization == "RMSNorm" and m.position_embedding_type == "rope" and m.swiglu:
        return LLAMA
    if m.normalization == "LayerNorm" and m.position_embedding_type == "learned_absolute" and not m.swiglu:
        if not m.add_bias_linear:
            raise ConversionError("GPT2LMHeadModel has biases in every linear layer: a GPT-2-style model "
                                  "trained with --disable-bias-linear cannot be exported")
        if m.num_query_groups != m.num_attention_heads or _head_dim(m) * m.num_attention_heads != m.hidden_size:
            raise ConversionError("GPT2LMHeadModel has no grouped-query attention and head_dim = "
                                  "hidden/heads: drop --group-query-attention/--kv-channels")
        return GPT2
    raise ConversionError(f"no Hugging Face architecture for normalization={m.normalization}, "
                          f"position_embedding_type={m.position_embedding_type}, swiglu={m.swiglu}: "
                          "Llama needs RMSNorm+rope+swiglu, GPT-2 needs LayerNorm+learned_absolute+GeLU")


# ---------------------------------------------------------------------------------------------
# megaflow -> HF

def to_hf_config(cfg: Config, dtype: torch.dtype = torch.float32, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, keep_mtp: bool = False) -> dict:
    """config.json for the exported folder (written without importing transformers)."""
    m, arch = cfg.model, hf_architecture(cfg)
    dtype_name = str(dtype).replace("torch.", "")
    common = {"architectures": [arch], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
              "initializer_range": m.init_method_std, "bos_token_id": bos_token_id,
              "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "use_cache": True,
              # transformers 5 reads "dtype", older readers (vLLM's pinned transformers) "torch_dtype".
              "dtype": dtype_name, "torch_dtype": dtype_name}
    if arch == hf_deepseek.DEEPSEEK_V3:
        return hf_deepseek.to_deepseek_config(cfg, common, keep_mtp)
    if arch != LLAMA and arch in LLAMA_FAMILY:
        llama = to_hf_config(_llama_like(cfg), dtype, bos_token_id, eos_token_id, pad_token_id)
        return hf_moe.to_mixtral_config(cfg, llama) if arch == hf_moe.MIXTRAL else hf_qwen.to_qwen_config(cfg, arch, llama)
    if arch == LLAMA:
        return {"model_type": "llama", "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
                "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
                "num_key_value_heads": m.num_query_groups, "head_dim": _head_dim(m),
                "hidden_act": "silu", "rms_norm_eps": m.norm_epsilon,
                "max_position_embeddings": m.max_position_embeddings,
                # Both spellings: rope_parameters (transformers >= 5) and rope_theta (earlier).
                "rope_theta": float(m.rotary_base),
                "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
                "attention_bias": m.add_bias_linear, "mlp_bias": m.add_bias_linear,
                "attention_dropout": m.attention_dropout, **common}
    return {"model_type": "gpt2", "n_embd": m.hidden_size, "n_layer": m.num_layers,
            "n_head": m.num_attention_heads, "n_inner": m.ffn_hidden_size,
            "n_positions": m.max_position_embeddings, "n_ctx": m.max_position_embeddings,
            "activation_function": "gelu_new",  # tanh-approximate GeLU, as megaflow's MLP
            "layer_norm_epsilon": m.norm_epsilon, "resid_pdrop": m.hidden_dropout,
            "embd_pdrop": m.hidden_dropout, "attn_pdrop": m.attention_dropout, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, **common}


def _llama_like(cfg: Config) -> Config:
    """The same model as a Llama: no MoE layers, no QK-norm or Q/K/V-only biases (its common config)."""
    import copy
    out = copy.deepcopy(cfg)
    out.moe.num_experts = None
    out.model.qk_layernorm = out.model.add_qkv_bias = False
    return out


def to_hf_state_dict(cfg: Config, sd: dict, dtype: torch.dtype | None = None, keep_mtp: bool = False) -> dict:
    """HF tensors (contiguous, vocabulary padding removed) from a full megaflow state dict; keep_mtp
    writes the multi-token-prediction layers in DeepSeek-V3's layout (hf_deepseek.py)."""
    m, arch, vocab = cfg.model, hf_architecture(cfg), cfg.vocab_size
    if keep_mtp and m.mtp_num_layers and arch != hf_deepseek.DEEPSEEK_V3:
        raise ConversionError(f"{arch} has no layout for multi-token-prediction layers (DeepSeek-V3 has)")
    d = _head_dim(m)
    q_size, kv_size = m.num_attention_heads * d, m.num_query_groups * d
    out = {}
    for name, t in _hf_pairs_to(cfg, sd, arch, vocab, q_size, kv_size, keep_mtp):
        t = t.detach()
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def _layer_pairs_to_hf(cfg, sd, arch, i, p, h, q_size, kv_size):
    """(HF name, tensor) of Llama-family decoder layer i: ours under p, theirs under h."""
    m = cfg.model
    kinds = ("weight", "bias") if m.add_bias_linear else ("weight",)
    qkv_kinds = ("weight", "bias") if m.add_bias_linear or m.add_qkv_bias else ("weight",)
    yield h + "input_layernorm.weight", sd[p + "input_norm.weight"]
    yield h + "post_attention_layernorm.weight", sd[p + "pre_mlp_norm.weight"]
    if m.multi_latent_attention:
        yield from hf_deepseek.mla_pairs_to_hf(m, sd, p + "self_attention.", h + "self_attn.")
    else:
        yield from _attention_pairs_to_hf(sd, p + "self_attention.", h + "self_attn.", qkv_kinds, kinds,
                                          q_size, kv_size)
    if m.qk_layernorm:
        yield h + "self_attn.q_norm.weight", sd[p + "self_attention.q_layernorm.weight"]
        yield h + "self_attn.k_norm.weight", sd[p + "self_attention.k_layernorm.weight"]
    if is_moe_layer(cfg, i):
        yield from hf_moe.moe_pairs_to_hf(cfg, arch, sd, p + "mlp.", h)
        return
    for kind in kinds:
        gate, up = sd[p + f"mlp.linear_fc1.{kind}"].chunk(2)
        yield h + f"mlp.gate_proj.{kind}", gate
        yield h + f"mlp.up_proj.{kind}", up
        yield h + f"mlp.down_proj.{kind}", sd[p + f"mlp.linear_fc2.{kind}"]


def _hf_pairs_to(cfg, sd, arch, vocab, q_size, kv_size, keep_mtp=False):
    m = cfg.model
    tied = not m.untie_embeddings_and_output_weights
    if arch in LLAMA_FAMILY:
        yield "model.embed_tokens.weight", sd["word_embeddings.weight"][:vocab]
        for i in range(m.num_layers):
            yield from _layer_pairs_to_hf(cfg, sd, arch, i, f"layers.{i}.", f"model.layers.{i}.", q_size, kv_size)
        yield "model.norm.weight", sd["final_norm.weight"]
        if not tied:
            yield "lm_head.weight", sd["output_layer.weight"][:vocab]
        for k in range((m.mtp_num_layers or 0) if keep_mtp else 0):
            ours, theirs, i = f"mtp.layers.{k}.", f"model.layers.{m.num_layers + k}.", m.num_layers + k
            yield from _layer_pairs_to_hf(cfg, sd, arch, i, ours + "layer.", theirs, q_size, kv_size)
            yield from hf_deepseek.mtp_pairs_to_hf(sd, ours, theirs, vocab, tied)
        return
    yield "transformer.wte.weight", sd["word_embeddings.weight"][:vocab]
    yield "transformer.wpe.weight", sd["position_embeddings.weight"]
    for i in range(m.num_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
            yield h + theirs + ".weight", sd[p + ours + ".weight"]
            yield h + theirs + ".bias", sd[p + ours + ".bias"]
        for ours, theirs in (("self_attention.linear_qkv", "attn.c_attn"), ("self_attention.linear_proj",
                             "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
            yield h + theirs + ".weight", sd[p + ours + ".weight"].t()   # Conv1D: [in, out]
            yield h + theirs + ".bias", sd[p + ours + ".bias"]
    yield "transformer.ln_f.weight", sd["final_norm.weight"]
    yield "transformer.ln_f.bias", sd["final_norm.bias"]
    if not tied:
        yield "lm_head.weight", sd["output_layer.weight"][:vocab]


def _attention_pairs_to_hf(sd, ours, theirs, qkv_kinds, kinds, q_size, kv_size):
    for kind in qkv_kinds:
        q, k, v = sd[ours + f"linear_qkv.{kind}"].split([q_size, kv_size, kv_size])
        yield theirs + f"q_proj.{kind}", q
        yield theirs + f"k_proj.{kind}", k
        yield theirs + f"v_proj.{kind}", v
    for kind in kinds:
        yield theirs + f"o_proj.{kind}", sd[ours + f"linear_proj.{kind}"]


# ---------------------------------------------------------------------------------------------
# HF -> megaflow

def from_hf_config(hf: dict, **overrides) -> Config:
    """A megaflow Config (TP=1, vocabulary set) for an HF config.json; overrides are Config fields."""
    arch = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    if arch == LLAMA or model_type == "llama":
        kw = _llama_fields(hf)
    elif arch == hf_moe.MIXTRAL or model_type == "mixtral":
        if hf.get("sliding_window"):
            raise ConversionError("config.json: sliding-window attention is not supported by megaflow")
        kw = dict(_llama_fields(hf), **hf_moe.from_mixtral_config(hf))
    elif model_type in hf_qwen.MODEL_TYPES.values() or arch in hf_qwen.MODEL_TYPES:
        model_type = model_type or hf_qwen.MODEL_TYPES[arch]
        kw = dict(_llama_fields(dict(hf, attention_bias=False)), **hf_qwen.from_qwen_config(hf, model_type))
    elif arch == hf_deepseek.DEEPSEEK_V3 or model_type == "deepseek_v3":
        kw = hf_deepseek.from_deepseek_config(hf)
    elif arch == GPT2 or model_type == "gpt2":
        kw = _gpt2_fields(hf)
    else:
        raise ConversionError(f"config.json: architectures={hf.get('architectures')}, model_type={model_type}: "
                              f"supported: {', '.join(LLAMA_FAMILY)} and {GPT2}")
    kw.update(hidden_dropout=0.0, attention_dropout=0.0, init_method_std=hf.get("initializer_range", 0.02),
              untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True))
    kw["seq_length"] = min(kw["max_position_embeddings"], 2048)
    kw.update(overrides)
    vocab = hf["vocab_size"]
    cfg = config_from_kwargs(**kw)
    set_vocab_size(cfg, vocab)
    return cfg


def _llama_fields(hf: dict) -> dict:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(f"config.json: RoPE scaling {rope_type!r} is not supported by megaflow")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r} (megaflow's SwiGLU uses silu)")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ConversionError("config.json: attention_bias and mlp_bias differ; megaflow has one "
                              "--disable-bias-linear switch")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"config.json: rope_theta {theta} is not an integer (--rotary-base is)")
    return dict(model_style="llama", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
                kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
                group_query_attention=kv_heads != heads, num_query_groups=kv_heads if kv_heads != heads else None,
                norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=int(theta),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                add_bias_linear=bool(hf.get("attention_bias", False)))


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ConversionError(f"config.json: activation_function {act!r} (megaflow's GPT-2 MLP uses the "
                              "tanh-approximate GeLU, gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConversionError("config.json: non-standard GPT-2 attention scaling is not supported")
    h = hf["n_embd"]
    return dict(model_style="gpt2", num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
                ffn_hidden_size=hf.get("n_inner") or 4 * h, norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                max_position_embeddings=hf.get("n_positions", 1024))


def from_hf_state_dict(cfg: Config, hf_sd: dict) -> dict:
    """A full megaflow state dict (vocabulary padded to cfg.padded_vocab_size with zero rows)."""
    m, arch = cfg.model, hf_architecture(cfg)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if arch == GPT2:  # the original OpenAI files name weights without the "transformer." prefix
        hf_sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                 for k, v in hf_sd.items()}
    if arch == hf_deepseek.DEEPSEEK_V3:  # DeepSeek's multi-token-prediction layers follow the last layer:
        last = m.num_layers + (m.mtp_num_layers or 0)    # kept as megaflow's MTP modules, or dropped
        hf_sd = {k: v for k, v in hf_sd.items()
                 if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= last)}
    tied = not m.untie_embeddings_and_output_weights
    if tied:
        hf_sd.pop("lm_head.weight", None)  # some writers store the tied copy too
    used, out = set(), {}

    def take(name):
        if name not in hf_sd:
            raise ConversionError(f"HF weights lack {name}")
        used.add(name)
        return hf_sd[name]

    if arch in LLAMA_FAMILY:
        out["word_embeddings.weight"] = take("model.embed_tokens.weight")
        for i in range(m.num_layers):
            out.update(_layer_from_hf(cfg, arch, take, i, f"layers.{i}.", f"model.layers.{i}."))
        out["final_norm.weight"] = take("model.norm.weight")
        if not tied:
            out["output_layer.weight"] = take("lm_head.weight")
        for k in range((m.mtp_num_layers or 0) if arch == hf_deepseek.DEEPSEEK_V3 else 0):
            ours, theirs, i = f"mtp.layers.{k}.", f"model.layers.{m.num_layers + k}.", m.num_layers + k
            out.update(_layer_from_hf(cfg, arch, take, i, ours + "layer.", theirs))
            out.update(hf_deepseek.mtp_from_hf(take, ours, theirs, out, tied))
    else:
        out["word_embeddings.weight"] = take("transformer.wte.weight")
        out["position_embeddings.weight"] = take("transformer.wpe.weight")
        for i in range(m.num_layers):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("input_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
                out[p + ours + ".weight"] = take(h + theirs + ".weight")
                out[p + ours + ".bias"] = take(h + theirs + ".bias")
            for ours, theirs in (("self_attention.linear_qkv", "attn.c_attn"),
                                 ("self_attention.linear_proj", "attn.c_proj"),
                                 ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
                out[p + ours + ".weight"] = take(h + theirs + ".weight").t()
                out[p + ours + ".bias"] = take(h + theirs + ".bias")
        out["final_norm.weight"] = take("transformer.ln_f.weight")
        out["final_norm.bias"] = take("transformer.ln_f.bias")
        if not tied:
            out["output_layer.weight"] = take("lm_head.weight")
    unused = sorted(set(hf_sd) - used)
    if unused:
        raise ConversionError(f"HF weights not understood by the {arch} mapping: {unused[:8]}")
    for name in ("word_embeddings.weight", "output_layer.weight"):
        if name in out:
            if out[name].shape[0] != cfg.vocab_size:
                raise ConversionError(f"{name}: {out[name].shape[0]} rows, config.json says vocab_size "
                                      f"{cfg.vocab_size}")
            out[name] = pad_rows(out[name], cfg.vocab_size, cfg.padded_vocab_size)
    return {k: v.contiguous() for k, v in out.items()}


def _layer_from_hf(cfg, arch, take, i, p, h) -> dict:
    """megaflow tensors of Llama-family decoder layer i: ours under p, theirs under h."""
    m, out = cfg.model, {}
    kinds = ("weight", "bias") if m.add_bias_linear else ("weight",)
    qkv_kinds = ("weight", "bias") if m.add_bias_linear or m.add_qkv_bias else ("weight",)
    out[p + "input_norm.weight"] = take(h + "input_layernorm.weight")
    out[p + "pre_mlp_norm.weight"] = take(h + "post_attention_layernorm.weight")
    if m.multi_latent_attention:
        out.update(hf_deepseek.mla_from_hf(m, take, p + "self_attention.", h + "self_attn."))
    else:
        for kind in qkv_kinds:
            out[p + f"self_attention.linear_qkv.{kind}"] = torch.cat([take(h + f"self_attn.{x}_proj.{kind}")
                                                                      for x in "qkv"])
        for kind in kinds:
            out[p + f"self_attention.linear_proj.{kind}"] = take(h + f"self_attn.o_proj.{kind}")
    if m.qk_layernorm:
        out[p + "self_attention.q_layernorm.weight"] = take(h + "self_attn.q_norm.weight")
        out[p + "self_attention.k_layernorm.weight"] = take(h + "self_attn.k_norm.weight")
    if is_moe_layer(cfg, i):
        out.update(hf_moe.moe_from_hf(cfg, arch, take, p + "mlp.", h))
        return out
    for kind in kinds:
        out[p + f"mlp.linear_fc1.{kind}"] = torch.cat([take(h + f"mlp.gate_proj.{kind}"),
                                                       take(h + f"mlp.up_proj.{kind}")])
        out[p + f"mlp.linear_fc2.{kind}"] = take(h + f"mlp.down_proj.{kind}")
    return out
