"""fp16 loss scaling (Megatron defaults: start 2^32, x2 after 1000 clean steps, x0.5 once 2 overflow
steps have been seen since the last growth)."""
from __future__ import annotations


class ConstantLossScaler:
    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])


class DynamicLossScaler(ConstantLossScaler):
    def __init__(self, initial_scale=2.0 ** 32, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=1000, hysteresis=2):
        super().__init__(initial_scale)
        self.min_scale, self.growth_factor, self.backoff_factor = min_scale, growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker, self.hysteresis_tracker = 0, self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.growth_tracker, self.hysteresis_tracker = int(sd["growth_tracker"]), int(sd["hysteresis_tracker"])


def build_loss_scaler(cfg):
    """None for fp32/bf16 (no scaling needed)."""
    t = cfg.training
    if not t.fp16:
        return None
    if t.loss_scale is not None:
        return ConstantLossScaler(t.loss_scale)
    return DynamicLossScaler(t.initial_loss_scale, t.min_loss_scale, growth_interval=t.loss_scale_window,
                             hysteresis=t.hysteresis)
