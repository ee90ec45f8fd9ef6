"""Enumerate layouts for a model on a cluster, predict memory and step time, rank the feasible ones.

Choices: TP (a divisor of the GPUs per node that divides heads, query groups and ffn: tensor parallelism
stays inside a node), sequence parallelism with TP > 1, PP (dividing the layers), interleaving
(--num-layers-per-virtual-pipeline-stage), DP = the rest, the optimizer (plain, ZeRO-1, ZeRO-2), recompute
(none, selective, full) and the micro-batch size. Every candidate is a real megaflow Config that passed
config.validate, so its flags can be copied into a launch command. Settings the user gave are kept.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from megaflow.config import Config, ConfigError, set_vocab_size, validate
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.memory import model_state_bytes
from megaflow.planner.perf import Cluster, step_time
from megaflow.training.flops import flops_per_iteration

GIB = 1024 ** 3

# Config fields the search varies, by the flag that fixes them.
SEARCHED = {"--tensor-model-parallel-size": "tp", "--pipeline-model-parallel-size": "pp",
            "--num-layers-per-virtual-pipeline-stage": "vpp", "--use-distributed-optimizer": "zero",
            "--zero-stage": "zero", "--recompute-granularity": "recompute", "--micro-batch-size": "mbs",
            "--sequence-parallel": "sp", "--context-parallel-size": "cp", "--cp-comm-type": "cp"}

# Context parallelism is tried for sequences long enough that a rank keeps at least this many tokens.
MIN_TOKENS_PER_CP_RANK = 4096


@dataclass
class Plan:
    cfg: Config
    memory: dict       # bytes on the rank that needs most: parameters, gradients, optimizer, activations
    time: dict         # perf.step_time
    fits: bool
    tokens_per_second: float
    mfu: float

    def flags(self) -> str:
        p, m, t = self.cfg.parallel, self.cfg.model, self.cfg.training
        out = [f"--tensor-model-parallel-size {p.tensor_model_parallel_size}",
               f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}"]
        if p.context_parallel_size > 1:
            out.append(f"--context-parallel-size {p.context_parallel_size} --cp-comm-type {p.cp_comm_type}")
        if p.sequence_parallel:
            out.append("--sequence-parallel")
        if p.num_layers_per_virtual_pipeline_stage:
            out.append(f"--num-layers-per-virtual-pipeline-stage {p.num_layers_per_virtual_pipeline_stage}")
        if p.use_distributed_optimizer:
            out.append("--use-distributed-optimizer")
            if getattr(p, "zero_stage", 1) != 1:
                out.append(f"--zero-stage {p.zero_stage}")
        if p.overlap_grad_reduce:
            out.append("--overlap-grad-reduce")
        if p.overlap_param_gather:
            out.append("--overlap-param-gather")
        if m.recompute_granularity:
            out.append(f"--recompute-granularity {m.recompute_granularity}")
        out.append(f"--micro-batch-size {t.micro_batch_size}")
        return " ".join(out)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def memory_per_rank(cfg: Config, device: str = "cuda") -> dict:
    """Model states + activation peak of the pipeline stage that needs most (DP rank 0)."""
    best = None
    for r in range(cfg.parallel.pipeline_model_parallel_size):
        states = model_state_bytes(cfg, r)
        act = stage_activation_bytes(cfg, r, device)
        mem = {"pp_rank": r, "parameters": states["parameters"], "gradients": states["gradients"],
               "optimizer": states["optimizer"], "activations": act["peak"], "in_flight": act["in_flight"]}
        mem["total"] = mem["parameters"] + mem["gradients"] + mem["optimizer"] + mem["activations"] \
            + states["gathered"]  # ZeRO-3: the layers its hooks hold whole inside a step
        if best is None or mem["total"] > best["total"]:
            best = mem
    return best


def evaluate(cfg: Config, cluster: Cluster, device: str = "cuda") -> Plan:
    mem = memory_per_rank(cfg, device)
    t = step_time(cfg, cluster)
    fits = mem["total"] <= (cluster.memory_gib - cluster.reserved_gib) * GIB
    tokens = cfg.training.global_batch_size * cfg.data.seq_length / t["step"]
    mfu = flops_per_iteration(cfg) / t["step"] / cluster.gpus / (cluster.peak_tflops * 1e12)
    return Plan(cfg, mem, t, fits, tokens, mfu)


def candidates(base: Config, cluster: Cluster, fixed: set = frozenset()):
    """Every valid layout of `base` on the cluster (as Configs); `fixed` names SEARCHED values to keep."""
    m, p, t = base.model, base.parallel, base.training
    gpus = cluster.gpus
    tps = [p.tensor_model_parallel_size] if "tp" in fixed else \
        [d for d in _divisors(cluster.gpus_per_node) if gpus % d == 0]
    for tp in tps:
        pps = [p.pipeline_model_parallel_size] if "pp" in fixed else \
            [d for d in _divisors(gpus // tp) if m.num_layers % d == 0]
        for pp in pps:
            if gpus % (tp * pp):
                continue
            for cp_size in ([p.context_parallel_size] if "cp" in fixed else
                            [c for c in _divisors(gpus // (tp * pp))
                             if c == 1 or base.data.seq_length // c >= MIN_TOKENS_PER_CP_RANK]):
                yield from _layouts(base, cluster, fixed, tp, pp, cp_size)


def _layouts(base: Config, cluster: Cluster, fixed: set, tp: int, pp: int, cp_size: int):
    m, p, t = base.model, base.parallel, base.training
    gpus = cluster.gpus
    dp = gpus // (tp * pp * cp_size)
    per_stage = m.num_layers // pp
    vpps = [p.num_layers_per_virtual_pipeline_stage] if "vpp" in fixed else \
        [None] + ([k for k in _divisors(per_stage) if per_stage // k >= 2] if pp > 1 else [])
    zeros = [(p.use_distributed_optimizer, getattr(p, "zero_stage", 1))] if "zero" in fixed else \
        [(False, 1)] + ([(True, 1), (True, 2), (True, 3)] if dp * cp_size > 1 else [])  # ZeRO: over DP×CP
    recomputes = [m.recompute_granularity] if "recompute" in fixed else [None, "selective", "full"]
    mbss = [t.micro_batch_size] if "mbs" in fixed else [b for b in (1, 2, 4, 8, 16)]
    sps = [p.sequence_parallel] if "sp" in fixed else [tp > 1]
    for vpp, (zero, stage), rc, mbs, sp in itertools.product(vpps, zeros, recomputes, mbss, sps):
        cfg = copy.deepcopy(base)
        cfg.world_size = gpus
        cp, cm, ct = cfg.parallel, cfg.model, cfg.training
        cp.tensor_model_parallel_size, cp.pipeline_model_parallel_size = tp, pp
        cp.context_parallel_size = cp_size
        cp.num_layers_per_virtual_pipeline_stage = vpp
        cp.use_distributed_optimizer = zero
        if hasattr(cp, "zero_stage"):
            cp.zero_stage = stage
        elif zero and stage == 1:
            continue  # this engine has one ZeRO flavour
        cp.sequence_parallel = sp and tp > 1
        cp.overlap_grad_reduce = dp * cp_size > 1
        cp.overlap_param_gather = zero
        cm.recompute_granularity, cm.recompute_method, cm.recompute_num_layers = rc, None, None
        ct.micro_batch_size = mbs
        try:
            validate(cfg)
        except ConfigError:
            continue
        set_vocab_size(cfg, base.vocab_size)
        yield cfg


def search(base: Config, cluster: Cluster, fixed: set = frozenset(), device: str = "cuda") -> list[Plan]:
    """All valid layouts, feasible first, each group fastest first."""
    plans = [evaluate(cfg, cluster, device) for cfg in candidates(base, cluster, fixed)]
    return sorted(plans, key=lambda pl: (not pl.fits, pl.time["step"]))

