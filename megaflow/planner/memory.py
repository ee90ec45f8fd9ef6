"""Model-state bytes per rank: parameters, gradients and optimizer state, exactly as optim/ allocates them.

The optimizer (optim/grad_buffer.py, optim/distrib_optimizer.py) keeps, per model chunk, a flat parameter
buffer (model dtype) and a flat fp32 gradient buffer, laid out in backward order (reverse registration)
and cut into buckets of about --ddp-bucket-size elements; a tied embedding shared between the first and
last stage gets a bucket of its own; each bucket is padded to a multiple of DP. The optimizer updates
"pieces": each parameter's elements this rank owns (all of them, or with ZeRO the part inside shard
dp_rank of each bucket). Per owned element Adam keeps m and v (fp32) and a 4-byte step per piece; SGD
with momentum one fp32 buffer; low-precision parameters add an fp32 main copy.

    plain DP, fp32 params:  4Φ + 4Φ + 8Φ          ZeRO, fp32 params:  4Φ + 4Φ + 8Φ/d
    plain DP, bf16 params:  2Φ + 4Φ + 12Φ         ZeRO, bf16 params:  2Φ + 4Φ + 12Φ/d
plus bucket padding (< d elements per bucket) and the step scalars. --zero-stage 2 keeps only the
shard of the gradients (4Φ/d, optim/sharded_grads.py); --zero-stage 3 also only an fp32 shard of the
parameters (4Φ/d: 16Φ/d in all), its buckets one per layer plus one for the rest of each chunk
(optim/zero3.py), and `gathered` is what its hooks hold at most inside a step: the chunk's own unit
and the two largest layers, whole, in the model dtype (every layer with --no-reshard-after-forward).
"""
from __future__ import annotations

from megaflow.config import Config
from megaflow.optim.grad_buffer import DEFAULT_BUCKET_SIZE, aligned_layout, bucket_params
from megaflow.planner.params import Param, rank_parameters


def buckets(params: list[Param], bucket_size: int, dp: int) -> list[tuple[list[tuple[Param, int, int]], int]]:
    """[(members (param, start, end) inside the bucket, padded size)], in buffer order."""
    groups = bucket_params(list(reversed(params)), bucket_size, numel=lambda p: p.numel,
                           shared_embedding=lambda p: p.shared_embedding)
    out = []
    for group in groups:
        spans, padded = aligned_layout([p.numel for p in group], dp)
        out.append(([(p, lo, hi) for p, (lo, hi) in zip(group, spans)], padded))
    return out


def _zero3_buckets(params: list[Param], dp: int, edp: int, keep_gathered: bool = False) -> tuple[list, list[int]]:
    """Stage 3's buckets (zero3.Zero3Sync._plan_units: each layer, then the rest of the chunk, the
    tied embedding alone; an MoE layer's experts in a bucket of the expert buffer, padded to expert-DP)
    as (members, padded, shards), and the elements of the units gathered at most at once (every unit
    with --no-reshard-after-forward)."""
    layers, rest = {}, []
    for q in params:
        if q.name.startswith("layers."):
            layers.setdefault(int(q.name.split(".")[1]), []).append(q)
        else:
            rest.append(q)
    units = [layers[i] for i in sorted(layers, reverse=True)] + ([rest] if rest else [])
    dense, expert, sizes = [], [], []
    for unit in units:
        d = buckets([q for q in unit if not q.expert], 1 << 62, dp)
        e = buckets([q for q in unit if q.expert], 1 << 62, edp)
        dense += [(m, padded, dp) for m, padded in d]
        expert += [(m, padded, edp) for m, padded in e]
        sizes.append(sum(padded for _m, padded in d + e))
    n = len(layers)
    return dense + expert, sizes if keep_gathered else sorted(sizes[:n], reverse=True)[:2] + sizes[n:]


def _param_bytes(cfg: Config) -> int:
    t = cfg.training
    low = getattr(t, "low_precision_params", False) and (t.bf16 or t.fp16)
    return 2 if low else 4


def expert_data_parallel_size(cfg: Config) -> int:
    """Ranks holding the same experts: the stage's TP×CP×DP ranks / (ETP × EP) (parallel/state.py)."""
    p = cfg.parallel
    per_stage = p.tensor_model_parallel_size * p.context_parallel_size * cfg.data_parallel_size
    return per_stage // ((p.expert_tensor_parallel_size or p.tensor_model_parallel_size) * p.expert_model_parallel_size)


def model_state_bytes(cfg: Config, pp_rank: int = 0, dp_rank: int = 0, edp_rank: int | None = None) -> dict:
    """Bytes one rank of pipeline stage pp_rank (and data-parallel rank dp_rank) holds for model states.
    MoE experts sit in a buffer of their own per chunk, padded and ZeRO-sharded over expert-DP (its
    rank edp_rank, by default dp_rank modulo its size)."""
    p, t = cfg.parallel, cfg.training
    dp, edp = cfg.data_parallel_size * p.context_parallel_size, expert_data_parallel_size(cfg)  # ZeRO: DP×CP
    sharded = p.use_distributed_optimizer
    size = getattr(p, "ddp_bucket_size", None) or DEFAULT_BUCKET_SIZE
    pbytes = _param_bytes(cfg)
    stage = getattr(p, "zero_stage", 1) if sharded else 0
    buffer = held = owned = pieces = nparams = gathered = 0
    e_rank = dp_rank % edp if edp_rank is None else edp_rank
    for chunk in rank_parameters(cfg, pp_rank):
        chunk = [q for q in chunk if q.trainable]
        nparams += sum(q.numel for q in chunk)
        if stage == 3:
            keep = not getattr(p, "reshard_after_forward", True)
            chunk_buckets, unit_sizes = _zero3_buckets(chunk, dp, edp, keep)
            # kept whole from forward to backward, every chunk of an interleaved stage is whole at once
            gathered = gathered + sum(unit_sizes) * pbytes if keep else max(gathered, sum(unit_sizes) * pbytes)
        else:
            chunk_buckets = [(m, padded, dp) for m, padded in buckets([q for q in chunk if not q.expert], size, dp)] \
                + [(m, padded, edp) for m, padded in buckets([q for q in chunk if q.expert], size, edp)]
        for members, padded, n in chunk_buckets:
            rank = e_rank if members[0][0].expert else dp_rank
            buffer += padded
            held += padded // n
            lo, hi = (rank * padded // n, (rank + 1) * padded // n) if sharded else (0, padded)
            for _param, start, end in members:
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    owned += overlap
                    pieces += 1
    main = owned * 4 if pbytes != 4 and stage != 3 else 0  # stage 3's fp32 shard is the main copy
    if t.optimizer == "adam":
        state = owned * 8 + pieces * 4
    elif t.sgd_momentum:
        state = owned * 4
    else:
        state = 0
    params_held = held * 4 if stage == 3 else buffer * pbytes
    return {"parameters": params_held, "gradients": held * 4 if stage >= 2 else buffer * 4,
            "optimizer": main + state, "main_params": main, "optimizer_state": state, "num_parameters": nparams,
            "owned_elements": owned, "gathered": gathered, "full_parameters": buffer * pbytes}
