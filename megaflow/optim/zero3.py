"""ZeRO-3: parameters, gradients and optimizer state all sharded across data parallelism.

Between uses a rank keeps only its shard of every parameter, in fp32 (the optimizer's main copy, so no
separate model-dtype shard exists). The model file is untouched: module hooks installed from here
gather a *unit*'s parameters when it needs them and free them after:

    forward pre-hook    all-gather the unit (or wait for its prefetch), prefetch the next unit
    forward hook        free the unit (the chunk's own unit: after its backward); register a hook
                        on its output's gradient, which fires just before the unit's backward
    backward pre-hook   gather it again, prefetch the unit whose backward comes next
    post-backward       (post-accumulate gradient hooks, optim/sharded_grads.py) once every gradient
                        of the unit arrived: reduce-scatter it into the kept gradient shard, free it

Units: each transformer layer of a model chunk, and the chunk itself for the parameters outside its
layers (embeddings, final norm, output layer; the tied word embedding is used by the chunk's own
forward for the logits, so only the chunk's hooks enclose every use). The chunk unit stays gathered
from the chunk's forward through its backward (freed after it, gathered again by the next micro-batch's
forward if that comes first, as in 1F1B); so does the last layer when there is no pipeline (its
backward comes next); layers come and go: at most the chunk
unit and two layers (the current one and the prefetched one) are gathered at a time, k + 1 layers
under full recompute of k-layer blocks (a recomputed block runs its layers' forwards together).

Gathering: over DP×CP, or over expert-DP for MoE experts (optim/sharded_grads.py); each bucket's fp32 shard is cast to the model dtype and all-gathered into a flat buffer
whose storage is resized to full size for the gather and to zero to free it; the parameters are
views into it, so autograd's saved references see whatever the storage holds when backward runs.
Prefetches are async collectives (gloo handles on CPU; on CUDA issued from a side stream, the NCCL
collective on its own stream). Every DP rank runs the same modules in the same order, so every rank
issues the same collectives in the same order.

Recompute: a forward that runs inside backward (torch.utils.checkpoint recomputing) gathers what it
needs and frees nothing; the unit is freed after its backward as usual.
Pipeline parallelism: gather and free around every micro-batch's forward and backward, as without it
(each 1F1B step is a module call like any other), so the memory bound is the same. Keeping layers
gathered from a micro-batch's forward to its backward (torchtitan's choice under PP) would hold every
layer of the stage through the 1F1B warm-up, i.e. the whole stage's parameters; it saves one gather
per layer and micro-batch, which the prefetch mostly hides: --no-reshard-after-forward makes that choice
(FSDP2's reshard_after_forward=False), the bound being then the whole chunk.
The bucket layout is stage 1's arithmetic (grad_buffer.Bucket): one bucket per unit (the tied
embedding in one of its own, so both pipeline stages shard it alike), each padded to a multiple of DP.
"""
from __future__ import annotations

import contextlib

import torch

from megaflow.optim.grad_buffer import bucket_params
from megaflow.optim.sharded_grads import ShardedGradSync
from megaflow.parallel import collectives, state
from megaflow.parallel.device import SideStream

FREE, GATHERING, GATHERED = "free", "gathering", "gathered"
_ONE_BUCKET = 1 << 62  # a unit's parameters stay in one bucket (the tied embedding in its own)


def _recomputing() -> bool:
    """True inside backward: a forward there is activation recompute."""
    return torch._C._current_graph_task_id() != -1


def _tensors(out):
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


class Unit:
    """A module whose forward encloses every use of its parameters, and their buckets."""

    def __init__(self, name: str, module, groups: list):
        self.name, self.module, self.groups = name, module, groups
        self.buckets, self.state, self.handles = [], FREE, []
        self.next_forward = self.next_backward = None
        self.pending = 0  # buckets whose reduction for this micro-batch has not been launched

    def full_bytes(self) -> int:
        return sum(b.padded * b.param_data.element_size() for b in self.buckets)


class Zero3Sync(ShardedGradSync):
    """Stage 3 over the chunks of a model: ShardedGradSync's per-micro-batch gradient reduction plus
    parameter shards gathered by module hooks."""

    def __init__(self, chunks: list, bucket_size: int | None = None, prefetch: bool = True,
                 reshard_after_forward: bool = True):
        self.prefetch, self.reshard_after_forward = prefetch, reshard_after_forward
        # Without a pipeline a micro-batch's backward follows its forward at once, starting with the last
        # layer: keeping that layer gathered saves re-gathering it (torchtitan's choice for its last
        # block) within the same bound, the chunk's unit and two layers. Under PP other micro-batches'
        # forwards come between, so every layer is freed there.
        self.keep_last_layer = state.get().pp_size == 1
        self.units_of_chunk = [self._plan_units(c) for c in chunks]
        plans = iter(self.units_of_chunk)
        super().__init__(chunks, bucket_size, shard_params=True,
                         groups_of=lambda _c: [g for u in next(plans) for g in u.groups])
        # A unit's buckets: one per group, or two when an MoE layer's experts sit in the expert buffer.
        bucket_of = {p: b for buf in self.buffers for p, b in buf.bucket_of.items()}
        self.units, self.unit_of = [], {}
        for units in self.units_of_chunk:
            for u in units:
                u.buckets = list(dict.fromkeys(bucket_of[p] for g in u.groups for p in g))
                u.pending = len(u.buckets)
                for b in u.buckets:
                    self.unit_of[b] = u
            self.units += units
        device = self.buffers[0].grad_shard.device
        self.side = SideStream(device)
        self.peak_gathered_bytes = 0  # the most parameter bytes gathered at once (tests, docs)
        self.gathers = 0              # all-gathers issued (tests: prefetch happened)
        self.summoned = False         # inside gathered()
        for u in self.units:
            self._free(u)
        self._hooks = []
        for units in self.units_of_chunk:
            self._link_and_hook(units)

    @staticmethod
    def _plan_units(chunk) -> list:
        """Units of a chunk in backward order (last layer first, the chunk unit last)."""
        layers = list(getattr(chunk, "layers", []))
        in_layers = {p for layer in layers for p in layer.parameters()}
        units = []
        for layer in reversed(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            if params:
                units.append(Unit(f"layer {getattr(layer, 'layer_number', '?')}", layer,
                                  bucket_params(list(reversed(params)), _ONE_BUCKET)))
        rest = [p for p in chunk.parameters() if p.requires_grad and p not in in_layers]
        if rest:
            units.append(Unit("chunk", chunk, bucket_params(list(reversed(rest)), _ONE_BUCKET)))
        if not units:
            raise ValueError("a model chunk without trainable parameters")
        return units

    def _link_and_hook(self, units: list) -> None:
        chunk_unit = units[-1] if units[-1].name == "chunk" else None
        layers = [u for u in reversed(units) if u is not chunk_unit]     # forward order
        forward = ([chunk_unit] if chunk_unit else []) + layers
        for a, b in zip(forward, forward[1:]):
            a.next_forward = b
        for a, b in zip(layers[1:], layers):        # backward: layer i, then layer i - 1
            a.next_backward = b
        if chunk_unit is not None and layers:
            chunk_unit.next_backward = layers[-1]
        for u in forward:
            self._hooks.append(u.module.register_forward_pre_hook(lambda _m, _a, u=u: self._pre_forward(u)))
            self._hooks.append(u.module.register_forward_hook(lambda _m, _a, out, u=u: self._post_forward(u, out)))

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_forward(self, u: Unit) -> None:
        waited = u.state == GATHERING
        self._gather(u)
        self._wait(u)
        self.gathers_waited_in_forward += int(waited)
        if self.prefetch and not _recomputing() and u.next_forward is not None:
            self._gather(u.next_forward)

    def _post_forward(self, u: Unit, out) -> None:
        if _recomputing():
            return  # freed after its backward, which comes next
        hooked = False
        if torch.is_grad_enabled():
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(lambda _g, u=u: self._pre_backward(u))
                    hooked = True
                    break
        last_layer = self.keep_last_layer and u.next_forward is None
        if not hooked or (u.name != "chunk" and self.reshard_after_forward and not last_layer):
            # The chunk's own unit stays until its backward (as FSDP2 keeps its root): the output
            # layer's backward is the first thing backward needs, and the unit is in the bound anyway.
            # --no-reshard-after-forward keeps every unit so (freed after its backward); without PP
            # the last layer too (keep_last_layer).
            self._free(u)

    def _pre_backward(self, u: Unit) -> None:
        self._gather(u)
        self._wait(u)
        if self.prefetch and u.next_backward is not None:
            self._gather(u.next_backward)

    def _bucket_done(self, b) -> None:
        u = self.unit_of[b]
        u.pending -= 1
        if u.pending == 0:
            u.pending = len(u.buckets)
            self._free(u)

    # -- gather and free -----------------------------------------------------------------------
    @torch.no_grad()
    def _gather(self, u: Unit) -> None:
        if u.state != FREE:
            return
        for b in u.buckets:  # allocate on the compute stream: freeing there later is then ordered
            b.param_data.untyped_storage().resize_(b.padded * b.param_data.element_size())
        self.gathers += 1
        with self.side.enter():
            for b in u.buckets:
                send = b.param_shard.to(b.param_data.dtype)  # fp32 main shard -> model dtype
                if b.buffer.dp_size == 1:
                    b.param_data.copy_(send)
                    continue
                handle = collectives.all_gather(b.param_data, send, group=b.buffer.group, async_op=True)
                u.handles.append((handle, send))
        u.state = GATHERING
        if not self.summoned:
            self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes())

    def _wait(self, u: Unit) -> None:
        if u.state != GATHERING:
            return
        for handle, _send in u.handles:
            handle.wait()
        self.side.join(*[send for _h, send in u.handles])
        u.handles, u.state = [], GATHERED

    def _free(self, u: Unit) -> None:
        self._wait(u)  # never free memory a collective still writes into
        for b in u.buckets:
            b.param_data.untyped_storage().resize_(0)
        u.state = FREE

    def gathered_bytes(self) -> int:
        """Parameter bytes gathered right now (storages actually allocated)."""
        return sum(b.param_data.untyped_storage().nbytes() for u in self.units for b in u.buckets)

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter whole for the duration (reading weights outside a forward: tests, export)."""
        self.summoned = True  # not a peak of training: kept out of peak_gathered_bytes
        for u in self.units:
            self._gather(u)
        try:
            for u in self.units:
                self._wait(u)
            yield
        finally:
            for u in self.units:
                self._free(u)
            self.summoned = False

    # -- the GradSync interface ------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        for u in getattr(self, "units", []):
            self._free(u)
            u.pending = len(u.buckets)
        super().start_step(num_microbatches)

    def start_param_sync(self) -> None:
        """After the step the shards are new: nothing to gather now, but no stale copy may remain."""
        for u in self.units:
            self._free(u)

    def finish_param_sync(self, buckets=None) -> int:
        waited = 0
        for u in getattr(self, "units", []):
            waited += int(u.state == GATHERING)
            self._wait(u)
        return waited

    def register_param_sync_hooks(self, chunks: list) -> None:
        """--overlap-param-gather is stage 3's normal mode (prefetch): nothing more to register."""
