"""Live progress of preprocessing: a tqdm bar on a terminal, Megatron-style lines otherwise.

Both show documents, docs/s, MB/s (input bytes; Megatron counts characters), tokens/s and, when the
input size is known, an ETA. Off a terminal (CI, log files) a line is printed every --log-interval
documents: `Processed {n} documents ({docs/s} docs/s, {MB/s} MB/s, {tok/s} tokens/s, ETA …).`
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total_bytes: Optional[int], log_interval: int = 1000, enabled: bool = True,
                 stream=None):
        self.stream = stream or sys.stderr
        self.total = total_bytes
        self.log_interval = max(1, log_interval)
        self.start = time.time()
        self.docs = self.tokens = self.bytes = self.position = 0
        self._next_log = self.log_interval
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1 << 20,
                            file=self.stream, desc="preprocess", dynamic_ncols=True)
        self.enabled = enabled

    def rates(self):
        dt = max(time.time() - self.start, 1e-9)
        return self.docs / dt, self.bytes / dt / (1 << 20), self.tokens / dt

    def eta(self) -> Optional[float]:
        if not self.total or not self.position:
            return None
        dt = time.time() - self.start
        return dt * (self.total - self.position) / self.position

    def update(self, docs: int, tokens: int, nbytes: int, position: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        step = position - self.position
        self.position = position
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step)
            dps, _, tps = self.rates()
            self.bar.set_postfix_str(f"{self.docs:,} docs, {dps:,.0f} docs/s, {tps:,.0f} tok/s", refresh=False)
            return
        if self.docs >= self._next_log:
            self._next_log = (self.docs // self.log_interval + 1) * self.log_interval
            dps, mbs, tps = self.rates()
            eta = self.eta()
            tail = f", ETA {_fmt_eta(eta)}" if eta is not None else ""
            print(f"Processed {self.docs} documents ({dps:.2f} docs/s, {mbs:.2f} MB/s, {tps:.0f} tokens/s{tail}).",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
