"""Each rank's latest collectives, and the report a rank writes when a collective fails or hangs.

When a collective times out, the question is "which rank never arrived, and where was it?". The
timeout names neither. So every collective megaflow issues is counted per process group and its name,
group and size are kept in a small ring buffer; on a failure each live rank writes its Python stack
(faulthandler, every thread) and that buffer to the diagnostics directory, and publishes its per-group
counts, from which parallel/health.py names the members of the failed collective's group that issued
fewer collectives on it: the ranks that never arrived.

Recording happens in one place: install() wraps torch.distributed's collective functions (the module
attributes megaflow calls as `dist.all_reduce(...)`, also those a module bound at import, since
megaflow.parallel installs the wrappers when it is first imported). Torch's own internal calls are
untouched. The cost is a Python call, a dict lookup and a deque append per collective (~1 µs), far
below any collective's latency; --flight-recorder-size 0 turns recording off. On NCCL, torch's own
flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE) records the kernels' side; this one records megaflow's.
"""
from __future__ import annotations

import collections
import faulthandler
import functools
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist

# Collectives: every member of the group must call them, in the same order.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast",
               "reduce", "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object",
               "gather_object", "broadcast_object_list", "scatter_object_list")
# Not isend/irecv: P2POp checks that its op *is* torch's isend or irecv, so they stay unwrapped (megaflow
# sends through batch_isend_irecv, which records its ops).
POINT_TO_POINT = ("send", "recv", "batch_isend_irecv")


class FlightRecorder:
    def __init__(self, size: int = 32):
        self.entries = collections.deque(maxlen=max(size, 1))
        self.enabled = size > 0
        self.counts: dict = {}         # group key (tuple of global ranks) -> collectives issued on it
        self.in_flight = None          # the entry of a synchronous collective still running (or that raised)
        self._group_keys: dict = {}    # id(group) -> group key
        self._lock = threading.Lock()

    def resize(self, size: int) -> None:
        self.enabled = size > 0
        self.entries = collections.deque(self.entries, maxlen=max(size, 1))

    def group_key(self, group) -> tuple:
        key = self._group_keys.get(id(group))
        if key is None:
            if group is None or group is dist.GroupMember.WORLD:
                key = tuple(range(dist.get_world_size()))
            else:
                key = tuple(dist.get_process_group_ranks(group))
            self._group_keys[id(group)] = key
        return key

    def record(self, name: str, group, tensor=None, peers=None) -> dict:
        """Count and remember one collective (or point-to-point batch) this rank is issuing."""
        entry = {"name": name, "time": time.time(), "shape": tuple(getattr(tensor, "shape", ()) or ())}
        if peers is not None:
            entry["peers"] = peers
        else:
            key = self.group_key(group)
            with self._lock:
                n = self.counts.get(key, 0) + 1
                self.counts[key] = n
            entry["group"], entry["seq"] = key, n
        self.entries.append(entry)
        return entry

    def counts_snapshot(self) -> dict:
        with self._lock:  # read from a heartbeat thread while the main thread may be adding a group
            return dict(self.counts)

    def report(self) -> str:
        lines = [f"latest {len(self.entries)} collectives issued by this rank (oldest first; seq = number of "
                 "collectives issued on that group so far):"]
        for e in list(self.entries):
            when = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] % 1 * 1000):03d}"
            where = (f"group {list(e['group'])} seq {e['seq']}" if "group" in e else f"peers {e['peers']}")
            lines.append(f"  {when} {e['name']:<24} {where} shape {list(e['shape'])}")
        if self.in_flight is not None:
            e = self.in_flight
            lines.append(f"still inside (or failed in): {e['name']} on group {list(e.get('group', ()))} "
                         f"seq {e.get('seq')}")
        return "\n".join(lines)


_recorder = FlightRecorder()


def get() -> FlightRecorder:
    return _recorder


def _first_tensor(args, kwargs):
    for a in list(args[:2]) + [kwargs.get("tensor"), kwargs.get("output_tensor")]:
        if hasattr(a, "shape"):
            return a
    return None


def _wrap_collective(name, fn):
    @functools.wraps(fn)
    def recorded(*args, **kwargs):
        rec = _recorder
        # Inside a torch.compile'd region (--compile) the collective is traced into the graph: recording
        # there would be a Python side effect, i.e. a graph break.
        if not rec.enabled or torch.compiler.is_compiling() or not dist.is_initialized():
            return fn(*args, **kwargs)
        entry = rec.record(name, kwargs.get("group"), _first_tensor(args, kwargs))
        if kwargs.get("async_op"):
            work = fn(*args, **kwargs)
            return _RecordedWork(work, entry) if work is not None else None
        rec.in_flight = entry
        result = fn(*args, **kwargs)   # on an exception in_flight stays set: the collective that failed
        rec.in_flight = None
        return result
    recorded._megaflow_recorded = True
    return recorded


class _RecordedWork:
    """The handle of an asynchronous collective: waiting on it marks the collective as in flight, so a
    timeout surfacing in wait() is attributed to it."""
    __slots__ = ("_work", "_entry")

    def __init__(self, work, entry):
        self._work, self._entry = work, entry

    def wait(self, *args, **kwargs):
        _recorder.in_flight = self._entry
        result = self._work.wait(*args, **kwargs)
        _recorder.in_flight = None
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _wrap_point_to_point(name, fn):
    @functools.wraps(fn)
    def recorded(*args, **kwargs):
        rec = _recorder
        if rec.enabled and not torch.compiler.is_compiling() and dist.is_initialized():
            if name == "batch_isend_irecv":
                ops = args[0] if args else kwargs.get("p2p_op_list", [])
                peers = [f"{getattr(op.op, '__name__', 'op')}:{op.peer}" for op in ops]
            else:
                peers = [args[1] if len(args) > 1 else kwargs.get("dst", kwargs.get("src"))]
            rec.record(name, None, _first_tensor(args, kwargs), peers=peers)
        return fn(*args, **kwargs)
    recorded._megaflow_recorded = True
    return recorded


def install() -> None:
    """Wrap torch.distributed's collective and point-to-point functions (once per process)."""
    for name in COLLECTIVES + POINT_TO_POINT:
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "_megaflow_recorded", False):
            continue
        wrap = _wrap_point_to_point if name in POINT_TO_POINT else _wrap_collective
        setattr(dist, name, wrap(name, fn))


def dump(path: str, header: str = "", error: BaseException | None = None) -> str:
    """Write this rank's Python stacks (every thread), the traceback of `error` (where this rank's
    collective failed) and its latest collectives to `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(header.rstrip() + "\n")
        if error is not None:
            f.write("\nThe failure, where it was raised:\n" + "".join(traceback.format_exception(error)))
        f.write("\nPython stacks (most recent call first):\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.write("\n" + _recorder.report() + "\n")
    return path
