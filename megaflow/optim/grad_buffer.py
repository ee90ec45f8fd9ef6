"""Data-parallel gradient reduction: contiguous parameter and gradient buffers cut into buckets.

For each model chunk (one per virtual pipeline stage on this rank), every parameter's data and fp32
gradient live in two flat buffers, laid out in *backward order* (reverse registration order, so the
bucket holding the last layers fills first) and cut into buckets of about --ddp-bucket-size elements:

    param_data  [bucket 0 | bucket 1 | ...]   model dtype; p.data is a view into it
    grad_data   [bucket 0 | bucket 1 | ...]   fp32; p.main_grad is a view into it

Each bucket is padded to a multiple of the data-parallel size, so it splits into DP equal shards: the
ZeRO optimizer owns shard dp_rank of every bucket. A parameter marked `shared_embedding` (the tied word
embedding, whose gradient is summed between the first and last pipeline stage) gets a bucket of its
own, so both stages shard it identically and the embedding-group sum can run on shards.

Gradients reach the buffer without a copy for fp32 parameters (p.grad *is* the main_grad view: autograd
accumulates in place); for bf16/fp16 parameters a post-accumulate hook adds p.grad into the fp32 view
and frees it. The same hook counts: once a bucket has seen one gradient per parameter per micro-batch
(train_step says how many micro-batches), its gradients are final and its reduction can start. With
--overlap-grad-reduce that happens from the hook, asynchronously, while backward continues with earlier
layers; buckets are launched strictly in bucket order so every DP rank issues the same collectives in
the same order. finish_grad_sync() launches whatever is left and waits for all.

The reduction averages over DP by scaling the bucket by 1/DP and summing (gloo has no PREMUL_SUM):
an all-reduce (plain DP and ZeRO-1: every rank has the full average) or a reduce-scatter (ZeRO-2: each
rank gets only its shard of the average, in place in its part of the bucket).
Expert parameters (MoE, flagged `expert_parallel`) live in a buffer of their own per chunk, reduced and
ZeRO-sharded over the expert-data-parallel group (the ranks holding the same experts) instead of DP,
with the same 1/DP scale: their gradients already hold the contributions of every EP rank's tokens.
Then, on the part of each bucket this rank owns, the sums that are not over DP: the tied embedding
over the embedding group, and the sequence-parallel replicated parameters over TP (each TP rank saw
only its part of the sequence). All of these are sums, so their order does not matter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaflow.parallel import collectives, state

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, Megatron-LM's default with --overlap-grad-reduce


class Bucket:
    """A contiguous run of parameters in one chunk's buffers, reduced as one collective."""

    def __init__(self, index: int, params: list, offsets: dict, start: int, numel: int, padded: int):
        self.index, self.params, self.start, self.numel, self.padded = index, params, start, numel, padded
        self.offsets = offsets          # param -> (start, end) of its elements inside the bucket
        self.param_data = self.grad_data = None
        self.pending = 0                # gradient hooks still expected this step
        self.grad_handle = None         # async reduction in flight (or done, not yet waited)
        self.launched = False
        self.param_handle = None        # async all-gather of updated parameters (ZeRO)

    def padding(self) -> list:
        """[(start, end)] of the bucket's elements that belong to no parameter (alignment and the tail)."""
        gaps, n = [], 0
        for lo, hi in sorted(self.offsets.values()):
            if lo > n:
                gaps.append((n, lo))
            n = hi
        return gaps + ([(n, self.padded)] if n < self.padded else [])

    def shard(self, rank: int, size: int) -> tuple[int, int]:
        n = self.padded // size
        return rank * n, (rank + 1) * n


# Every parameter starts, and every bucket shard starts and ends, on a multiple of this many elements
# (as Megatron-LM pads its buffers): the vectorised optimizer kernels then split a ZeRO shard of a
# parameter into the same vector lanes and scalar tail as the whole parameter, so the sharded update
# is bit-identical to the unsharded one (torch's fused CPU AdamW rounds its tail differently), and
# GPU accesses stay aligned.
ALIGN = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_layout(numels: list, dp_size: int) -> tuple[list, int]:
    """[(start, end)] of consecutive tensors of these sizes in one bucket, each start a multiple of
    ALIGN, and the bucket's padded size: a multiple of dp_size * ALIGN, so it splits into dp_size
    aligned shards. The planner (planner/memory.py) lays out its buckets with it too."""
    spans, n = [], 0
    for numel in numels:
        spans.append((n, n + numel))
        n = _round_up(n + numel, ALIGN)
    return spans, _round_up(max(n, 1), dp_size * ALIGN)


def lay_out_buckets(groups: list, dp_size: int, buffer) -> tuple[list, int]:
    """Buckets for consecutive parameter groups in one flat buffer, laid out by aligned_layout; returns
    (buckets, total elements). Each bucket knows its buffer."""
    buckets, start = [], 0
    for i, group in enumerate(groups):
        spans, padded = aligned_layout([p.numel() for p in group], dp_size)
        buckets.append(Bucket(i, group, dict(zip(group, spans)), start, spans[-1][1], padded))
        buckets[-1].buffer = buffer
        start += padded
    return buckets, start


def bucket_params(params: list, bucket_size: int, numel=lambda p: p.numel(),
                  shared_embedding=lambda p: getattr(p, "shared_embedding", False)):
    """Group parameters (already in backward order) into buckets; a shared embedding sits alone.
    The planner (megaflow/planner/memory.py) groups its parameter descriptions with the same rule."""
    buckets, current, current_numel = [], [], 0
    for p in params:
        if shared_embedding(p):
            if current:
                buckets.append(current)
            buckets.append([p])
            current, current_numel = [], 0
            continue
        current.append(p)
        current_numel += numel(p)
        if current_numel >= bucket_size:
            buckets.append(current)
            current, current_numel = [], 0
    if current:
        buckets.append(current)
    return buckets


class GradBuffer:
    """The flat parameter and gradient buffers of one model chunk, and its buckets."""

    def __init__(self, chunk: nn.Module, bucket_size: int, dp_size: int, expert: bool | None = None,
                 group=None, dp_rank: int = 0):
        """expert: None takes every trainable parameter; False only dense ones, True only expert ones.
        group / dp_size / dp_rank: the group the buffer is reduced (and ZeRO-sharded) over."""
        params = [p for p in chunk.parameters() if p.requires_grad
                  and (expert is None or is_expert(p) == expert)]
        if not params:
            raise ValueError("a model chunk without trainable parameters")
        self.chunk, self.group, self.dp_size, self.dp_rank = chunk, group, dp_size, dp_rank
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"a model chunk mixes parameter dtypes {dtypes}")
        self.param_dtype = params[0].dtype
        device = params[0].device
        self.buckets, self.numel = lay_out_buckets(bucket_params(list(reversed(params)), bucket_size), dp_size, self)
        self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.bucket_of = {}
        with torch.no_grad():
            for b in self.buckets:
                b.param_data = self.param_data[b.start:b.start + b.padded]
                b.grad_data = self.grad_data[b.start:b.start + b.padded]
                for p, (lo, hi) in b.offsets.items():
                    b.param_data[lo:hi].copy_(p.data.reshape(-1))
                    p.data = b.param_data[lo:hi].view(p.shape)
                    p.main_grad = b.grad_data[lo:hi].view(p.shape)
                    p.grad = p.main_grad if p.dtype == torch.float32 else None
                    self.bucket_of[p] = b

    @property
    def params(self):
        return list(self.bucket_of)


class GradSync:
    """Buffers of every model chunk, the hooks that fill them, and their reduction over DP."""

    def __init__(self, chunks: list, bucket_size: int | None = None, overlap: bool = False,
                 reduce_scatter: bool = False):
        st = state.get()
        # Dense gradients are averaged (and ZeRO shards owned) over DP×CP: context-parallel ranks hold
        # the same weights and saw other tokens. The index in that group is cp + CP·dp (rank order).
        self.dp_size, self.dp_rank = st.dp_size * st.cp_size, st.cp_rank + st.cp_size * st.dp_rank
        self.group = st.groups.get("dp_cp")
        self.overlap, self.reduce_scatter = overlap, reduce_scatter
        self.buffers = []
        for c in chunks:
            size = bucket_size or DEFAULT_BUCKET_SIZE
            has_expert = any(is_expert(p) for p in c.parameters() if p.requires_grad)
            if not has_expert or any(not is_expert(p) for p in c.parameters() if p.requires_grad):
                self.buffers.append(GradBuffer(c, size, self.dp_size, expert=False if has_expert else None,
                                               group=self.group, dp_rank=self.dp_rank))
            if has_expert:
                self.buffers.append(GradBuffer(c, size, st.edp_size, expert=True, group=st.groups.get("edp"),
                                               dp_rank=st.edp_rank))
        self.num_microbatches = 1
        self._next = 0  # index into self._order of the next bucket to launch
        self.launched_in_backward = 0  # buckets whose reduction a hook started (a count for tests)
        self.gathers_waited_in_forward = 0  # parameter all-gathers first waited for by a forward hook
        # Launch order: chunks in the order backward finishes them (the last chunk first), then
        # buckets in backward order. Only an ordering for identical issue on every DP rank.
        self._order = [b for buf in reversed(self.buffers) for b in buf.buckets]
        for buf in self.buffers:
            for p in buf.params:
                old = getattr(p, "_megaflow_grad_hook", None)
                if old is not None:
                    old.remove()
                p._megaflow_grad_hook = p.register_post_accumulate_grad_hook(self._make_hook(buf))
        self.start_step(1)

    def enable_gradient_accumulation_fusion(self) -> int:
        """--gradient-accumulation-fusion: mark the linear layers' weights (fusable_grad_accumulation) so
        their backward adds the weight gradient into main_grad itself (layers/linear.py). The
        post-accumulate hook still fires for them, with no gradient to add, and counts as usual.
        Returns how many weights."""
        n = 0
        for buf in self.buffers:
            for p in buf.params:
                if getattr(p, "fusable_grad_accumulation", False):
                    p.accumulate_into_main_grad = True
                    n += 1
        return n

    # -- per step ------------------------------------------------------------------------------
    @torch.no_grad()
    def start_step(self, num_microbatches: int) -> None:
        """Zero the gradients and expect num_microbatches backward passes before reducing."""
        self.num_microbatches = num_microbatches
        for buf in self.buffers:
            buf.grad_data.zero_()
            for b in buf.buckets:
                b.pending = len(b.params) * num_microbatches
                b.grad_handle, b.launched = None, False
            for p in buf.params:
                p.grad = p.main_grad if p.dtype == torch.float32 else None
        self._next = 0
        self._in_flight = []  # launched gloo reduce-scatters, oldest first (_launch bounds them)

    def _make_hook(self, buf: GradBuffer):
        def hook(p):
            with torch.no_grad():
                if p.grad is not None and p.grad.data_ptr() != p.main_grad.data_ptr():
                    p.main_grad.add_(p.grad)  # bf16/fp16 parameter, or a .grad someone replaced
                    p.grad = p.main_grad if p.dtype == torch.float32 else None
            b = buf.bucket_of[p]
            if b.launched:
                raise RuntimeError("a gradient arrived after its bucket was reduced: a parameter was "
                                   "used more often than once per micro-batch, or train_step was given "
                                   "the wrong number of micro-batches")
            b.pending -= 1
            if self.overlap and b.pending == 0:
                self.launched_in_backward += self._launch_ready()
        return hook

    def _launch_ready(self) -> int:
        launched = 0
        while self._next < len(self._order) and self._order[self._next].pending <= 0:
            self._launch(self._order[self._next])
            self._next += 1
            launched += 1
        return launched

    def _launch(self, b: Bucket) -> None:
        b.launched = True
        buf = b.buffer
        if self.dp_size > 1:  # the mean over DP (expert buckets: their sum over expert-DP is that mean · DP)
            b.grad_data.mul_(1.0 / self.dp_size)
        if buf.dp_size == 1:
            return
        if self.reduce_scatter:
            lo, hi = b.shard(buf.dp_rank, buf.dp_size)
            b.grad_handle = collectives.reduce_scatter(b.grad_data[lo:hi], b.grad_data, group=buf.group,
                                                        async_op=True)
            if collectives.holds_input_copy(b.grad_data, buf.group):
                # gloo: each reduction in flight holds a received copy of its bucket; two at most
                self._in_flight.append(b)
                while len(self._in_flight) > 2:
                    old = self._in_flight.pop(0)
                    old.grad_handle.wait()
                    old.grad_handle = None
        else:
            b.grad_handle = dist.all_reduce(b.grad_data, group=buf.group, async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet (in order), wait for all, then the non-DP sums."""
        self.finish_param_sync()  # normally done by the forward hooks; a parameter unused in forward
        while self._next < len(self._order):
            self._launch(self._order[self._next])
            self._next += 1
        for b in self._order:
            if b.grad_handle is not None:
                b.grad_handle.wait()
                b.grad_handle = None
        self._reduce_shared_and_sequence_parallel()

    def owned_range(self, b: Bucket, sharded: bool) -> tuple[int, int]:
        return b.shard(b.buffer.dp_rank, b.buffer.dp_size) if sharded else (0, b.padded)

    def owned_pieces(self, sharded: bool):
        """(param, bucket, lo, hi) for each parameter's elements [lo, hi) (flat, in the parameter)
        that this rank owns: a shard of every bucket with ZeRO, everything without."""
        for buf in self.buffers:
            for b in buf.buckets:
                s_lo, s_hi = self.owned_range(b, sharded)
                for p, (p_lo, p_hi) in b.offsets.items():
                    lo, hi = max(p_lo, s_lo), min(p_hi, s_hi)
                    if lo < hi:
                        yield p, b, lo - p_lo, hi - p_lo

    def _reduce_shared_and_sequence_parallel(self) -> None:
        sum_replicated_grads([(p, p.main_grad.view(-1)[lo:hi])
                              for p, _b, lo, hi in self.owned_pieces(self.reduce_scatter)])

    # -- parameters (ZeRO) ---------------------------------------------------------------------
    def start_param_sync(self) -> None:
        """All-gather every bucket's parameters from the DP shards (async), in forward order."""
        for b in reversed(self._order):
            if b.buffer.dp_size == 1:
                continue
            lo, hi = b.shard(b.buffer.dp_rank, b.buffer.dp_size)
            b.param_handle = collectives.all_gather(b.param_data, b.param_data[lo:hi], group=b.buffer.group,
                                                    async_op=True)

    def finish_param_sync(self, buckets=None) -> int:
        """Wait for the all-gathers of these buckets (default: all); returns how many were pending."""
        waited = 0
        for b in (self._order if buckets is None else buckets):
            if b.param_handle is not None:
                b.param_handle.wait()
                b.param_handle = None
                waited += 1
        return waited

    def _wait_before_forward(self, buckets) -> None:
        self.gathers_waited_in_forward += self.finish_param_sync(buckets)

    def register_param_sync_hooks(self, chunks: list) -> None:
        """--overlap-param-gather: each module waits for its own parameters' all-gather just before its
        forward (the gathers were issued in forward order), and state_dict waits for all."""
        for buf in self.buffers:
            chunk = buf.chunk
            for module in chunk.modules():
                mine = {id(b): b for p in module.parameters(recurse=False) if p in buf.bucket_of
                        for b in [buf.bucket_of[p]]}
                if mine:
                    buckets = list(mine.values())
                    module.register_forward_pre_hook(lambda _m, _a, bs=buckets: self._wait_before_forward(bs))
            chunk.register_state_dict_pre_hook(lambda *_: self.finish_param_sync())

    # -- sizes ---------------------------------------------------------------------------------
    def numel(self) -> int:
        return sum(buf.numel for buf in self.buffers)

    def param_bytes(self) -> int:
        return sum(buf.param_data.numel() * buf.param_data.element_size() for buf in self.buffers)

    def grad_bytes(self) -> int:
        return sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in self.buffers)


def is_expert(param) -> bool:
    """An MoE expert's parameter: split over EP, replicated over expert-DP (layers/moe/experts.py)."""
    return getattr(param, "expert_parallel", False)


def sum_replicated_grads(pieces) -> None:
    """pieces: (param, its gradient or a part of it). Sums the tied-embedding copies' gradients between
    the first and last stage, and over TP the gradients of TP-replicated params that saw only this
    rank's tokens (sequence parallelism)."""
    st = state.get()
    if st.pp_size > 1 and len(st.ranks.get("embedding", [])) > 1:
        all_reduce_coalesced([g for p, g in pieces if getattr(p, "shared_embedding", False)],
                             st.groups["embedding"])
    if st.tp_size > 1:
        all_reduce_coalesced([g for p, g in pieces if getattr(p, "sequence_parallel", False)], st.groups["tp"])


def all_reduce_coalesced(tensors, group, op=dist.ReduceOp.SUM) -> None:
    """One collective for many tensors: flatten, reduce, copy back."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
