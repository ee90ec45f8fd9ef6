"""Causal self-attention with grouped-query heads: reference, Triton autograd Function, dispatch.

Shapes: q_bnsd [batch, heads, seq, head_dim]; k_bnsd, v_bnsd [batch, kv_heads, seq, head_dim]
with heads a multiple of kv_heads (query head i uses kv head i // (heads // kv_heads), as
repeat_interleave and SDPA's enable_gqa do). Returns [batch, heads, seq, head_dim].

Backends: "torch" (F.scaled_dot_product_attention), "triton" (attention_triton.py: flash attention,
fp16/bf16/fp32, head_dim <= 128, dropout supported), "flash-attn" (the flash_attn package, CUDA with
fp16/bf16 only, imported when first used), "auto" (Triton on CUDA tensors, torch otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.kernels.dispatch import at_least_fp32, resolve_backend


def attention_reference(q_bnsd, k_bnsd, v_bnsd, causal=True, softmax_scale=None):
    """Plain torch, materialised probabilities, computed in (at least) fp32: the numerical reference."""
    groups = q_bnsd.shape[1] // k_bnsd.shape[1]
    k = at_least_fp32(k_bnsd).repeat_interleave(groups, dim=1)
    v = at_least_fp32(v_bnsd).repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else q_bnsd.shape[-1] ** -0.5
    scores = (at_least_fp32(q_bnsd) @ k.transpose(-1, -2)) * scale
    if causal:
        s = q_bnsd.shape[2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q_bnsd.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q_bnsd.dtype)


def _last_dim_contiguous(t):
    """The kernels take any batch/head/sequence strides but need unit stride along head_dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonAttentionFunction(torch.autograd.Function):
    """Flash attention: saves q, k, v, o and the fp32 logsumexp (not the probabilities, which the
    backward recomputes) and the dropout seed (the backward regenerates the same mask)."""

    @staticmethod
    def forward(ctx, q_bnsd, k_bnsd, v_bnsd, causal, softmax_scale, dropout_p):
        from megaflow.kernels import attention_triton as kt
        kt.check_inputs(q_bnsd, k_bnsd, v_bnsd, causal, dropout_p)
        q_bnsd, k_bnsd, v_bnsd = (_last_dim_contiguous(t) for t in (q_bnsd, k_bnsd, v_bnsd))
        scale = float(softmax_scale if softmax_scale is not None else q_bnsd.shape[-1] ** -0.5)
        seed = kt.draw_dropout_seed(q_bnsd.device, dropout_p)
        o_bnsd, lse_bns = kt.flash_attn_forward(q_bnsd, k_bnsd, v_bnsd, causal, scale, dropout_p, seed)
        ctx.save_for_backward(q_bnsd, k_bnsd, v_bnsd, o_bnsd, lse_bns, seed)
        ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
        return o_bnsd

    @staticmethod
    def backward(ctx, do_bnsd):
        from megaflow.kernels import attention_triton as kt
        q_bnsd, k_bnsd, v_bnsd, o_bnsd, lse_bns, seed = ctx.saved_tensors
        dq, dk, dv = kt.flash_attn_backward(_last_dim_contiguous(do_bnsd), q_bnsd, k_bnsd, v_bnsd, o_bnsd,
                                            lse_bns, ctx.causal, ctx.scale, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None


def _flash_attn_package(q_bnsd, k_bnsd, v_bnsd, causal, dropout_p, softmax_scale):
    """Tri Dao's flash-attn (imported here, never at module import: it does not install on CPU)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise RuntimeError(f"attention backend 'flash-attn' requested but flash_attn cannot be imported: {e}") from e
    if not q_bnsd.is_cuda or q_bnsd.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("attention backend 'flash-attn' needs CUDA fp16/bf16 tensors "
                         f"(got {q_bnsd.dtype} on {q_bnsd.device}); use 'triton' or 'torch'")
    # flash_attn_func takes [b, s, heads, d] and handles grouped kv heads itself.
    o_bsnd = flash_attn_func(q_bnsd.transpose(1, 2), k_bnsd.transpose(1, 2), v_bnsd.transpose(1, 2),
                             dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)
    return o_bsnd.transpose(1, 2)


def attention(q_bnsd, k_bnsd, v_bnsd, causal=True, dropout_p=0.0, softmax_scale=None, backend="auto"):
    """The model's single attention entry point. dropout_p applies to the attention probabilities
    (pass 0 at evaluation); causal attention needs as many queries as keys."""
    backend = resolve_backend(backend, q_bnsd, optional_package="flash_attn")
    if backend == "torch":
        return F.scaled_dot_product_attention(
            q_bnsd, k_bnsd, v_bnsd, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale,
            enable_gqa=k_bnsd.shape[1] != q_bnsd.shape[1])
    if backend == "triton":
        return TritonAttentionFunction.apply(q_bnsd, k_bnsd, v_bnsd, causal, softmax_scale, float(dropout_p))
    if backend == "flash-attn":
        return _flash_attn_package(q_bnsd, k_bnsd, v_bnsd, causal, dropout_p, softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r} (auto, torch, triton, flash-attn)")
