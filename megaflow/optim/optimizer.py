"""Optimizer construction: AdamW or SGD, no weight decay on biases and norm weights (as Megatron)."""
from __future__ import annotations

import torch


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    t = cfg.training
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.sgd_momentum)
