"""Parameters per rank, counted from the configuration alone (no model is built).

`stage_parameters(cfg, pp_rank, v)` lists, for model chunk v of pipeline stage pp_rank, every trainable
parameter one tensor-parallel rank holds, in the order GPTModel registers them (the order the gradient
buffers are laid out in), with the attributes the buffers care about. It mirrors model/gpt.py and
layers/: the dry run cross-checks it against a model built on the meta device, and the tests against
real models, name by name.

Symbols: h hidden, nq/ng attention heads/query groups, d head dim, f ffn, V padded vocabulary, tp;
multi-latent attention: r the KV latent's rank, qk the query/key head width.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaflow.config import Config, virtual_pipeline_size


@dataclass(frozen=True)
class Param:
    name: str                      # the local name in the chunk (model.named_parameters())
    numel: int                     # elements on one TP rank
    shared_embedding: bool = False  # the tied embedding, split between the first and last stage
    expert: bool = False           # an MoE expert's weight: own buffer, reduced/sharded over expert-DP
    trainable: bool = True         # False: frozen (the MoE expert bias), in no gradient buffer
    replicated: bool = False       # whole on every TP rank though not a norm or bias (MLA's down-projections)


def head_dim(cfg: Config) -> int:
    m = cfg.model
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def stage_layer_numbers(cfg: Config, pp_rank: int, v: int = 0) -> list[int]:
    from megaflow.model.gpt import stage_layer_numbers as layers_of  # pure function of the config
    return layers_of(cfg, pp_rank, cfg.parallel.pipeline_model_parallel_size, v)


def chunk_flags(cfg: Config, pp_rank: int, v: int) -> tuple[bool, bool]:
    """(pre_process, post_process) of chunk v on stage pp_rank, as model/__init__.build_model sets them."""
    pp, vs = cfg.parallel.pipeline_model_parallel_size, virtual_pipeline_size(cfg)
    return pp_rank == 0 and v == 0, pp_rank == pp - 1 and v == vs - 1


def _norm(prefix: str, cfg: Config) -> list[Param]:
    h = cfg.model.hidden_size
    out = [Param(prefix + ".weight", h)]
    if cfg.model.normalization == "LayerNorm":
        out.append(Param(prefix + ".bias", h))
    return out


def moe_parameters(cfg: Config, prefix: str) -> list[Param]:
    """An MoE layer's parameters on rank (TP 0, EP 0), registration order (layers/moe/moe_layer.py)."""
    e, m, p = cfg.moe, cfg.model, cfg.parallel
    h, f, tp = m.hidden_size, e.moe_ffn_hidden_size or m.ffn_hidden_size, p.tensor_model_parallel_size
    etp, ep = p.expert_tensor_parallel_size or tp, p.expert_model_parallel_size
    out = [Param(prefix + "router.weight", e.num_experts * h)]
    if e.moe_router_enable_expert_bias:
        out.append(Param(prefix + "router.expert_bias", e.num_experts, trainable=False))
    fc1 = f * (2 if m.swiglu else 1)
    for i in range(e.num_experts // ep):
        q = f"{prefix}experts.local_experts.{i}."
        out += [Param(q + "linear_fc1.weight", fc1 // etp * h, expert=True),
                Param(q + "linear_fc2.weight", h * (f // etp), expert=True)]
    if e.moe_shared_expert_intermediate_size:
        fs, q = e.moe_shared_expert_intermediate_size, prefix + "shared_experts."
        if e.moe_shared_expert_gate:
            out.append(Param(q + "gate_weight", h))
        out += _mlp(cfg, q, fs)
    return out


def _mlp(cfg: Config, prefix: str, f: int) -> list[Param]:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, fc1 = m.hidden_size, f * (2 if m.swiglu else 1)
    out = [Param(prefix + "linear_fc1.weight", fc1 // tp * h)]
    if m.add_bias_linear:
        out.append(Param(prefix + "linear_fc1.bias", fc1 // tp))
    out.append(Param(prefix + "linear_fc2.weight", h * (f // tp)))
    if m.add_bias_linear:
        out.append(Param(prefix + "linear_fc2.bias", h))
    return out


def _mla_parameters(cfg: Config, prefix: str) -> list[Param]:
    """Multi-latent attention (model/mla.py): replicated down-projections and latent norms (RMSNorm),
    column-parallel up-projections, the row-parallel output projection."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, n, r, qk = m.hidden_size, m.num_attention_heads, m.kv_lora_rank, m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        out = [Param(prefix + "linear_q_proj.weight", n * qk // tp * h)]
    else:
        out = [Param(prefix + "linear_q_down_proj.weight", m.q_lora_rank * h, replicated=True),
               Param(prefix + "q_layernorm.weight", m.q_lora_rank),
               Param(prefix + "linear_q_up_proj.weight", n * qk // tp * m.q_lora_rank)]
    out += [Param(prefix + "linear_kv_down_proj.weight", (r + m.qk_pos_emb_head_dim) * h, replicated=True),
            Param(prefix + "kv_layernorm.weight", r),
            Param(prefix + "linear_kv_up_proj.weight", n * (m.qk_head_dim + m.v_head_dim) // tp * r),
            Param(prefix + "linear_proj.weight", h * (n * m.v_head_dim // tp))]
    if m.add_bias_linear:
        out.append(Param(prefix + "linear_proj.bias", h))
    return out


def is_moe_layer(cfg: Config, number) -> bool:
    from megaflow.config import parse_layer_freq
    n = cfg.model.num_layers
    return number is not None and cfg.moe.num_experts is not None and \
        parse_layer_freq(cfg.moe.moe_layer_freq, n)[min(number, n - 1)] == 1   # MTP layers: the last one's


def layer_parameters(cfg: Config, index: int, number: int | None = None) -> list[Param]:
    """One transformer layer's parameters on a TP rank; `index` is its position in the chunk, `number`
    its global layer number (which decides whether its MLP is an MoE layer)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, d, f = m.hidden_size, head_dim(cfg), m.ffn_hidden_size
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    bias = m.add_bias_linear
    p = f"layers.{index}."
    out = _norm(p + "input_norm", cfg)
    if m.multi_latent_attention:
        out += _mla_parameters(cfg, p + "self_attention.")
        out += _norm(p + "pre_mlp_norm", cfg)
        return out + (moe_parameters(cfg, p + "mlp.") if is_moe_layer(cfg, number) else _mlp(cfg, p + "mlp.", f))
    out.append(Param(p + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h))
    if bias or m.add_qkv_bias:
        out.append(Param(p + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp))
    out.append(Param(p + "self_attention.linear_proj.weight", h * (q // tp)))
    if bias:
        out.append(Param(p + "self_attention.linear_proj.bias", h))
    if m.qk_layernorm:
        for name in ("q_layernorm", "k_layernorm"):
            out += [Param(p + f"self_attention.{name}.{kind}", d)
                    for kind in (("weight", "bias") if m.normalization == "LayerNorm" else ("weight",))]
    out += _norm(p + "pre_mlp_norm", cfg)
    return out + (moe_parameters(cfg, p + "mlp.") if is_moe_layer(cfg, number) else _mlp(cfg, p + "mlp.", f))


def stage_parameters(cfg: Config, pp_rank: int, v: int = 0) -> list[Param]:
    """Chunk v of stage pp_rank, registration order (embeddings, layers, final norm, output layer)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, vocab = m.hidden_size, cfg.padded_vocab_size
    if vocab is None:
        raise ValueError("padded_vocab_size is unknown: call config.set_vocab_size first")
    pre, post = chunk_flags(cfg, pp_rank, v)
    tied = not m.untie_embeddings_and_output_weights
    out = []
    if pre:
        out.append(Param("word_embeddings.weight", vocab // tp * h,
                         shared_embedding=(tied or bool(m.mtp_num_layers)) and not post))
        if m.position_embedding_type == "learned_absolute":
            out.append(Param("position_embeddings.weight", m.max_position_embeddings * h))
    for i, number in enumerate(stage_layer_numbers(cfg, pp_rank, v)):
        out += layer_parameters(cfg, i, number)
    if post:
        out += _norm("final_norm", cfg)
        if not (tied and pre):
            out.append(Param("output_layer.weight", vocab // tp * h, shared_embedding=tied))
        if m.mtp_num_layers:
            out += mtp_parameters(cfg, pre)
    return out


def mtp_parameters(cfg: Config, pre: bool) -> list[Param]:
    """Multi-token prediction (model/mtp.py) on the last stage: an embedding copy when the stage has
    none (untied, PP > 1), then per module two norms, the replicated 2h -> h projection, a transformer
    layer like the model's last one, its final norm."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h = m.hidden_size
    out = []
    if not pre and m.untie_embeddings_and_output_weights:
        out.append(Param("mtp_embeddings.weight", cfg.padded_vocab_size // tp * h, shared_embedding=True))
    for k in range(m.mtp_num_layers):
        p = f"mtp.layers.{k}."
        out += _norm(p + "enorm", cfg) + _norm(p + "hnorm", cfg)
        out.append(Param(p + "eh_proj.weight", 2 * h * h, replicated=True))
        out += [Param(p + "layer." + q.name[len("layers.0."):], q.numel, q.shared_embedding, q.expert, q.trainable,
                      q.replicated) for q in layer_parameters(cfg, 0, m.num_layers + k)]
        out += _norm(p + "final_norm", cfg)
    return out


def rank_parameters(cfg: Config, pp_rank: int) -> list[list[Param]]:
    """Every model chunk of a pipeline stage (one list per chunk)."""
    return [stage_parameters(cfg, pp_rank, v) for v in range(virtual_pipeline_size(cfg))]


def total_parameters(cfg: Config, active: bool = False) -> int:
    """Distinct trainable parameters of the whole model (the tied embedding once, TP shards and EP ranks'
    experts summed). active=True: those one token uses (top-k of the routed experts, as MFU counts)."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    etp, ep = par.expert_tensor_parallel_size or tp, par.expert_model_parallel_size
    share = cfg.moe.moe_router_topk / cfg.moe.num_experts if cfg.moe.num_experts else 1.0
    total = 0.0
    for rank in range(pp):
        for chunk in rank_parameters(cfg, rank):
            for p in chunk:
                if (p.name in ("output_layer.weight", "mtp_embeddings.weight") and p.shared_embedding) \
                        or not p.trainable:
                    continue  # the last stage's copies of the embedding; the frozen expert bias
                if p.expert:
                    total += p.numel * etp * ep * (share if active else 1.0)
                    continue
                replicated = p.replicated or p.name.endswith(("norm.weight", "norm.bias", "proj.bias", "fc2.bias",
                                                              "router.weight", "gate_weight")) \
                    or p.name == "position_embeddings.weight"
                total += p.numel * (1 if replicated else tp)
    return int(round(total))
