"""Which rank failed: heartbeats and progress in the rendezvous store, read when a collective fails.

When a rank dies, its peers' collectives fail at once (gloo and NCCL see the closed connection) or after
--distributed-timeout-minutes (a peer that froze keeps its sockets open), and the error names an address,
not a rank. So every rank keeps a counter in torch.distributed's store (the one torchrun's agent, or
rank 0 without torchrun, serves), bumped by a daemon thread every `interval` seconds, and records the
iteration it reached. On a failure a rank (1) writes why it stops, (2) reads every counter twice,
`interval`·2.5 apart, and (3) reports the ranks whose counter stood still and wrote no reason: they
died, froze or are cut off. Ranks that wrote a reason are reported with it; ranks behind the others'
iteration are the ones a collective was waiting for.

Keys: megaflow/heartbeat/<rank> (counter), megaflow/iteration/<rank>, megaflow/exit/<rank> (reason),
megaflow/done/<rank> (finished diagnosing; ranks wait for each other's before exiting).
"""
from __future__ import annotations

import threading
import time

import torch.distributed as dist

_PREFIX = "megaflow/"
_monitor = None


def interval_for(timeout_minutes: float) -> float:
    """Heartbeat period: a twentieth of the collective timeout, between 0.5 s and 10 s."""
    return min(10.0, max(0.5, timeout_minutes * 60 / 20))


class Monitor:
    def __init__(self, store, rank: int, world_size: int, timeout_minutes: float):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_minutes, self.interval = timeout_minutes, interval_for(timeout_minutes)
        self._lost: set = set()
        self._stop = threading.Event()
        self.store.add(f"{_PREFIX}heartbeat/{rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="megaflow-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"{_PREFIX}heartbeat/{self.rank}", 1)
            except Exception:  # the store's host is gone: nothing left to tell
                return

    def iteration(self, it: int) -> None:
        self.store.set(f"{_PREFIX}iteration/{self.rank}", str(it))

    def stop(self) -> None:
        # Join, not just signal: a heartbeat thread still inside the store client when the process group
        # (and its store) is torn down, or when the interpreter exits, aborts the process.
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _counters(self) -> list[int]:
        return [self.store.add(f"{_PREFIX}heartbeat/{r}", 0) for r in range(self.world_size)]

    def _optional(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def diagnose(self, error: BaseException) -> str:
        """Record why this rank stops, then name the ranks that are gone. Takes about 2.5 intervals."""
        first = str(error).splitlines()[0] if str(error) else ""
        reason = f"{type(error).__name__}: {first}"[:300].rstrip(".?! ")
        try:
            self.store.set(f"{_PREFIX}exit/{self.rank}", reason)
            before = self._counters()
            time.sleep(2.5 * self.interval)
            after = self._counters()
            exits = {r: self._optional(f"{_PREFIX}exit/{r}") for r in range(self.world_size)}
            iters = {r: self._optional(f"{_PREFIX}iteration/{r}") for r in range(self.world_size)}
            self.store.set(f"{_PREFIX}done/{self.rank}", "1")  # finished with the store
        except Exception as e:
            return (f"rank {self.rank} stopping after: {reason}. The rendezvous store is unreachable too ({e}): "
                    "the rank or agent hosting it (MASTER_ADDR:MASTER_PORT) is gone, so which other ranks "
                    "are lost cannot be told from here.")
        lost = [r for r in range(self.world_size) if after[r] == before[r] and not exits[r] and r != self.rank]
        self._lost = set(lost)
        failed = {r: why for r, why in exits.items() if why and r != self.rank}
        parts = [f"rank {self.rank} stopping after: {reason}."]
        if lost:
            parts.append(f"Lost rank(s) {', '.join(map(str, lost))}: no heartbeat for "
                         f"{2.5 * self.interval:.1f} s and no reason given (the process died, froze, or its node "
                         "is unreachable).")
        for r, why in sorted(failed.items())[:8]:
            parts.append(f"Rank {r} stopped on its own ({why}).")
        reached = {r: int(v) for r, v in iters.items() if v is not None}
        if reached and not lost and not failed:
            low = min(reached.values())
            behind = [r for r, v in reached.items() if v == low and v < max(reached.values())]
            if behind:
                parts.append(f"No rank is lost; rank(s) {', '.join(map(str, behind))} are behind (iteration "
                             f"{low}): a collective timed out waiting for them (hung or much slower).")
            else:
                parts.append("No rank is lost: every rank is alive, so a collective timed out "
                             "(--distributed-timeout-minutes) on a rank that is hung inside it or much slower.")
        return " ".join(parts)


    def linger(self) -> None:
        """Before exiting, wait until every rank that is not lost has finished its own diagnosis, or until
        it could not be waiting any more (one collective timeout and a diagnosis): the store lives in
        rank 0 (or its node's agent), and the ranks still diagnosing need it."""
        deadline = time.time() + self.timeout_minutes * 60 + 4 * self.interval
        waiting = set(range(self.world_size)) - {self.rank} - self._lost
        try:
            while waiting and time.time() < deadline:
                waiting = {r for r in waiting if not self.store.check([f"{_PREFIX}done/{r}"])}
                time.sleep(0.2)
        except Exception:
            return


def start(timeout_minutes: float) -> Monitor | None:
    """Start the heartbeat on this rank (a no-op without a process group)."""
    global _monitor
    stop()  # one heartbeat per process, even when a process trains several runs in turn
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed import distributed_c10d
    store = distributed_c10d._get_default_store()
    _monitor = Monitor(store, dist.get_rank(), dist.get_world_size(), timeout_minutes)
    return _monitor


def get() -> Monitor | None:
    return _monitor


def stop() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.stop()
    _monitor = None
