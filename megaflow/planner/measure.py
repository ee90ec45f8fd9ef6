"""Measure activation memory the way the planner predicts it: bytes of the tensors autograd keeps for
backward, alive at the same time, deduplicated by storage, parameters excluded.

`ActivationMeter` wraps every saved tensor (torch.autograd.graph.saved_tensors_hooks); a storage counts
from the first time it is saved until backward drops its last holder. Activation recompute hides the
recomputed tensors from such hooks (torch's checkpoint installs its own inside), so while the meter is
active megaflow's `random.checkpoint` is wrapped: the region is first run once more on detached inputs
to measure what its recompute will keep, and those bytes are added while the region's backward runs
(from the gradient reaching its output to the gradient reaching its inputs).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from megaflow.parallel import random as mf_random


class _Holder:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class ActivationMeter:
    def __init__(self, exclude=()):
        self.exclude = {_key(p) for p in exclude}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._ends: dict[int, list] = {}  # id(tensor) -> end-of-region callbacks waiting on its gradient

    # saved_tensors_hooks ----------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        key = _key(t)
        if key in self.exclude or t.device.type == "meta":
            return t
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.add(self.sizes[key])
        self.refs[key] = self.refs.get(key, 0) + 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor if isinstance(holder, _Holder) else holder

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes[key]

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    @contextlib.contextmanager
    def active(self):
        """Count inside this block (recompute regions included)."""
        real = mf_random.checkpoint
        mf_random.checkpoint = self._metered_checkpoint(real)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield self
        finally:
            mf_random.checkpoint = real

    def _metered_checkpoint(self, real):
        meter = self

        def checkpoint(fn, *args):
            tensors = [a for a in args if torch.is_tensor(a)]
            region = ActivationMeter(exclude=tensors)
            region.exclude |= meter.exclude
            mf_random._ensure_seeded()
            tracker = mf_random.get_rng_tracker()
            saved_states = tracker.get_states()
            with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(
                    region.pack, region.unpack):
                detached = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                            for a in args]
                fn(*detached)
            tracker.set_states(saved_states)
            extra = region.peak
            out = real(fn, *args)
            state = {"added": False}

            def start(grad):
                # The gradient reaching this region's output is the one that completes the region after
                # it (its input): end that one first. Hooks on one tensor run in registration order,
                # which would otherwise count both regions' recomputed activations at once.
                for finish in meter._ends.pop(id(out), []):
                    finish(grad)
                if not state["added"]:
                    meter.add(extra)
                    state["added"] = True

            def end(grad):
                if state["added"]:
                    meter.live -= extra
                    state["added"] = False

            if out.requires_grad:
                out.register_hook(start)
                for a in tensors:
                    if a.requires_grad:
                        a.register_hook(end)
                        meter._ends.setdefault(id(a), []).append(end)
            return out

        return checkpoint


def measure_step(model, batches, forward_backward, num_microbatches: int, **kw) -> dict:
    """Peak activation bytes of one forward-backward step (any schedule function) over `batches`."""
    params = list(model.parameters())
    meter = ActivationMeter(exclude=params)
    model.train()
    with meter.active():
        forward_backward(model, iter(batches), num_microbatches, **kw)
    return {"peak": meter.peak, "still_live": meter.live}


def allocated_model_state_bytes(model, optimizer) -> dict:
    """Bytes the engine really holds for model states, read from the tensors themselves (unique
    storages): parameters, gradients (p.main_grad buffers, else p.grad), and optimizer state (the torch
    optimizer's state tensors plus any separate fp32 main parameters it updates)."""
    def unique_bytes(tensors):
        seen = {}
        for t in tensors:
            if t is not None and torch.is_tensor(t):
                seen[_key(t)] = t.untyped_storage().nbytes()
        return sum(seen.values())

    params = list(model.parameters())
    model_keys = {_key(p) for p in params}
    torch_opt = getattr(optimizer, "optimizer", optimizer)
    opt_params = [q for g in torch_opt.param_groups for q in g["params"]]
    states = [t for s in torch_opt.state.values() for t in s.values()]
    return {"parameters": unique_bytes(params),
            "gradients": unique_bytes(getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None
                                      else p.grad for p in params),
            "optimizer": unique_bytes(states) + unique_bytes(q for q in opt_params if _key(q) not in model_keys)}
