"""Model FLOPs per training iteration, Megatron-style (see docs/training.md for the derivation).

Counted: every GEMM (2 FLOPs per multiply-add), attention scores and values with causal masking
counted at half, the logits GEMM on the padded vocabulary; backward = 2× forward, so a step is 3×
forward. MoE layers count their active parameters only (router, top-k experts, shared expert).
Multi-token prediction modules count like one more layer each, plus their projection and logits.
Not counted: norms, activations, softmax, optimizer, and activation recompute (MFU counts the model's
work, not the engine's).
"""
from __future__ import annotations

from megaflow.config import Config
from megaflow.parallel.device import device_name

# Dense bf16 peaks (TFLOP/s) for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def forward_flops_per_token(cfg: Config) -> float:
    m = cfg.model
    h, ffn = m.hidden_size, m.ffn_hidden_size
    mlp = _mlp_flops(h, ffn, m.swiglu)
    logits = 2 * h * cfg.padded_vocab_size
    moe_layers = _moe_layer_count(cfg)
    dense = m.num_layers * attention_flops_per_token(cfg) + (m.num_layers - moe_layers) * mlp + logits
    total = dense + (moe_layers * moe_flops_per_token(cfg) if moe_layers else 0)
    if m.mtp_num_layers:  # each module: its 2h -> h projection, a layer like the last one, the logits
        from megaflow.model.spec import is_moe_layer
        last = moe_flops_per_token(cfg) if is_moe_layer(cfg, m.num_layers - 1) else mlp
        total += m.mtp_num_layers * (2 * 2 * h * h + attention_flops_per_token(cfg) + last + logits)
    return total


def attention_flops_per_token(cfg: Config) -> float:
    """One layer's attention: projections, then QK^T and PV over the causal half of the positions.
    Multi-latent attention counts its down- and up-projections (model/mla.py) and its own head widths."""
    m = cfg.model
    h, s, n = m.hidden_size, cfg.data.seq_length, m.num_attention_heads
    if m.multi_latent_attention:
        qk, v, r = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim, m.kv_lora_rank
        q_proj = 2 * h * n * qk if m.q_lora_rank is None else 2 * h * m.q_lora_rank + 2 * m.q_lora_rank * n * qk
        kv_proj = 2 * h * (r + m.qk_pos_emb_head_dim) + 2 * r * n * (m.qk_head_dim + v)
        return q_proj + kv_proj + 2 * s * n * (qk + v) * 0.5 + 2 * n * v * h
    d = m.kv_channels or h // n
    q, kv = n * d, m.num_query_groups * d
    return 2 * h * (q + 2 * kv) + 2 * 2 * s * q * 0.5 + 2 * q * h


def _mlp_flops(h: int, ffn: int, swiglu: bool) -> float:
    return 2 * h * ffn * (2 if swiglu else 1) + 2 * ffn * h


def _moe_layer_count(cfg: Config) -> int:
    from megaflow.config import parse_layer_freq
    e = cfg.moe
    return 0 if e.num_experts is None else sum(parse_layer_freq(e.moe_layer_freq, cfg.model.num_layers))


def moe_flops_per_token(cfg: Config) -> float:
    """An MoE layer's forward per token, from its *active* parameters: the router, top-k experts, the
    shared expert and its gate (dropped tokens still counted: the model's work as configured)."""
    e, m = cfg.moe, cfg.model
    h = m.hidden_size
    out = 2 * h * e.num_experts + e.moe_router_topk * _mlp_flops(h, e.moe_ffn_hidden_size or m.ffn_hidden_size,
                                                                 m.swiglu)
    if e.moe_shared_expert_intermediate_size:
        out += _mlp_flops(h, e.moe_shared_expert_intermediate_size, m.swiglu)
        out += 2 * h if e.moe_shared_expert_gate else 0
    return out


def flops_per_iteration(cfg: Config) -> float:
    tokens = cfg.training.global_batch_size * cfg.data.seq_length
    return 3 * forward_flops_per_token(cfg) * tokens


def device_peak_tflops(cfg: Config, device) -> float | None:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops
    if device.type == "cuda":
        name = device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None
