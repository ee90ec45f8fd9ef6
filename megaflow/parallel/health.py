"""Which rank failed: heartbeats and progress in the rendezvous store, read when a collective fails.

When a rank dies, its peers' collectives fail at once (gloo and NCCL see the closed connection) or after
--distributed-timeout-minutes (a peer that froze keeps its sockets open), and the error names an address,
not a rank. So every rank keeps a counter in torch.distributed's store (the one torchrun's agent, or
rank 0 without torchrun, serves), bumped by a daemon thread every `interval` seconds, and records the
iteration it reached. On a failure a rank (1) writes why it stops, (2) reads every counter twice,
`interval`·2.5 apart, and (3) reports the ranks whose counter stood still and wrote no reason: they
died, froze or are cut off. Ranks that wrote a reason are reported with it; ranks behind the others'
iteration are the ones a collective was waiting for.

The first rank that diagnoses also asks every rank for a report (key dump): each live rank's
heartbeat thread, which runs even when the rank's main thread is stuck, writes its Python stacks and
latest collectives (parallel/flight_recorder.py) to the diagnostics directory and publishes how many
collectives it issued on each group; the members of the failed collective's group that issued fewer
are named as the ranks that never arrived.

Keys (under megaflow/attempt<n>/, n = torchrun's restart count): heartbeat/<rank> (counter), iteration/<rank>, exit/<rank> (reason),
done/<rank> (finished diagnosing; ranks wait for each other's before exiting),
dump (report request), collectives/<rank> (per-group collective counts, JSON).
"""
from __future__ import annotations

import json
import os
import threading
import time

import torch.distributed as dist

from megaflow.parallel import elastic, flight_recorder

_PREFIX = "megaflow/"
_monitor = None


def interval_for(timeout_minutes: float) -> float:
    """Heartbeat period: a twentieth of the collective timeout, between 0.5 s and 10 s."""
    return min(10.0, max(0.5, timeout_minutes * 60 / 20))


class Monitor:
    def __init__(self, store, rank: int, world_size: int, timeout_minutes: float, dump_dir: str | None = None,
                 attempt: int = 0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_minutes, self.interval = timeout_minutes, interval_for(timeout_minutes)
        self.dump_dir, self.attempt = dump_dir, attempt
        # torchrun's restarts reuse the rendezvous store: keys of an earlier attempt must not count.
        self.prefix = f"{_PREFIX}attempt{attempt}/"
        self.last_iteration = 0
        self._reported = False
        self._report_lock = threading.Lock()
        self._lost: set = set()
        self._stop = threading.Event()
        self.store.add(f"{self.prefix}heartbeat/{rank}", 1)
        self._thread = threading.Thread(target=self._beat, name="megaflow-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"{self.prefix}heartbeat/{self.rank}", 1)
                if not self._reported and self.store.check([f"{self.prefix}dump"]):
                    # Another rank's collective failed: report even if this rank's main thread is stuck.
                    self.report(self.store.get(f"{self.prefix}dump").decode())
            except Exception:  # the store's host is gone: nothing left to tell
                return

    def iteration(self, it: int) -> None:
        self.last_iteration = it
        self.store.set(f"{self.prefix}iteration/{self.rank}", str(it))

    def report_path(self) -> str | None:
        if not self.dump_dir:
            return None
        return os.path.join(self.dump_dir, f"rank{self.rank:05d}-attempt{self.attempt}.txt")

    def report(self, why: str, error: BaseException | None = None) -> None:
        """Write this rank's stacks and latest collectives, and publish its collective counts (once)."""
        with self._report_lock:  # the heartbeat thread and a diagnosing main thread may both get here
            if self._reported:
                return
            self._reported = True
        rec = flight_recorder.get()
        counts = {",".join(map(str, key)): n for key, n in rec.counts_snapshot().items()}
        self.store.set(f"{self.prefix}collectives/{self.rank}", json.dumps(counts))
        path = self.report_path()
        if path:
            try:
                flight_recorder.dump(path, f"rank {self.rank} (attempt {self.attempt}), iteration "
                                           f"{self.last_iteration}, reporting because: {why}", error)
            except OSError:
                pass  # a full or read-only disk must not hide the diagnosis itself

    def record_exit(self, error: BaseException) -> None:
        """Say why this rank stops (a local error, not a failed collective) for the others' diagnosis."""
        try:
            self.store.set(f"{self.prefix}exit/{self.rank}", _reason(error))
        except Exception:
            pass

    def _never_arrived(self) -> str | None:
        """If this rank failed inside a collective: the members of its group that issued fewer
        collectives on that group (they never called it), from the counts the ranks published."""
        entry = flight_recorder.get().in_flight
        if entry is None or "group" not in entry:
            return None
        key, seq = entry["group"], entry["seq"]
        behind, unknown = [], []
        for r in key:
            if r == self.rank:
                continue
            raw = self._optional(f"{self.prefix}collectives/{r}")
            if raw is None:
                unknown.append(r)
                continue
            n = json.loads(raw).get(",".join(map(str, key)), 0)
            if n < seq:
                behind.append((r, n))
        if not behind:
            return None
        names = ", ".join(str(r) for r, _n in behind)
        issued = ", ".join(f"rank {r}: {n}" for r, n in behind)
        return (f"Rank(s) {names} never arrived at {entry['name']} #{seq} on group {list(key)} (collectives "
                f"they issued on it: {issued}).")

    def stop(self) -> None:
        # Join, not just signal: a heartbeat thread still inside the store client when the process group
        # (and its store) is torn down, or when the interpreter exits, aborts the process.
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _counters(self) -> list[int]:
        return [self.store.add(f"{self.prefix}heartbeat/{r}", 0) for r in range(self.world_size)]

    def _optional(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def diagnose(self, error: BaseException) -> str:
        """Record why this rank stops, then name the ranks that are gone. Takes about 2.5 intervals."""
        reason = _reason(error)
        try:
            self.store.set(f"{self.prefix}exit/{self.rank}", reason)
            if not self.store.check([f"{self.prefix}dump"]):
                self.store.set(f"{self.prefix}dump", f"rank {self.rank}: {reason}")
            self.report(f"this rank's collective failed: {reason}", error)
            before = self._counters()
            time.sleep(2.5 * self.interval)  # the others' heartbeat threads report meanwhile
            after = self._counters()
            exits = {r: self._optional(f"{self.prefix}exit/{r}") for r in range(self.world_size)}
            iters = {r: self._optional(f"{self.prefix}iteration/{r}") for r in range(self.world_size)}
            never_arrived = self._never_arrived()
            self.store.set(f"{self.prefix}done/{self.rank}", "1")  # finished with the store
        except Exception as e:
            return (f"rank {self.rank} stopping after: {reason}. The rendezvous store is unreachable too ({e}): "
                    "the rank or agent hosting it (MASTER_ADDR:MASTER_PORT) is gone, so which other ranks "
                    "are lost cannot be told from here.")
        lost = [r for r in range(self.world_size) if after[r] == before[r] and not exits[r] and r != self.rank]
        self._lost = set(lost)
        failed = {r: why for r, why in exits.items() if why and r != self.rank}
        parts = [f"rank {self.rank} stopping after: {reason}."]
        if never_arrived:
            parts.insert(0, never_arrived)
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
        if self.dump_dir:
            parts.append(f"Stacks and latest collectives of every live rank: {self.dump_dir}/rank*-attempt"
                         f"{self.attempt}.txt.")
        return " ".join(parts)


    def linger(self) -> None:
        """Before exiting, wait until every rank that is not lost has finished its own diagnosis, or until
        it could not be waiting any more (one collective timeout and a diagnosis): the store lives in
        rank 0 (or its node's agent), and the ranks still diagnosing need it."""
        if not elastic.store_hosted_here(self.rank):
            return  # torchrun's agent (or rank 0) hosts the store: it outlives this process anyway
        deadline = time.time() + self.timeout_minutes * 60 + 4 * self.interval
        waiting = set(range(self.world_size)) - {self.rank} - self._lost
        try:
            while waiting and time.time() < deadline:
                waiting = {r for r in waiting if not self.store.check([f"{self.prefix}done/{r}"])}
                time.sleep(0.2)
        except Exception:
            return


def _reason(error: BaseException) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}"[:300].rstrip(".?! ")


def start(timeout_minutes: float, dump_dir: str | None = None, attempt: int = 0) -> Monitor | None:
    """Start the heartbeat on this rank (a no-op without a process group)."""
    global _monitor
    stop()  # one heartbeat per process, even when a process trains several runs in turn
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed import distributed_c10d
    store = distributed_c10d._get_default_store()
    _monitor = Monitor(store, dist.get_rank(), dist.get_world_size(), timeout_minutes, dump_dir, attempt)
    return _monitor


def get() -> Monitor | None:
    return _monitor


def stop() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.stop()
    _monitor = None
