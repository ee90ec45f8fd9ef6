"""Straggler report (--log-straggler): per-rank step times every --log-interval iterations, and a
warning naming the ranks slower than the median by more than --straggler-threshold.

In a synchronous job every rank's *whole* step lasts as long as the slowest rank's, because the
gradient reduction waits for it. So each rank times its own work: from the start of the step until it
begins the gradient synchronisation (forward and backward of all micro-batches; with pipeline
parallelism this includes waits for neighbouring stages). One all-gather of one number per rank at each
report; nothing when the flag is off.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from megaflow.parallel import state
from megaflow.training import logging as log


class StragglerDetector:
    def __init__(self, cfg, optimizer):
        r = cfg.resilience
        self.enabled = r.log_straggler
        self.count, self.threshold = r.straggler_minmax_count, r.straggler_threshold
        self.times, self.first_iteration = [], None
        self._start = self._compute_end = None
        if self.enabled:
            finish = optimizer.finish_grad_sync

            def timed_finish_grad_sync():  # the end of this rank's own work in the step
                self._compute_end = time.perf_counter()
                return finish()
            optimizer.finish_grad_sync = timed_finish_grad_sync

    def start_step(self, iteration: int) -> None:
        if self.enabled:
            self.first_iteration = self.first_iteration or iteration
            self._start, self._compute_end = time.perf_counter(), None

    def end_step(self) -> None:
        if self.enabled and self._start is not None:
            self.times.append((self._compute_end or time.perf_counter()) - self._start)

    def report(self, iteration: int) -> list[int]:
        """Collective: every rank calls it at the same iteration. Returns the stragglers' ranks."""
        if not self.enabled or not self.times:
            return []
        st = state.get()
        mine = torch.tensor([sum(self.times) / len(self.times)], dtype=torch.float64, device=st.device)
        per_rank = [mine.clone() for _ in range(st.world_size)]
        if st.world_size > 1:
            dist.all_gather(per_rank, mine)
        ms = [float(t.item()) * 1000 for t in per_rank]
        first, self.times, self.first_iteration = self.first_iteration, [], None
        median = statistics.median(ms)
        order = sorted(range(len(ms)), key=lambda r: ms[r])
        k = min(self.count, len(ms))
        slow = [r for r in reversed(order) if ms[r] > median * (1 + self.threshold)]
        lines = [f" straggler report, iterations {first}-{iteration}: step time per rank (ms, own work before the "
                 f"gradient sync) min {ms[order[0]]:.1f} (rank {order[0]}) | median {median:.1f} | max "
                 f"{ms[order[-1]]:.1f} (rank {order[-1]}) | slowest: "
                 + ", ".join(f"rank {r} {ms[r]:.1f}" for r in order[::-1][:k]) + " | fastest: "
                 + ", ".join(f"rank {r} {ms[r]:.1f}" for r in order[:k])]
        for r in slow:
            lines.append(f"WARNING: straggler: rank {r} takes {ms[r]:.1f} ms per step, {ms[r] / median - 1:.0%} "
                         f"more than the median {median:.1f} ms (--straggler-threshold {self.threshold:g})")
        log.print_rank_0("\n".join(lines))
        return slow
