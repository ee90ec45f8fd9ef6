import math

import pytest
import torch

from megaflow.optim.loss_scaler import DynamicLossScaler
from megaflow.optim.lr_scheduler import LRScheduler


def _sched(style, warmup=10, decay=100, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_steps=warmup, decay_steps=decay,
                       decay_style=style, **kw)


def test_warmup_is_linear_from_zero():
    s = _sched("cosine")
    assert s.get_lr(0) == 0.0 and s.get_lr(5) == pytest.approx(0.5) and s.get_lr(10) == pytest.approx(1.0)


@pytest.mark.parametrize("style, step, expected", [
    ("constant", 60, 1.0),
    ("linear", 55, 0.1 + 0.9 * 0.5),
    ("cosine", 55, 0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1)),
    ("cosine", 100, 0.1),
    ("linear", 150, 0.1),
    ("inverse-square-root", 40, max(0.1, math.sqrt(10) / math.sqrt(40))),
])
def test_decay_styles(style, step, expected):
    assert _sched(style).get_lr(step) == pytest.approx(expected)


def test_wsd_holds_then_decays():
    s = _sched("WSD", wsd_decay_steps=20, wsd_decay_style="linear")
    assert s.get_lr(50) == pytest.approx(1.0) and s.get_lr(80) == pytest.approx(1.0)
    assert s.get_lr(90) == pytest.approx(0.1 + 0.9 * 0.5) and s.get_lr(100) == pytest.approx(0.1)
    e = _sched("WSD", wsd_decay_steps=20, wsd_decay_style="exponential")
    assert e.get_lr(100) == pytest.approx(0.1)


def test_scheduler_sets_optimizer_lr_and_resumes():
    s = _sched("linear")
    for _ in range(30):
        s.step()
    t = _sched("linear")
    t.load_state_dict(s.state_dict())
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(s.get_lr(30))
    with pytest.raises(ValueError, match="WSD"):
        _sched("WSD")


def test_dynamic_loss_scaler_megatron_semantics():
    sc = DynamicLossScaler(initial_scale=2.0 ** 16, min_scale=1.0, growth_interval=3, hysteresis=2)
    sc.update(True)                      # first overflow: hysteresis absorbs it
    assert sc.scale == 2.0 ** 16
    sc.update(True)                      # second: halve
    assert sc.scale == 2.0 ** 15
    sc.update(True)                      # hysteresis not reset until growth: halve again
    assert sc.scale == 2.0 ** 14
    for _ in range(3):
        sc.update(False)
    assert sc.scale == 2.0 ** 15 and sc.hysteresis_tracker == 2
    tiny = DynamicLossScaler(initial_scale=2.0, min_scale=1.0, hysteresis=1)
    for _ in range(5):
        tiny.update(True)
    assert tiny.scale == 1.0
    again = DynamicLossScaler()
    again.load_state_dict(sc.state_dict())
    assert again.state_dict() == sc.state_dict()
