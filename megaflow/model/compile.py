"""--compile: torch.compile applied to each transformer block on its own (regional compilation).

Compiling blocks rather than the whole model keeps what lies between them eager — the pipeline
schedule, activation recompute around whole layers, the gradient-sync hooks, the embedding and the
loss — and compiles one graph that every block of the same shape reuses (torchtitan does the same).
Each block's forward is compiled in place (no wrapper module), so parameter names, checkpoints and
hooks are unchanged, and the hooks on a block run outside its graph: ZeRO-3's per-layer gathers and
frees (optim/zero3.py) wait on collective handles, which dynamo cannot trace. Full activation
recompute moves inside the compiled region: a recompute triggered from backward would run eagerly
(dynamo does not run there) and save other tensors than the compiled forward did, so each recomputed
block is compiled together with its checkpoint (torchtitan's order: checkpoint, then compile), one
checkpoint per block; with --recompute-method uniform and --recompute-num-layers k > 1 that keeps
the input of every block instead of every k-th. Inside a block dynamo traces the tensor-parallel
layers' autograd functions and their collectives (parallel/mappings.py) and selective recompute
(torch.utils.checkpoint); tests count the graph breaks (none) under TP/SP, DP/ZeRO and both pipeline
schedules. Dropout under tensor parallelism switches RNG streams (parallel/random.py), which dynamo
cannot trace: with dropout > 0 and TP > 1 a block breaks its graph there.

Compilation happens at a block's first call (its backward graph at its first backward), i.e. inside
the first training iteration; compile_seconds() reads the time dynamo and inductor spent, which the
trainer logs after that iteration.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from megaflow.config import ConfigError
from megaflow.parallel import random


def _uses_triton_interpreter(cfg) -> bool:
    m = cfg.model
    named = "triton" in (m.attention_backend, m.norm_backend)
    return named and os.environ.get("TRITON_INTERPRET") == "1"


def compile_blocks(model, cfg) -> int:
    """Compile every transformer block of every chunk of `model` in place; returns how many."""
    if _uses_triton_interpreter(cfg):
        # The interpreter runs kernels as numpy code, which dynamo cannot trace; on a GPU dynamo
        # captures real Triton launches into the block's graph.
        raise ConfigError("--compile with --attention-backend/--norm-backend triton needs a GPU: the Triton "
                          "interpreter (TRITON_INTERPRET=1, CPU) cannot be compiled; use the torch backends on CPU")
    # A block's only side effect is the RoPE table it caches on first use (gpt.py): with full
    # recompute that happens inside the checkpoint, and replaying it in backward is not needed.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    n = 0
    for chunk in chunks:
        recomputed = _recomputed_layers(chunk)
        chunk.recompute = False  # done by the compiled blocks themselves from here on
        for i, layer in enumerate(chunk.layers):
            forward = _checkpointed(layer.forward, layer) if i in recomputed else layer.forward
            # The forward only, not the module call: hooks on the block itself (ZeRO-3's gathers and
            # frees, optim/zero3.py) stay outside the graph. Static shapes: every micro-batch has the
            # same shape, and one graph serves every layer.
            layer.forward = torch.compile(forward, dynamic=False)
            n += 1
    return n


def _recomputed_layers(chunk) -> set[int]:
    """Indices of the blocks full recompute checkpoints (GPTModel._run_layers' rule)."""
    if not getattr(chunk, "recompute", False):
        return set()
    if chunk.recompute_method == "uniform":
        return set(range(len(chunk.layers)))
    return set(range(min(chunk.recompute_num_layers, len(chunk.layers))))


def _checkpointed(forward, layer):
    def checkpointed_forward(x_sbh, inference_cache=None, context=None):
        if inference_cache is None and layer.training and torch.is_grad_enabled():
            return random.checkpoint(forward, x_sbh, None, context)
        return forward(x_sbh, inference_cache, context)
    return checkpointed_forward


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process: forward graphs (dynamo, AOT autograd, inductor)
    and backward graphs (compiled at their first backward)."""
    from torch._dynamo.utils import calculate_time_spent
    spent = calculate_time_spent()
    return spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0)
