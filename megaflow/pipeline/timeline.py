"""Record what each rank does during a training step: (op, chunk, micro-batch, start, end).

Ops: "F" forward, "B" backward of one (chunk, micro-batch), "wait" time blocked in a pipeline transfer.
Times are seconds from the step's start; all ranks leave a barrier together at that start, so rows of
different ranks (even on different nodes) line up. Recording is off unless a step is being recorded;
then it costs two clock reads per op (and the barrier once per recorded step).

    recorder = TimelineRecorder(out_dir, iterations=3)    # --pipeline-timeline-dir/-iters
    with recorder.step(iteration):                        # records the first `iterations` steps
        train_step(...)
    recorder.save()                                       # {out_dir}/timeline_rank{r}.json

tools/pipeline_timeline.py draws the files and reports the measured bubble beside the theory.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Optional

import torch.distributed as dist

from megaflow.parallel import state

_events: Optional[list] = None   # the current step's events while recording, else None
_t0 = 0.0


@contextlib.contextmanager
def record(op: str, chunk: int = 0, microbatch: int = 0):
    """Time the enclosed op when a step is being recorded; otherwise do nothing."""
    if _events is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _events.append((op, chunk, microbatch, start - _t0, time.perf_counter() - _t0))


@contextlib.contextmanager
def recording():
    """Record everything inside; yields the list the events are appended to."""
    global _events, _t0
    if dist.is_initialized():
        dist.barrier()  # a common start for every rank's clock
    _events, _t0 = [], time.perf_counter()
    events = _events
    try:
        yield events
    finally:
        _events = None


class TimelineRecorder:
    def __init__(self, out_dir: Optional[str], iterations: int = 3, meta: Optional[dict] = None):
        self.out_dir, self.iterations, self.meta = out_dir, iterations, meta or {}
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def step(self, iteration: int):
        if not self.out_dir or len(self.steps) >= self.iterations:
            yield
            return
        with recording() as events:
            yield
        self.steps.append({"iteration": iteration, "events": [list(e) for e in events]})

    def save(self) -> Optional[str]:
        if not self.out_dir or not self.steps:
            return None
        st = state.get()
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"timeline_rank{st.rank}.json")
        doc = {"rank": st.rank, "pp_rank": st.pp_rank, "pp_size": st.pp_size, "tp_rank": st.tp_rank,
               "dp_rank": st.dp_rank, "virtual_pp_size": st.virtual_pp_size, **self.meta, "steps": self.steps}
        with open(path, "w") as fh:
            json.dump(doc, fh)
        return path

