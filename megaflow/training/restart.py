"""Automatic restart: failure records, where a run resumes from, and what it says when it does.

Under `torchrun --max-restarts N` the agent restarts every worker when one fails, and sets
TORCHELASTIC_RESTART_COUNT (the attempt number). megaflow then resumes by itself: `--load` defaults to
`--save` (checkpoint/format.py's tracker names the latest complete checkpoint; saves are atomic), so a
restarted job loses at most the iterations since that save, and resume is exact (model, optimizer,
schedule, RNG streams, data position), so it ends with the losses of an uninterrupted run.

A rank that fails writes a failure record, `{diagnostics dir}/failure-attempt{n}-rank{r}.json` (rank,
iteration, error, and for a failed collective the diagnosis naming lost or missing ranks). When attempt
n+1 starts, rank 0 reads attempt n's records and prints which rank failed, why, at which iteration,
and from which checkpoint the run resumes. A rank killed outright (SIGKILL, out of memory) leaves no
record of its own; the survivors' records (a lost peer) and torchrun's log name it.
"""
from __future__ import annotations

import glob
import json
import os
import time

from megaflow.checkpoint import format as fmt
from megaflow.parallel.elastic import attempt  # noqa: F401  (re-exported: the trainer asks restart.attempt())

_dir: str | None = None     # the diagnostics directory of the running process (set by the trainer)


def diagnostics_dir(cfg) -> str:
    """--diagnostics-dir, else --save/diagnostics, else ./megaflow_diagnostics (absolute)."""
    r = cfg.resilience.diagnostics_dir
    if r is None:
        r = os.path.join(cfg.checkpoint.save, "diagnostics") if cfg.checkpoint.save else "megaflow_diagnostics"
    return os.path.abspath(r)


def configure(cfg) -> str:
    global _dir
    _dir = diagnostics_dir(cfg)
    return _dir


def resume_dir(cfg) -> str | None:
    """Where to load from: --load, else --save when it holds a complete checkpoint, else nowhere."""
    c = cfg.checkpoint
    if c.load:
        return c.load
    if c.save and fmt.latest_iteration(c.save) is not None:
        return c.save
    return None


def write_failure_record(rank: int, iteration: int | None, error: BaseException, diagnosis: str) -> str | None:
    """Best effort: a failing rank must still exit when the disk is gone too."""
    if _dir is None:
        return None
    path = os.path.join(_dir, f"failure-attempt{attempt()}-rank{rank:05d}.json")
    try:
        os.makedirs(_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"rank": rank, "attempt": attempt(), "iteration": iteration, "time": time.time(),
                       "error": f"{type(error).__name__}: {error}"[:2000], "diagnosis": diagnosis}, f, indent=1)
    except OSError:
        return None
    return path


def previous_failures(directory: str, previous_attempt: int) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(directory, f"failure-attempt{previous_attempt}-rank*.json"))):
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue
    return records


def restart_message(directory: str, n: int, loaded: str | None, iteration: int) -> str:
    """What a restarted job says at start: the previous attempt's failures and where it resumes."""
    records = previous_failures(directory, n - 1)
    # A rank's own error explains more than a peer's report that it was lost: list those first.
    own = [r for r in records if "Lost rank" not in r.get("diagnosis", "") and "never arrived" not in
           r.get("diagnosis", "")]
    lines = [f"restart {n} (torchrun --max-restarts): attempt {n - 1} failed."]
    for rec in own + [r for r in records if r not in own]:
        where = f" in iteration {rec['iteration']}" if rec.get("iteration") is not None else ""
        lines.append(f"  rank {rec['rank']} failed{where}: {rec['error'].splitlines()[0]}"
                     + (f" [{rec['diagnosis']}]" if rec.get("diagnosis") and rec["diagnosis"] not in rec["error"]
                        else ""))
    if not records:
        lines.append(f"  no rank left a failure record in {directory} (killed outright: signal or out of "
                     "memory?); torchrun's log above names the rank and its exit code.")
    reached = max((rec["iteration"] for rec in records if rec.get("iteration") is not None), default=None)
    if loaded:
        lost = f", redoing iterations {iteration + 1}-{reached}" if reached and reached > iteration else ""
        lines.append(f"  resuming from checkpoint {fmt.iteration_dir(loaded, iteration)} (iteration "
                     f"{iteration}{lost}).")
    else:
        lines.append("  no checkpoint to resume from (no --save, or none saved yet): starting again from "
                     "iteration 0.")
    return "\n".join(lines)
