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
plus bucket padding (< d elements per bucket) and the step scalars.
"""
from __future__ import annotations

from megaflow.config import Config
from megaflow.optim.grad_buffer import DEFAULT_BUCKET_SIZE, bucket_params
from megaflow.planner.params import Param, rank_parameters


def buckets(params: list[Param], bucket_size: int, dp: int) -> list[tuple[list[tuple[Param, int, int]], int]]:
    """[(members (param, start, end) inside the bucket, padded size)], in buffer order."""
    groups = bucket_params(list(reversed(params)), bucket_size, numel=lambda p: p.numel,
                           shared_embedding=lambda p: p.shared_embedding)
    out = []
    for group in groups:
        members, n = [], 0
        for p in group:
            members.append((p, n, n + p.numel))
            n += p.numel
        out.append((members, -(-n // dp) * dp))
    return out


def _param_bytes(cfg: Config) -> int:
    t = cfg.training
    low = getattr(t, "low_precision_params", False) and (t.bf16 or t.fp16)
    return 2 if low else 4


def model_state_bytes(cfg: Config, pp_rank: int = 0, dp_rank: int = 0) -> dict:
    """Bytes one rank of pipeline stage pp_rank (and data-parallel rank dp_rank) holds for model states."""
    p, t = cfg.parallel, cfg.training
    dp = cfg.data_parallel_size * cfg.parallel.context_parallel_size  # ZeRO shards over DP×CP
    sharded = p.use_distributed_optimizer
    size = getattr(p, "ddp_bucket_size", None) or DEFAULT_BUCKET_SIZE
    pbytes = _param_bytes(cfg)
    buffer = owned = pieces = nparams = 0
    for chunk in rank_parameters(cfg, pp_rank):
        nparams += sum(q.numel for q in chunk)
        for members, padded in buckets(chunk, size, dp):
            buffer += padded
            lo, hi = (dp_rank * padded // dp, (dp_rank + 1) * padded // dp) if sharded else (0, padded)
            for _param, start, end in members:
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    owned += overlap
                    pieces += 1
    main = owned * 4 if pbytes != 4 else 0
    if t.optimizer == "adam":
        state = owned * 8 + pieces * 4
    elif t.sgd_momentum:
        state = owned * 4
    else:
        state = 0
    return {"parameters": buffer * pbytes, "gradients": buffer * 4, "optimizer": main + state,
            "main_params": main, "optimizer_state": state, "num_parameters": nparams,
            "owned_elements": owned}
