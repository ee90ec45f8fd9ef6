"""Learning-rate schedules with warmup, following Megatron-LM's OptimizerParamScheduler.

The rate for an iteration is a pure function of the number of completed iterations, so resuming only
needs that count (kept in the checkpoint by the training loop)."""
from __future__ import annotations

import math


class LRScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 decay_style: str, wsd_decay_steps: int | None = None, wsd_decay_style: str = "exponential"):
        if decay_style == "WSD" and not wsd_decay_steps:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
        if decay_style not in ("constant", "inverse-square-root") and decay_steps <= warmup_steps:
            raise ValueError(f"--lr-decay-iters ({decay_steps}) must exceed the warmup ({warmup_steps})")
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_steps, self.decay_steps, self.decay_style = warmup_steps, decay_steps, decay_style
        self.wsd_decay_steps, self.wsd_decay_style = wsd_decay_steps, wsd_decay_style
        self.num_steps = 0
        self.step(0)

    def get_lr(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            warmup = max(self.warmup_steps, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup) / math.sqrt(max(step, 1)))
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        elif self.decay_style == "WSD":  # warmup, stable, then decay over the last wsd steps
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if step <= anneal_start:
                coeff = 1.0
            else:
                r = (step - anneal_start) / self.wsd_decay_steps
                coeff = {"linear": 1.0 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                         "exponential": 2.0 * 0.5 ** r - 1.0}[self.wsd_decay_style]
        else:
            raise ValueError(f"unknown --lr-decay-style {self.decay_style!r}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int = 1) -> float:
        self.num_steps += increment
        lr = self.get_lr(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.num_steps = 0
        self.step(int(sd["num_steps"]))


def build_lr_scheduler(cfg, optimizer, train_iters: int) -> LRScheduler:
    t = cfg.training
    decay = t.lr_decay_iters or train_iters
    warmup = t.lr_warmup_iters if t.lr_warmup_fraction is None else int(t.lr_warmup_fraction * decay)
    return LRScheduler(optimizer, t.lr, t.min_lr, warmup, decay, t.lr_decay_style,
                       t.lr_wsd_decay_iters, t.lr_wsd_decay_style)
