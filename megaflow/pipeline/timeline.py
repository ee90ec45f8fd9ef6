"""Record what each rank does during a training step: (op, chunk, micro-batch, start, end).

Ops: "F" forward, "B" backward of one (chunk, micro-batch), "wait" time blocked in a pipeline transfer.
Times are seconds from the step's start, a common instant for every rank: ranks on one host share
the monotonic clock, so they all take the same start (the earliest barrier exit, exchanged with one
all-reduce) and their rows line up exactly; across hosts each rank starts its clock as it leaves a
barrier (rows then line up to within the barrier's skew, a few milliseconds on a loaded machine).
Recording is off unless a step is being recorded; then it costs two clock reads per op (and the barrier once per recorded step).

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
import socket
import time
from typing import Optional

import torch
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


_one_host: Optional[bool] = None  # do all ranks run on this host (then they share the clock)?


def _common_start() -> float:
    global _one_host
    if not dist.is_initialized():
        return time.perf_counter()
    if _one_host is None:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        _one_host = len(set(hosts)) == 1
    dist.barrier()
    t0 = time.perf_counter()
    if _one_host:
        t = torch.tensor([t0], dtype=torch.float64, device=state.get().device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        t0 = float(t.item())
    return t0


@contextlib.contextmanager
def recording():
    """Record everything inside; yields the list the events are appended to."""
    global _events, _t0
    t0 = _common_start()
    _events, _t0 = [], t0
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


# ---- reading recorded timelines (tools/pipeline_timeline.py) -------------------------------------

def load(directory: str, all_ranks: bool = False) -> list[dict]:
    """The recorded files of one pipeline (TP rank 0, DP rank 0; every rank with all_ranks), ordered
    by pipeline stage."""
    docs = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("timeline_rank") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as fh:
                doc = json.load(fh)
            if all_ranks or (doc.get("tp_rank", 0) == 0 and doc.get("dp_rank", 0) == 0):
                docs.append(doc)
    if not docs:
        raise FileNotFoundError(f"no timeline_rank*.json in {directory}")
    return sorted(docs, key=lambda d: (d["pp_rank"], d["rank"]))


def measure(docs: list[dict], step: int = -1) -> dict:
    """Bubble of one recorded step. The span runs from the first forward to the last backward of any
    stage (the pipelined part of the step; zero_grad and the optimizer are outside it); a stage's
    bubble is the share of the span it spends outside F and B (idle or blocked in a transfer).
    Beside it: the formula (FORMATS.md §3) and the simulated schedule with each stage's measured mean
    F and B times and free communication."""
    from megaflow.pipeline.simulate import simulate, theoretical_bubble
    rows = [[tuple(e) for e in d["steps"][step]["events"]] for d in docs]
    compute = [[e for e in row if e[0] in ("F", "B")] for row in rows]
    start = min(e[3] for row in compute for e in row)
    end = max(e[4] for row in compute for e in row)
    span = end - start
    busy = [sum(e[4] - e[3] for e in row) for row in compute]
    per_stage = [1.0 - b / span for b in busy]
    pp, v, m = docs[0]["pp_size"], docs[0].get("virtual_pp_size", 1), docs[0]["num_microbatches"]

    def mean_time(row, op):  # one stage's time per micro-batch (all its chunks)
        ts = [e[4] - e[3] for e in row if e[0] == op]
        return sum(ts) / len(ts) * v if ts else 0.0

    simulated = None
    if len(docs) == pp:  # one row per stage
        sim = simulate(pp, m, v, t_forward=[mean_time(r, "F") for r in compute],
                       t_backward=[mean_time(r, "B") for r in compute])
        simulated = sim.mean_bubble()
    return {"pp_size": pp, "virtual_pp_size": v, "num_microbatches": m,
            "iteration": docs[0]["steps"][step]["iteration"], "span_seconds": span, "start": start,
            "measured_per_stage": per_stage, "measured": sum(per_stage) / len(per_stage),
            "theory": theoretical_bubble(pp, m, v), "simulated_with_measured_times": simulated,
            "mean_forward_seconds": [mean_time(r, "F") for r in compute],
            "mean_backward_seconds": [mean_time(r, "B") for r in compute], "rows": rows}
