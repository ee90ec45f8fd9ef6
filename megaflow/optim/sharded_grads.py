"""ZeRO-2 gradients: each bucket is reduce-scattered on every micro-batch into a shard the rank keeps.

Stage 1 (optim/grad_buffer.py) accumulates every micro-batch into a full fp32 gradient buffer and
reduce-scatters it once per step. Here no full buffer exists: a bucket's gradients are gathered into
a transient fp32 buffer as backward produces them (a post-accumulate hook copies p.grad in, scaled by
1/DP, and frees it), and as soon as the bucket is complete it is reduce-scattered, asynchronously;
the rank adds the part it receives into its kept shard. Between micro-batches a rank holds only
shards of the gradients: 4Φ/DP instead of 4Φ, for DP times more gradient traffic when there are
several micro-batches (DeepSpeed's trade of communication for memory).

    per chunk:   grad_shard  [bucket 0 shard | bucket 1 shard | ...]   fp32, kept across micro-batches
                 param_data  [bucket 0 | bucket 1 | ...]               model dtype, full (stage 2)
    per bucket:  grad_full   [padded]                                 fp32, only while it fills / flies

"DP" is DP×CP here, as in stage 1: context-parallel ranks hold the same weights. MoE experts (flagged
`expert_parallel`) get a buffer of their own per chunk, sharded over expert-DP (the ranks holding the
same experts), with the same 1/DP scale: their gradients already hold every EP rank's tokens.
The bucket layout and shard arithmetic are stage 1's (grad_buffer.Bucket, bucket_params): a rank owns
elements shard(dp_rank) of every bucket, so the optimizer's pieces, the checkpoint format and the
parameter all-gather after the step are the same. Stage 3 (optim/zero3.py) also shards parameters.
At most `max_in_flight` reduce-scatters are in flight; older ones are completed first, which bounds
the transient gradient memory to a few buckets.
"""
from __future__ import annotations

import torch

from megaflow.optim.grad_buffer import (DEFAULT_BUCKET_SIZE, Bucket, GradSync, bucket_params, is_expert,
                                        lay_out_buckets, sum_replicated_grads)
from megaflow.parallel import collectives, state


class ShardedBuffer:
    """One chunk's buckets with only this rank's shard of their fp32 gradients. Parameters: a full
    buffer in the model dtype (stage 2), or only a shard in fp32 (stage 3, `shard_params`)."""

    def __init__(self, chunk, groups: list, dp_size: int, dp_rank: int, shard_params: bool = False, group=None):
        params = [p for g in groups for p in g]
        self.chunk = chunk  # (stage 2's --overlap-param-gather hooks its modules, as stage 1's)
        # The group the buckets are sharded over, as GradBuffer has it (GradSync reads it per bucket).
        self.group, self.dp_size, self.dp_rank = group, dp_size, dp_rank
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"a model chunk mixes parameter dtypes {dtypes}")
        self.param_dtype, device = params[0].dtype, params[0].device
        self.buckets, self.numel = lay_out_buckets(groups, dp_size, self)
        self.grad_shard = torch.zeros(self.numel // dp_size, dtype=torch.float32, device=device)
        shard_dtype = torch.float32 if shard_params else self.param_dtype
        self.param_shard = torch.zeros(self.numel // dp_size, dtype=shard_dtype, device=device) if shard_params else None
        self.param_data = None if shard_params else torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.bucket_of = {}
        with torch.no_grad():
            for b in self.buckets:
                lo, hi = b.start // dp_size, (b.start + b.padded) // dp_size
                b.grad_shard, b.grad_full, b.microbatches = self.grad_shard[lo:hi], None, 0
                if shard_params:
                    full = torch.zeros(b.padded, dtype=self.param_dtype, device=device)
                    for p, (p_lo, p_hi) in b.offsets.items():
                        full[p_lo:p_hi].copy_(p.data.reshape(-1))
                    s_lo, s_hi = b.shard(dp_rank, dp_size)
                    b.param_shard = self.param_shard[lo:hi]
                    b.param_shard.copy_(full[s_lo:s_hi])
                    b.param_data = full  # the gather target; its storage is freed between uses
                else:
                    b.param_data = self.param_data[b.start:b.start + b.padded]
                    for p, (p_lo, p_hi) in b.offsets.items():
                        b.param_data[p_lo:p_hi].copy_(p.data.reshape(-1))
                for p, (p_lo, p_hi) in b.offsets.items():
                    p.data = b.param_data[p_lo:p_hi].view(p.shape)
                    p.grad, p.main_grad = None, None
                    self.bucket_of[p] = b

    @property
    def params(self):
        return list(self.bucket_of)


class ShardedGradSync(GradSync):
    """The GradSync interface (optim/distrib_optimizer.py uses it) over ShardedBuffers: gradients
    reduce-scattered per micro-batch (stage 2). The parameter all-gather after the step and
    --overlap-param-gather's forward hooks are stage 1's (inherited: same bucket.param_data)."""

    max_in_flight = 2

    def __init__(self, chunks: list, bucket_size: int | None = None, shard_params: bool = False,
                 groups_of=None):
        """groups_of(chunk): the chunk's parameter groups, one per bucket, in backward order (default:
        stage 1's bucket_params by --ddp-bucket-size)."""
        st = state.get()
        # Sharded over DP×CP as stage 1 (grad_buffer.GradSync): CP ranks hold the same weights.
        self.dp_size, self.dp_rank = st.dp_size * st.cp_size, st.cp_rank + st.cp_size * st.dp_rank
        self.group = st.groups.get("dp_cp")
        self.overlap, self.reduce_scatter = True, True  # always from the hooks, always a reduce-scatter
        bucket_size = bucket_size or DEFAULT_BUCKET_SIZE
        if groups_of is None:
            def groups_of(chunk):
                params = [p for p in chunk.parameters() if p.requires_grad]
                if not params:
                    raise ValueError("a model chunk without trainable parameters")
                dense, expert = [p for p in params if not is_expert(p)], [p for p in params if is_expert(p)]
                return bucket_params(dense[::-1], bucket_size) + bucket_params(expert[::-1], bucket_size)
        # MoE experts: a buffer of their own per chunk, sharded over expert-DP (as stage 1's).
        self.buffers = []
        for c in chunks:
            groups = groups_of(c)
            dense = [g for g in ([p for p in g if not is_expert(p)] for g in groups) if g]
            expert = [g for g in ([p for p in g if is_expert(p)] for g in groups) if g]
            if dense:
                self.buffers.append(ShardedBuffer(c, dense, self.dp_size, self.dp_rank, shard_params, self.group))
            if expert:
                self.buffers.append(ShardedBuffer(c, expert, st.edp_size, st.edp_rank, shard_params,
                                                  st.groups.get("edp")))
        self.num_microbatches = 1
        self.launched_in_backward = 0
        self.gathers_waited_in_forward = 0
        self._in_flight = []  # (bucket, handle, received shard), oldest first
        self._order = [b for buf in reversed(self.buffers) for b in buf.buckets]
        for buf in self.buffers:
            for p in buf.params:
                old = getattr(p, "_megaflow_grad_hook", None)
                if old is not None:
                    old.remove()
                p._megaflow_grad_hook = p.register_post_accumulate_grad_hook(self._make_hook(buf))
        self.start_step(1)

    # -- per step ------------------------------------------------------------------------------
    @torch.no_grad()
    def start_step(self, num_microbatches: int) -> None:
        self._drain(0)
        self.num_microbatches = num_microbatches
        for buf in self.buffers:
            buf.grad_shard.zero_()
            for b in buf.buckets:
                b.pending, b.microbatches, b.grad_full, b.launched = len(b.params), 0, None, False
            for p in buf.params:
                p.grad = None

    def _make_hook(self, buf: ShardedBuffer):
        def hook(p):
            with torch.no_grad():
                b = buf.bucket_of[p]
                if b.microbatches >= self.num_microbatches:
                    raise RuntimeError("a gradient arrived after its bucket's last reduction: a parameter was "
                                       "used more often than once per micro-batch, or train_step was given "
                                       "the wrong number of micro-batches")
                if b.grad_full is None:  # each parameter writes its range once: only the padding is zeroed
                    b.grad_full = torch.empty(b.padded, dtype=torch.float32, device=b.grad_shard.device)
                    for gap_lo, gap_hi in b.padding():
                        b.grad_full[gap_lo:gap_hi].zero_()
                lo, hi = b.offsets[p]
                grad, scale = p.grad.reshape(-1), 1.0 / self.dp_size  # the 1/DP of the average
                if grad.dtype == torch.float32:  # scaled as it is copied: one pass, the same product
                    torch.mul(grad, scale, out=b.grad_full[lo:hi])
                else:  # to fp32 first, then scaled in fp32 while the range is in cache
                    b.grad_full[lo:hi].copy_(grad).mul_(scale)
                p.grad = None
                b.pending -= 1
                if b.pending == 0:
                    self._launch(b)
                    self.launched_in_backward += 1
                    self._bucket_done(b)
        return hook

    def _bucket_done(self, b: Bucket) -> None:
        """A bucket's reduction for this micro-batch was launched (stage 3 frees parameters here)."""

    def _launch(self, b: Bucket) -> None:
        b.pending, b.microbatches = len(b.params), b.microbatches + 1
        full, b.grad_full = b.grad_full, None
        if b.buffer.dp_size == 1:
            b.grad_shard.add_(full)
            return
        received = torch.empty_like(b.grad_shard)
        handle = collectives.reduce_scatter(received, full, group=b.buffer.group, async_op=True)
        self._in_flight.append((b, handle, received, full))
        # On gloo each reduction also holds a received copy of its bucket (parallel/collectives.py):
        # one in flight there keeps the transient gradients within the same three buckets.
        self._drain(1 if collectives.holds_input_copy(full, b.buffer.group) else self.max_in_flight)

    def _drain(self, keep: int) -> None:
        """Complete the oldest reductions until at most `keep` are in flight."""
        while len(self._in_flight) > keep:
            b, handle, received, _full = self._in_flight.pop(0)
            handle.wait()
            b.grad_shard.add_(received)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Wait for every reduction, check every bucket saw all micro-batches, then the non-DP sums."""
        self.finish_param_sync()
        self._drain(0)
        for b in self._order:
            if b.microbatches != self.num_microbatches or b.grad_full is not None:
                raise RuntimeError(f"bucket {b.index} was reduced for {b.microbatches} of {self.num_microbatches} "
                                   "micro-batches: one of its parameters took no part in "
                                   "backward, or train_step was given the wrong number of micro-batches")
        sum_replicated_grads([(p, g) for p, g, _m in self.piece_tensors()])

    # -- what the optimizer sees ---------------------------------------------------------------
    def owned_range(self, b: Bucket, sharded: bool) -> tuple[int, int]:
        return b.shard(b.buffer.dp_rank, b.buffer.dp_size)

    def piece_views(self, p, b: Bucket, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameter values, gradient) of p's flat elements [lo, hi), which this rank owns: views into
        the kept shards (and, at stage 2, into the full parameter)."""
        s_lo = self.owned_range(b, True)[0]
        i = b.offsets[p][0] + lo - s_lo
        grad = b.grad_shard[i:i + hi - lo]
        model = b.param_shard[i:i + hi - lo] if getattr(b, "param_shard", None) is not None \
            else p.data.view(-1)[lo:hi]
        return model, grad

    def piece_tensors(self):
        for p, b, lo, hi in self.owned_pieces(True):
            model, grad = self.piece_views(p, b, lo, hi)
            yield p, grad, model

    # -- sizes ---------------------------------------------------------------------------------
    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for buf in self.buffers
                   for t in (buf.param_data, buf.param_shard) if t is not None)

    def grad_bytes(self) -> int:
        return sum(buf.grad_shard.numel() * 4 for buf in self.buffers)
