"""Fault injection for tests of failure handling: the environment variable MEGAFLOW_INJECT_FAULT.

    MEGAFLOW_INJECT_FAULT="crash:rank=1:iteration=3"   rank 1 raises at the start of iteration 3
    MEGAFLOW_INJECT_FAULT="hang:rank=1:iteration=3"    rank 1 stops making progress (sleeps for ever)
    MEGAFLOW_INJECT_FAULT="slow:rank=1:seconds=0.2"    rank 1 spends 0.2 s more on every step
    several, separated by ';'

Faults fire on the job's first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset), so a job that
torchrun restarts after an injected crash runs on. Not a flag: it is for tests, never for a real run.
"""
from __future__ import annotations

import os
import time

from megaflow.training import restart

ENV = "MEGAFLOW_INJECT_FAULT"


class InjectedFault(RuntimeError):
    pass


def _parse(text: str) -> list[dict]:
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        kind, *fields = spec.split(":")
        if kind not in ("crash", "hang", "slow"):
            raise ValueError(f"{ENV}: unknown fault {kind!r} (crash, hang or slow)")
        f = {"kind": kind}
        for field in fields:
            key, _, value = field.partition("=")
            f[key] = float(value) if key == "seconds" else int(value)
        faults.append(f)
    return faults


class Faults:
    def __init__(self, rank: int):
        text = os.environ.get(ENV, "")
        self.faults = [f for f in _parse(text) if f.get("rank", rank) == rank] if restart.attempt() == 0 else []

    def before_step(self, iteration: int) -> None:
        for f in self.faults:
            if f["kind"] == "slow":
                time.sleep(f.get("seconds", 0.1))
            elif f.get("iteration") == iteration:
                if f["kind"] == "crash":
                    raise InjectedFault(f"injected crash at iteration {iteration} ({ENV})")
                while True:  # hang: alive (threads run, sockets open), no progress
                    time.sleep(3600)
