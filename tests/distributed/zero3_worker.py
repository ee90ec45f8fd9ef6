"""Worker for test_zero3.py: the layout worker's runs, plus what only ZeRO-2/3 runs need measured in
the training process: the bytes model states actually hold (every tensor storage reachable from the
parameters and the optimizer, walked object by object, not computed from a formula) at rest and at
their peak inside a step, the parameters gathered at most at once, and greedy generation."""
import gc
import json
import os
import sys

import torch
from torch import nn

from megaflow.inference.generation import generate
from megaflow.optim.distrib_optimizer import MegaflowOptimizer
from megaflow.optim.sharded_grads import ShardedGradSync
from megaflow.optim.zero3 import Zero3Sync
from megaflow.parallel import state
from tests.distributed.runs import run

_SKIP = (nn.Module, type, type(sys), type(run), type(print), type(len.__call__))


def reachable_bytes(*roots) -> int:
    """Bytes of the distinct tensor storages reachable from roots through containers, object
    attributes and .grad (model modules are not entered: their caches are not model states)."""
    seen, storages, stack = set(), {}, list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            s = obj.untyped_storage()
            if s.nbytes():
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(vars(obj).values())  # attributes set on tensors (main_grad, ...)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            stack.extend(gc.get_referents(obj))
    return sum(storages.values())


CURRENT, PEAK = {}, {"bytes": 0}


def _model_state_bytes(opt) -> int:
    return reachable_bytes(opt, [p for c in opt.chunks for p in c.parameters()])


def _instrument():
    init, gather, launch = MegaflowOptimizer.__init__, Zero3Sync._gather, ShardedGradSync._launch

    def new_init(self, *a, **k):
        init(self, *a, **k)
        CURRENT["opt"], PEAK["bytes"] = self, 0

    def measured(fn):
        def wrapper(self, *a, **k):  # right after the moments memory grows: a gather, a grad bucket
            out = fn(self, *a, **k)
            if "opt" in CURRENT and CURRENT["opt"].sync is self and not getattr(self, "summoned", False):
                PEAK["bytes"] = max(PEAK["bytes"], _model_state_bytes(CURRENT["opt"]))
            return out
        return wrapper

    MegaflowOptimizer.__init__ = new_init
    Zero3Sync._gather, ShardedGradSync._launch = measured(gather), measured(launch)


def extras(trainer) -> dict:
    opt = trainer.optimizer
    out = {"rest_bytes": _model_state_bytes(opt), "peak_bytes": PEAK["bytes"],
           "peak_gathered": getattr(opt.sync, "peak_gathered_bytes", None),
           "gathers": getattr(opt.sync, "gathers", None),
           "bucket_sizes": [b.padded for buf in opt.sync.buffers for b in buf.buckets],
           "largest_parameter": max(p.numel() for buf in opt.sync.buffers for p in buf.params)}
    if isinstance(opt.sync, Zero3Sync):
        out["unit_bytes"] = {u.name: u.full_bytes() for u in opt.sync.units}
    st = state.get()
    if st.tp_size == st.pp_size == 1:
        with torch.no_grad():
            out["generated"] = generate(trainer.model, [5, 17, 42, 7], 6)
    return out


if __name__ == "__main__":
    _instrument()
    out_dir, configs = sys.argv[1], json.load(open(sys.argv[2]))
    for name, args in configs.items():
        result = run(args, extra=extras)
        torch.save(result, os.path.join(out_dir, f"{name}.rank{result['rank']}.pt"))
    state.destroy()
