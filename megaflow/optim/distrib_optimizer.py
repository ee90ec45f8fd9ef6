"""The optimizer over the gradient buffers: plain data parallelism or ZeRO, fp32 main parameters.

The update itself is torch.optim.AdamW (or SGD) run on *pieces*: for every parameter, the run of its
elements this rank owns (optim/grad_buffer.py): all of them without ZeRO; with ZeRO
(--use-distributed-optimizer) the part inside this rank's shard of each bucket. AdamW is elementwise,
so the update of a piece is exactly the update of those elements of the whole tensor, and the sharded
run computes what torch.optim.AdamW computes on the full model. Per piece:

    model   a view of the parameter's elements in the bucket's param_data (model dtype)
    grad    a view of the same elements of the fp32 grad_data (the reduced gradient)
    main    the fp32 master copy the update acts on: the model view itself for fp32 parameters;
            a separate fp32 tensor for bf16/fp16 parameters (--low-precision-params)

Weight decay follows the whole parameter (no decay on biases and norm weights), as optimizer.py.
With ZeRO, after the step every bucket's parameters are all-gathered from the DP shards (waited at
once, or with --overlap-param-gather by each module just before its next forward).

Memory per rank, Φ parameters on the rank's TP/PP shard, DP = d, Adam (exact bytes: memory_bytes()):
    plain DP, fp32 params:  4Φ params + 4Φ grads + 8Φ Adam
    plain DP, bf16 params:  2Φ params + 4Φ grads + 12Φ (fp32 main + Adam)
    ZeRO-1, fp32 params:    4Φ + 4Φ + 8Φ/d
    ZeRO-1, bf16 params:    2Φ + 4Φ + 12Φ/d   (Megatron-LM's distributed optimizer: 6 + 12/d)
    ZeRO-2, fp32 / bf16:    4Φ + 4Φ/d + 8Φ/d  /  2Φ + 4Φ/d + 12Φ/d   (optim/sharded_grads.py)
    ZeRO-3, any dtype:      4Φ/d fp32 shard (it is the main copy) + 4Φ/d + 8Φ/d = 16Φ/d   (optim/zero3.py)
ZeRO-1 keeps a full fp32 gradient buffer: micro-batches accumulate into it and each bucket is
reduce-scattered once per step. ZeRO-2 and -3 reduce-scatter every micro-batch into kept shards.
"""
from __future__ import annotations

import contextlib

import torch

from megaflow.model.init import global_name
from megaflow.optim import grads
from megaflow.optim.grad_buffer import GradSync
from megaflow.optim.sharded_grads import ShardedGradSync
from megaflow.optim.zero3 import Zero3Sync


class Piece:
    __slots__ = ("param", "name", "bucket", "lo", "hi", "model", "grad", "main")

    def __init__(self, param, name, bucket, lo, hi, views=None):
        self.param, self.name, self.bucket, self.lo, self.hi = param, name, bucket, lo, hi
        if views is None:
            self.model, self.grad = param.data.view(-1)[lo:hi], param.main_grad.view(-1)[lo:hi]
        else:  # ZeRO-2/3: the kept shards (ZeRO-3's parameter shard is fp32: model and main at once)
            self.model, self.grad = views(param, bucket, lo, hi)
        if self.model.dtype == torch.float32:
            self.main = self.model
        else:
            self.main = self.model.detach().float()
        self.main.grad = self.grad


class MegaflowOptimizer:
    """Grad buffers + (optionally sharded) torch optimizer. API used by training/step.py:
    start_step, finish_grad_sync, unscale_and_check, grad_norm, clip_grads, step."""

    def __init__(self, chunks: list, make_optimizer, weight_decay_of, *, sharded: bool = False,
                 zero_stage: int = 1, bucket_size: int | None = None, overlap_grad_reduce: bool = False,
                 overlap_param_gather: bool = False, owned_pieces=None, whole_grads: bool = False,
                 reshard_after_forward: bool = True):
        self.chunks = chunks
        self.sharded = sharded
        self.zero_stage = zero_stage if sharded else 0
        self.overlap_param_gather = overlap_param_gather and sharded
        if self.zero_stage == 3:
            self.sync = Zero3Sync(chunks, bucket_size, reshard_after_forward=reshard_after_forward)
        elif self.zero_stage == 2:
            self.sync = ShardedGradSync(chunks, bucket_size)
        else:
            # whole_grads: every rank gets the whole reduced gradient (all-reduce), for optimizers that
            # update whole matrices on one rank (Muon); else ZeRO-1 reduce-scatters into the shards.
            self.sync = GradSync(chunks, bucket_size, overlap_grad_reduce, reduce_scatter=sharded and not whole_grads)
        self.shards_parameters = self.zero_stage == 3  # checkpoint/: weights are saved from the shards
        views = getattr(self.sync, "piece_views", None)
        names = {p: global_name(c, n) for c in chunks for n, p in c.named_parameters()}
        # owned_pieces(sync, sharded): which elements this rank updates, when not the buckets' shards
        # (optim/muon.py keeps its matrices whole).
        owned = owned_pieces(self.sync, sharded) if owned_pieces else self.sync.owned_pieces(sharded)
        self.pieces = [Piece(p, names[p], b, lo, hi, views) for p, b, lo, hi in owned]
        groups = {}
        for piece in self.pieces:
            groups.setdefault(weight_decay_of(piece.param), []).append(piece.main)
        self.optimizer = make_optimizer([{"params": ps, "weight_decay": wd} for wd, ps in groups.items()])
        if self.overlap_param_gather:
            self.sync.register_param_sync_hooks(chunks)
        # Called before anything changes parameters or optimizer state (prepare_update): e.g. an
        # --async-save whose writer thread is still copying them (checkpoint/staging.py).
        self.before_update: list = []

    # -- the step, in train_step's order -----------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def start_step(self, num_microbatches: int) -> None:
        # Parameter all-gathers of the last step may still be in flight (--overlap-param-gather):
        # each module's forward waits for its own; zeroing gradients does not touch parameters.
        self.sync.start_step(num_microbatches)

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather in flight: call before reading parameters outside a
        forward or state_dict (which wait by themselves)."""
        self.sync.finish_param_sync()

    def finish_grad_sync(self) -> None:
        self.sync.finish_grad_sync()

    def prepare_update(self) -> None:
        """train_step calls this once per step, before the first change to saved state."""
        for wait in self.before_update:
            wait()

    def gathered_parameters(self):
        """Context: every parameter whole, to read weights outside a forward (ZeRO-3 gathers them for
        its duration; the other stages hold them anyway)."""
        self.sync.finish_param_sync()
        gathered = getattr(self.sync, "gathered", None)
        return gathered() if gathered is not None else contextlib.nullcontext()

    def _grads(self):
        return [piece.grad for piece in self.pieces]

    def unscale_and_check(self, scale: float) -> bool:
        return grads.unscale_and_check(self._grads(), scale)

    def grad_norm(self) -> float:
        return grads.global_grad_norm([(pc.param, pc.grad) for pc in self.pieces], over_dp=self.sharded)

    def clip_grads(self, max_norm: float, norm: float) -> None:
        grads.clip_gradients(self._grads(), max_norm, norm)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for piece in self.pieces:
            if piece.main is not piece.model:
                piece.model.copy_(piece.main)
        if self.sharded:
            self.sync.start_param_sync()
            if not self.overlap_param_gather:
                self.sync.finish_param_sync()

    # -- checkpoints: per piece, by global name (checkpoint/save.py, load.py reshard them) ------
    def piece_states(self):
        """(piece, {state name: tensor}) per piece: the torch optimizer's state of the piece (per-element
        tensors of its length, 0-dim scalars such as Adam's step) and, when separate, its fp32 copy as
        'main_param'. Views of live tensors: copy them to keep them."""
        self.sync.finish_param_sync()
        for pc in self.pieces:
            s = {k: v for k, v in self.optimizer.state.get(pc.main, {}).items() if torch.is_tensor(v)}
            if pc.main is not pc.model or pc.param.dtype != pc.main.dtype:
                s["main_param"] = pc.main  # (ZeRO-3 of a bf16/fp16 model: its fp32 shard)
            yield pc, s

    @torch.no_grad()
    def load_piece_states(self, states: list) -> None:
        """Inverse of piece_states, one dict per piece in self.pieces' order: 'main_param' is copied
        into the separate fp32 copy, the rest becomes the torch optimizer's state (through its own
        load_state_dict, which checks and casts). Empty dicts leave a piece's state fresh."""
        order = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        sd = self.optimizer.state_dict()
        sd["state"] = {}
        for pc, s in zip(self.pieces, states, strict=True):
            s = dict(s)
            main = s.pop("main_param", None)
            if main is not None:
                pc.main.copy_(main.view_as(pc.main))
            if s:
                sd["state"][order[id(pc.main)]] = s
        self.optimizer.load_state_dict(sd)

    # -- memory ---------------------------------------------------------------------------------
    def memory_bytes(self) -> dict:
        """Bytes this rank holds for model states (exact once the optimizer state exists; computed
        ahead of the first step from the optimizer type)."""
        owned = sum(pc.hi - pc.lo for pc in self.pieces)
        main = sum(pc.main.numel() * 4 for pc in self.pieces if pc.main is not pc.model)
        opt = self.optimizer
        if hasattr(opt, "state_bytes"):                        # optim/muon.py: Muon and AdamW pieces
            state = opt.state_bytes(self.pieces)
        elif isinstance(opt, (torch.optim.AdamW, torch.optim.Adam)):
            state = owned * 8 + len(self.pieces) * 4         # exp_avg, exp_avg_sq; a float32 step each
        elif isinstance(opt, torch.optim.SGD) and any(g.get("momentum", 0) for g in opt.param_groups):
            state = owned * 4                                 # momentum buffer
        else:
            state = 0
        return {"parameters": self.sync.param_bytes(), "gradients": self.sync.grad_bytes(),
                "optimizer": main + state, "main_params": main, "optimizer_state": state,
                "num_parameters": sum(p.numel() for buf in self.sync.buffers for p in buf.params),
                "owned_elements": owned}

    def measured_state_bytes(self) -> int:
        """Bytes of the tensors the torch optimizer actually holds (for tests)."""
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t))
