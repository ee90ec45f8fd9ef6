"""Run the plans of every pipeline rank against each other without tensors or processes.

Transfers are asynchronous, as the executor posts them (p2p.post): posting never blocks; a transfer
completes when both ends have posted it (gloo's and NCCL's rendezvous semantics), and a step waits for
the receives it consumes (its input, or its output's gradient). Steps take fixed times (F: t_forward per
stage, B: t_backward, each split evenly over the V chunks). The simulation proves a plan has no
deadlock, that every received tensor is the one the receiver expects (per (peer, tag) messages
arrive in order), and yields the ideal timeline and bubble fraction, and the peak number of
micro-batches whose activations a rank holds.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megaflow.pipeline.plan import (BACKWARD, FORWARD, NEXT, Comm, Step, build_plan, needs, source_of,
                                    virtual_stage)


class PlanError(RuntimeError):
    """A plan that deadlocks or would deliver a tensor to the wrong step."""


@dataclass
class Simulation:
    pp_size: int
    num_microbatches: int
    num_chunks: int
    events: dict = field(default_factory=dict)          # rank -> [(op, chunk, mb, start, end)]
    peak_live: dict = field(default_factory=dict)       # rank -> max micro-batch chunks held at once

    @property
    def span(self) -> float:
        return max(e[4] for evs in self.events.values() for e in evs)

    def bubble(self, rank: int) -> float:
        busy = sum(e[4] - e[3] for e in self.events[rank] if e[0] in (FORWARD, BACKWARD))
        return 1.0 - busy / self.span

    def mean_bubble(self) -> float:
        return sum(self.bubble(r) for r in self.events) / len(self.events)


def theoretical_bubble(pp_size: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """FORMATS.md §3: (p−1)/(m+p−1) of the step for 1F1B; (p−1)/(v·m+p−1) interleaved."""
    p, m, v = pp_size, num_microbatches, num_chunks
    return (p - 1) / (v * m + p - 1)


def simulate(pp_size: int, num_microbatches: int, num_chunks: int = 1, forward_only: bool = False,
             t_forward=1.0, t_backward=2.0) -> Simulation:
    """t_forward / t_backward: one stage's time per micro-batch, for every rank or a list per rank."""
    plans = [build_plan(r, pp_size, num_microbatches, num_chunks, forward_only) for r in range(pp_size)]
    per_rank = lambda t: list(t) if isinstance(t, (list, tuple)) else [t] * pp_size  # noqa: E731
    tf, tb = per_rank(t_forward), per_rank(t_backward)
    durations = [{FORWARD: tf[r] / num_chunks, BACKWARD: tb[r] / num_chunks} for r in range(pp_size)]
    sim = Simulation(pp_size, num_microbatches, num_chunks)
    clock, pc, live = [0.0] * pp_size, [0] * pp_size, [0] * pp_size
    sim.events = {r: [] for r in range(pp_size)}
    sim.peak_live = {r: 0 for r in range(pp_size)}
    sends, recvs = defaultdict(list), defaultdict(list)   # channel -> [(post time, identity)]
    posted = [{} for _ in range(pp_size)]                  # rank -> {(kind, chunk, mb): (channel, index)}

    def peer_rank(rank, peer):
        return (rank + 1) % pp_size if peer == NEXT else (rank - 1) % pp_size

    progress = True
    while progress:
        progress = False
        for r in range(pp_size):
            while pc[r] < len(plans[r]):
                action = plans[r][pc[r]]
                if isinstance(action, Comm):
                    _post(action, r, pp_size, clock[r], sends, recvs, posted[r], peer_rank)
                    pc[r] += 1
                    progress = True
                    continue
                ready = _inputs_ready(action, r, pp_size, num_chunks, posted[r], sends, recvs)
                if ready is None:
                    break
                if ready > clock[r]:
                    sim.events[r].append(("wait", -1, -1, clock[r], ready))
                start = max(clock[r], ready)
                end = start + durations[r][action.op]
                sim.events[r].append((action.op, action.chunk, action.microbatch, start, end))
                clock[r] = end
                if not forward_only:
                    live[r] += 1 if action.op == FORWARD else -1
                    sim.peak_live[r] = max(sim.peak_live[r], live[r])
                pc[r] += 1
                progress = True
    stuck = [r for r in range(pp_size) if pc[r] < len(plans[r])]
    if stuck:
        raise PlanError(f"deadlock (PP={pp_size}, M={num_microbatches}, V={num_chunks}): ranks "
                        + ", ".join(f"{r} at {plans[r][pc[r]]}" for r in stuck))
    unmatched = {ch: (len(sends[ch]), len(recvs[ch])) for ch in set(sends) | set(recvs)
                 if len(sends[ch]) != len(recvs[ch])}
    if unmatched:
        raise PlanError(f"transfers without a partner (channel: sends, receives): {unmatched}")
    return sim


def _post(comm: Comm, rank, pp_size, now, sends, recvs, posted, peer_rank):
    for t in comm.sends:
        dst = peer_rank(rank, t.peer)
        ident = (virtual_stage(rank, pp_size, t.chunk), t.kind, t.microbatch)
        sends[(rank, dst, t.kind)].append((now, ident))
    for t in comm.recvs:
        src, src_chunk = source_of(t, rank, pp_size)
        ident = (virtual_stage(src, pp_size, src_chunk), t.kind, t.microbatch)
        ch = (src, rank, t.kind)
        recvs[ch].append((now, ident))
        posted[(t.kind, t.chunk, t.microbatch)] = (ch, len(recvs[ch]) - 1)


def _inputs_ready(step: Step, rank, pp_size, num_chunks, posted, sends, recvs):
    """Time at which every tensor the step consumes has arrived, or None while one has not been sent."""
    ready = 0.0
    for t in needs(step, rank, pp_size, num_chunks):
        key = (t.kind, t.chunk, t.microbatch)
        if key not in posted:
            raise PlanError(f"rank {rank}: {step} consumes a transfer the plan never posted a receive for")
        ch, i = posted[key]
        if len(sends[ch]) <= i:
            return None
        (ts, sent), (tr, expected) = sends[ch][i], recvs[ch][i]
        if sent != expected:
            raise PlanError(f"channel {ch} message {i}: sent {sent} (stage, kind, mb) but the receiver "
                            f"expects {expected}")
        ready = max(ready, ts, tr)
    return ready


def check_all(max_pp: int = 8, max_chunks: int = 4, microbatches=range(1, 17)) -> int:
    """Simulate every small configuration (tests); returns how many were checked."""
    n = 0
    for p in range(1, max_pp + 1):
        for v in range(1, max_chunks + 1):
            if v > 1 and p == 1:
                continue
            for m in microbatches:
                if v > 1 and m % p:
                    continue
                for fo in (False, True):
                    simulate(p, m, v, fo)
                    n += 1
    return n


__all__ = ["PlanError", "Simulation", "check_all", "simulate", "theoretical_bubble"]
