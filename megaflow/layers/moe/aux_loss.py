"""The aux-loss scaler: balancing losses reach backward without the pipeline schedules knowing.

`attach(out, aux)` returns `out` unchanged; in backward it passes out's gradient through and gives `aux`
the gradient `scale` — the factor the schedule applies to the language-model loss (loss scale /
micro-batches; training/step.py sets it with set_scale before each step). So the aux loss is trained
exactly as if it had been added to that micro-batch's loss, and the schedules carry one loss per
micro-batch whatever the model holds (Megatron-Core's MoEAuxLossAutoScaler does the same).
"""
from __future__ import annotations

import torch

_SCALE = [1.0]


def set_scale(scale: float) -> None:
    _SCALE[0] = float(scale)


def get_scale() -> float:
    return _SCALE[0]


class _AuxLossScaler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.full(ctx.aux_shape, _SCALE[0], dtype=ctx.aux_dtype, device=grad_out.device)


def attach(out: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    return out if aux is None or not aux.requires_grad else _AuxLossScaler.apply(out, aux)
