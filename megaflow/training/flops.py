"""Model FLOPs per training iteration, Megatron-style (see docs/training.md for the derivation).

Counted: every GEMM (2 FLOPs per multiply-add), attention scores and values with causal masking
counted at half, the logits GEMM on the padded vocabulary; backward = 2× forward, so a step is 3×
forward. Not counted: norms, activations, softmax, optimizer, and activation recompute (MFU counts
the model's work, not the engine's).
"""
from __future__ import annotations

from megaflow.config import Config
from megaflow.parallel.device import device_name

# Dense bf16 peaks (TFLOP/s) for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def forward_flops_per_token(cfg: Config) -> float:
    m = cfg.model
    h, s, ffn = m.hidden_size, cfg.data.seq_length, m.ffn_hidden_size
    d = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    qkv_proj = 2 * h * (q + 2 * kv)
    attention = 2 * 2 * s * q * 0.5           # QK^T and PV, causal: half the positions
    out_proj = 2 * q * h
    mlp = 2 * h * ffn * (2 if m.swiglu else 1) + 2 * ffn * h
    logits = 2 * h * cfg.padded_vocab_size
    return m.num_layers * (qkv_proj + attention + out_proj + mlp) + logits


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
