"""Failures, hangs and stragglers: what a run reports about its ranks (docs/resilience.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import _f


@dataclass
class ResilienceConfig:
    log_straggler: bool = _f(False, "every --log-interval iterations, report per-rank step times (min, median, "
                                    "max) and warn about ranks slower than the median by --straggler-threshold",
                             action="store_true")
    straggler_minmax_count: int = _f(1, "how many of the slowest and fastest ranks the straggler report names")
    straggler_threshold: float = _f(0.2, "a rank whose step time exceeds the median by this fraction is named "
                                         "a straggler")
    flight_recorder_size: int = _f(32, "how many of its latest collectives each rank remembers, for the "
                                       "report written when a collective fails or times out (0 disables)")
    diagnostics_dir: Optional[str] = _f(None, "where ranks write their Python stacks and latest collectives "
                                              "when a collective fails or times out, and failure records for "
                                              "automatic restarts (default: --save/diagnostics, else "
                                              "./megaflow_diagnostics)")


def validate_resilience_and_reporting(cfg, need) -> None:
    """Checks of this section, of the W&B flags and of the Muon hyper-parameters (called by validate)."""
    r, t, lg = cfg.resilience, cfg.training, cfg.logging
    need(r.straggler_minmax_count >= 1, "--straggler-minmax-count must be at least 1")
    need(r.straggler_threshold > 0, "--straggler-threshold must be positive (a fraction of the median step time)")
    need(r.flight_recorder_size >= 0, "--flight-recorder-size must be 0 (off) or positive")
    if lg.wandb_project:
        import importlib.util
        need(importlib.util.find_spec("wandb") is not None,
             "--wandb-project needs the wandb package: pip install 'megaflow[wandb]' (or pip install wandb)")
    if t.optimizer == "muon":
        need(t.muon_num_ns_steps >= 1, "--muon-num-ns-steps must be at least 1")
        need(0 <= t.muon_momentum < 1, "--muon-momentum must be in [0, 1)")
