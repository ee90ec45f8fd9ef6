"""Run the plans of every pipeline rank against each other without tensors or processes.

A transfer completes only when both ends have posted it (gloo's and NCCL's rendezvous semantics, the
strictest case), a batch when all its transfers have, and steps take fixed times (F: t_forward per
stage, B: t_backward, each split evenly over the V chunks). The simulation proves a plan has no
deadlock, that every received tensor is the one the receiver expects (per (peer, tag) messages
arrive in order), and yields the ideal timeline and bubble fraction, and the peak number of
micro-batches whose activations a rank holds.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megaflow.pipeline.plan import BACKWARD, FORWARD, NEXT, Comm, Step, build_plan, source_of, virtual_stage


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
    posted = {}                                            # rank -> [(side, channel, index)]

    def peer_rank(rank, peer):
        return (rank + 1) % pp_size if peer == NEXT else (rank - 1) % pp_size

    progress = True
    while progress:
        progress = False
        for r in range(pp_size):
            while pc[r] < len(plans[r]):
                action = plans[r][pc[r]]
                if isinstance(action, Step):
                    end = clock[r] + durations[r][action.op]
                    sim.events[r].append((action.op, action.chunk, action.microbatch, clock[r], end))
                    clock[r] = end
                    if not forward_only:
                        live[r] += 1 if action.op == FORWARD else -1
                        sim.peak_live[r] = max(sim.peak_live[r], live[r])
                    pc[r] += 1
                    progress = True
                    continue
                if r not in posted:
                    posted[r] = _post(action, r, pp_size, clock[r], sends, recvs, peer_rank)
                done = _completion(posted[r], sends, recvs)
                if done is None:
                    break
                if done > clock[r]:
                    sim.events[r].append(("wait", -1, -1, clock[r], done))
                clock[r] = max(clock[r], done)
                del posted[r]
                pc[r] += 1
                progress = True
    stuck = [r for r in range(pp_size) if pc[r] < len(plans[r])]
    if stuck:
        raise PlanError(f"deadlock (PP={pp_size}, M={num_microbatches}, V={num_chunks}): ranks "
                        + ", ".join(f"{r} at {plans[r][pc[r]]}" for r in stuck))
    return sim


def _post(comm: Comm, rank, pp_size, now, sends, recvs, peer_rank):
    mine = []
    for t in comm.sends:
        dst = peer_rank(rank, t.peer)
        ident = (virtual_stage(rank, pp_size, t.chunk), t.kind, t.microbatch)
        ch = (rank, dst, t.kind)
        sends[ch].append((now, ident))
        mine.append(("send", ch, len(sends[ch]) - 1))
    for t in comm.recvs:
        src, src_chunk = source_of(t, rank, pp_size)
        ident = (virtual_stage(src, pp_size, src_chunk), t.kind, t.microbatch)
        ch = (src, rank, t.kind)
        recvs[ch].append((now, ident))
        mine.append(("recv", ch, len(recvs[ch]) - 1))
    return mine


def _completion(mine, sends, recvs):
    """Time the batch completes, or None while a partner has not posted yet."""
    done = 0.0
    for side, ch, i in mine:
        if len(sends[ch]) <= i or len(recvs[ch]) <= i:
            return None
        (ts, sent), (tr, expected) = sends[ch][i], recvs[ch][i]
        if sent != expected:
            raise PlanError(f"channel {ch} message {i}: sent {sent} (stage, kind, mb) but the receiver "
                            f"expects {expected}")
        done = max(done, ts, tr)
    return done


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
