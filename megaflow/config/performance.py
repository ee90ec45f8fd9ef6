"""Step-time options that change how the step runs, never what it computes."""
from __future__ import annotations

from dataclasses import dataclass

from megaflow.config.fields import _f


@dataclass
class PerformanceConfig:
    compile: bool = _f(False, "torch.compile each transformer block on its own (regional compilation, as "
                              "torchtitan): one graph per block, reused by every layer", action="store_true")
    gradient_accumulation_fusion: bool = _f(False, "accumulate the linear layers' weight gradients straight "
                                                   "into the fp32 main-gradient buffer from their backward "
                                                   "(Megatron's flag): no per-parameter gradient tensor",
                                            action="store_true")
