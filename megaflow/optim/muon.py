"""Muon (--optimizer muon): orthogonalised momentum updates for the 2-D weights of the transformer layers,
AdamW for everything else (embeddings, output layer, norms, biases), with Megatron-LM's flags.

Per Muon weight W with gradient G (Megatron-LM / Emerging-Optimizers semantics; torch.optim.Muon is the
same with --muon-use-nesterov, --muon-scale-mode shape_scaling, --muon-no-split-qkv):

    B ← μ·B + (1−μ)·G                        momentum (--muon-momentum μ)
    U ← (1−μ)·G + μ·B if Nesterov else B     (--muon-use-nesterov)
    O ← NewtonSchulz(U)                      k quintic iterations (--muon-num-ns-steps) on the *full* matrix
    W ← W·(1 − lr·wd) − lr·scale(m, n)·extra·O

Newton-Schulz needs the whole matrix, while the pieces megaflow's optimizer updates are TP shards and,
with ZeRO, DP shards of buckets. So:
  * TP: every TP rank all-gathers U over the TP group, rebuilds the single-process matrix
    (layers/sharding.unshard, fused QKV/SwiGLU blocks included), orthogonalises it and keeps its own
    shard. The TP ranks compute the same thing; the gather is one matrix per weight.
  * ZeRO (--use-distributed-optimizer): each Muon weight is assigned whole to one DP rank (largest
    first, to the least loaded rank), which keeps its momentum and updates it; gradients are then
    all-reduced rather than reduce-scattered (the owner needs the whole gradient), and after the step
    each DP rank broadcasts the weights it updated. AdamW's state stays sharded by bucket as usual.
  * --muon-split-qkv (default, as Megatron-LM): the Q, K and V blocks of the fused QKV weight are
    orthogonalised (and scaled) as separate matrices.
The momentum buffer is per element, so checkpoints save and reshard it like Adam's moments.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaflow.layers.sharding import shard, unshard
from megaflow.parallel import state

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon; also torch.optim.Muon's and Megatron's default).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def is_muon_param(name: str, param) -> bool:
    """The 2-D weights of the transformer layers (not embeddings, the output layer, norms or biases)."""
    return param.ndim == 2 and (name.startswith("layers.") or ".layers." in name)


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U·S'·Vᵀ, S' ≈ 1), in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def scale_factor(rows: int, cols: int, mode: str) -> float:
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "spectral":
        return math.sqrt(max(rows, cols))
    if mode == "unit_rms_norm":
        return math.sqrt(rows / cols)
    raise ValueError(f"unknown --muon-scale-mode {mode!r}")


def assign_owners(params: list, dp_size: int) -> dict:
    """Each Muon weight to one DP rank, balancing elements: largest first, to the least loaded rank
    (ties: the lower rank; equal sizes keep model order). Identical on every rank."""
    load = [0] * dp_size
    owner = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(dp_size), key=lambda r: (load[r], r))
        owner[params[i]] = r
        load[r] += params[i].numel()
    return owner


def owned_pieces(muon_params: set, owner: dict | None):
    """For MegaflowOptimizer: the (param, bucket, lo, hi) this rank updates. Muon weights whole (on their
    owner with ZeRO, everywhere without), the rest as the buckets shard them."""
    def pieces(sync, sharded: bool):
        dp_rank = state.get().dp_rank
        for p, b, lo, hi in sync.owned_pieces(sharded):
            if p not in muon_params:
                yield p, b, lo, hi
        for buf in sync.buffers:
            for b in buf.buckets:
                for p in b.offsets:
                    if p in muon_params and (owner is None or owner[p] == dp_rank):
                        yield p, b, 0, p.numel()
    return pieces


class MuonWithAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose 2-D layer weights are updated by Muon instead. Its tensors are the pieces'
    fp32 main tensors (flat); `piece_of` maps each to its optimizer piece (parameter, global name), and
    Muon pieces are always a whole (TP-shard of a) parameter. Muon state: 'momentum_buffer', 'step'."""

    def __init__(self, params, *, piece_of: dict, muon_params: list, owner: dict | None, muon: dict, **adamw):
        super().__init__(params, **adamw)
        self.piece_of = piece_of  # filled by build_muon_optimizer once the pieces exist
        self.muon_params, self.owner, self.muon = muon_params, owner, muon
        self.muon_set = set(muon_params)

    def state_bytes(self, pieces) -> int:
        """Bytes of optimizer state for these pieces: a momentum buffer for Muon's, Adam's two moments
        for the others, and a float32 step each."""
        return sum((pc.hi - pc.lo) * (4 if pc.param in self.muon_set else 8) + 4 for pc in pieces)

    @torch.no_grad()
    def step(self, closure=None):
        muon_set = self.muon_set
        split = []
        for group in self.param_groups:
            mine = [t for t in group["params"] if self.piece_of[id(t)].param in muon_set]
            split.append((group, group["params"], mine))
            group["params"] = [t for t in group["params"] if self.piece_of[id(t)].param not in muon_set]
        try:
            loss = super().step(closure)   # AdamW on everything else
        finally:
            for group, everything, _mine in split:
                group["params"] = everything
        for group, _everything, mine in split:
            for t in mine:
                self._muon_update(t, group)
        self._share_updated_weights()
        return loss

    def _muon_update(self, t, group) -> None:
        pc = self.piece_of[id(t)]
        p, cfg = pc.param, self.muon
        grad = t.grad.view(p.shape)
        st = self.state[t]
        if "momentum_buffer" not in st:
            # A step count too: Adam's state handling (load_state_dict) expects one in every state.
            st["step"], st["momentum_buffer"] = torch.tensor(0.0), torch.zeros_like(t)
        st["step"] += 1
        buf = st["momentum_buffer"]
        mu = cfg["momentum"]
        buf.lerp_(t.grad, 1 - mu)
        update = grad.lerp(buf.view(p.shape), mu) if cfg["nesterov"] else buf.view(p.shape)
        ortho, scale = self._orthogonalize(update, p, pc.name)
        lr, wd = group["lr"], group["weight_decay"]
        w = t.view(p.shape)
        w.mul_(1 - lr * wd)
        w.add_(ortho, alpha=-lr * scale)
        if pc.main is not pc.model:
            pc.model.copy_(pc.main)  # the owner's model copy, before it is broadcast

    def _orthogonalize(self, update, p, name: str) -> torch.Tensor:
        """(O, scale): NS of the full matrix (or of each QKV block) as this rank's shard, and the factor
        it is scaled by (folded into O, in fp32, when the blocks' factors differ)."""
        st, cfg = state.get(), self.muon
        full = update
        sharded = getattr(p, "tensor_parallel", False) and st.tp_size > 1
        if sharded:
            parts = [torch.empty_like(update) for _ in range(st.tp_size)]
            dist.all_gather(parts, update.contiguous(), group=st.groups["tp"])
            full = unshard(parts, p.partition_dim, p.fused_sizes)
        dtype = torch.float32 if cfg["fp32_matmul_prec"] == "high" else torch.bfloat16
        blocks = [full]
        fused = getattr(p, "fused_sizes", None)
        if cfg["split_qkv"] and fused and "linear_qkv" in name:
            blocks = list(full.split(list(fused), dim=p.partition_dim))
        scales = [scale_factor(b.size(0), b.size(1), cfg["scale_mode"]) * cfg["extra_scale_factor"] for b in blocks]
        outs = [newton_schulz(b, cfg["num_ns_steps"], dtype) for b in blocks]
        if len(outs) == 1:
            ortho, scale = outs[0], scales[0]
        else:
            ortho, scale = torch.cat([o.float() * s for o, s in zip(outs, scales)], dim=p.partition_dim), 1.0
        if sharded:
            ortho = shard(ortho, p.partition_dim, st.tp_rank, st.tp_size, p.fused_sizes)
        return ortho, scale

    def _share_updated_weights(self) -> None:
        """ZeRO: each DP rank updated the Muon weights it owns; broadcast them, one message per owner."""
        st = state.get()
        if self.owner is None or st.dp_size == 1:
            return
        group, ranks = st.groups["dp"], st.ranks["dp"]
        for r in range(st.dp_size):
            params = [p for p in self.muon_params if self.owner[p] == r]
            if not params:
                continue
            flat = torch.cat([p.data.reshape(-1) for p in params])
            dist.broadcast(flat, src=ranks[r], group=group)
            if r != st.dp_rank:
                offset = 0
                for p in params:
                    p.data.view(-1).copy_(flat[offset:offset + p.numel()])
                    offset += p.numel()


def build_muon_optimizer(cfg, chunks: list, weight_decay_of):
    """MegaflowOptimizer whose torch optimizer is MuonWithAdamW (called by optim/optimizer.py)."""
    from megaflow.optim.distrib_optimizer import MegaflowOptimizer
    t, p = cfg.training, cfg.parallel
    muon_params = [param for chunk in chunks for name, param in chunk.named_parameters()
                   if is_muon_param(name, param)]
    sharded = p.use_distributed_optimizer
    owner = assign_owners(muon_params, state.get().dp_size) if sharded else None
    piece_of = {}
    muon = {"momentum": t.muon_momentum, "nesterov": t.muon_use_nesterov, "split_qkv": t.muon_split_qkv,
            "scale_mode": t.muon_scale_mode, "fp32_matmul_prec": t.muon_fp32_matmul_prec,
            "num_ns_steps": t.muon_num_ns_steps, "extra_scale_factor": t.muon_extra_scale_factor}

    def make(groups):
        return MuonWithAdamW(groups, piece_of=piece_of, muon_params=muon_params, owner=owner, muon=muon, lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    # With ZeRO the owner of a Muon weight needs its whole gradient: stage 1 with all-reduced gradients.
    opt = MegaflowOptimizer(chunks, make, weight_decay_of, sharded=sharded, zero_stage=1, whole_grads=True,
                            bucket_size=p.ddp_bucket_size, overlap_grad_reduce=p.overlap_grad_reduce,
                            overlap_param_gather=p.overlap_param_gather,
                            owned_pieces=owned_pieces(set(muon_params), owner))
    piece_of.update({id(pc.main): pc for pc in opt.pieces})
    return opt
