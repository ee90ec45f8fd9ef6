"""Worker for test_perf_layouts.py: --compile and --gradient-accumulation-fusion on 2 gloo ranks,
each layout trained twice from the same seed and data, eagerly without fusion and with both options;
the per-step losses of the two go to OUT_DIR/<name>_rank<r>.json. One launch runs every layout:

    tp2_sp      TP=2 with sequence parallelism (collectives inside the compiled blocks)
    dp2_zero    DP=2, distributed optimizer (ZeRO-1) with --overlap-grad-reduce (the fused weights'
                hooks launch the bucket reductions) and --overlap-param-gather (pre-hooks of the
                modules inside a block wait for their parameters' all-gathers)
    dp2_zero2   DP=2, ZeRO-2: gradients reduce-scattered from the post-accumulate hooks every micro-batch
    dp2_zero3   DP=2, ZeRO-3: the block's own hooks gather and free its parameters outside its graph
    pp2_1f1b    PP=2, 1F1B, full activation recompute
    pp2_inter   PP=2, interleaved (2 chunks per rank)
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from megaflow.config import config_from_kwargs, set_vocab_size, virtual_pipeline_size
from megaflow.model import build_model
from megaflow.optim.optimizer import build_optimizer
from megaflow.parallel import state
from megaflow.training.step import train_step

VOCAB, SEQ, MBS, STEPS, M = 100, 16, 2, 2, 2
LAYOUTS = {
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "dp2_zero": dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True),
    "dp2_zero2": dict(use_distributed_optimizer=True, zero_stage=2),
    "dp2_zero3": dict(use_distributed_optimizer=True, zero_stage=3),
    "pp2_1f1b": dict(pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1),
    "pp2_inter": dict(pipeline_model_parallel_size=2, num_layers=4, num_layers_per_virtual_pipeline_stage=1),
}


def make_cfg(layout, **kw):
    args = dict(model_style="llama", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                micro_batch_size=MBS, hidden_dropout=0.0, attention_dropout=0.0, lr=1e-2, seed=11,
                attention_backend="torch", norm_backend="torch", distributed_timeout_minutes=5)
    args.update(LAYOUTS[layout])
    dp = 2 // (args.get("tensor_model_parallel_size", 1) * args.get("pipeline_model_parallel_size", 1))
    args.update(global_batch_size=MBS * M * dp, **kw)
    cfg = config_from_kwargs(world_size=2, **args)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batches(st, n):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n * st.dp_size):
        t = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MBS, SEQ)})
    return out[st.dp_rank * n:(st.dp_rank + 1) * n]


def losses(cfg):
    p = cfg.parallel
    st = state.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, backend="gloo", device="cpu",
                          timeout_minutes=p.distributed_timeout_minutes, virtual_pp=virtual_pipeline_size(cfg))
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    data = iter(batches(st, STEPS * M))
    out = [train_step(cfg, model, opt, None, data, M).loss for _ in range(STEPS)]
    opt.finish_param_sync()
    return out


def main(out_dir):
    from torch._dynamo.utils import counters
    for name in LAYOUTS:
        eager = losses(make_cfg(name))
        breaks_before = sum(counters["graph_break"].values())
        fusion = LAYOUTS[name].get("zero_stage", 1) == 1  # ZeRO-2/3 keep no main_grad to fuse into
        fast = losses(make_cfg(name, compile=True, gradient_accumulation_fusion=fusion))
        with open(os.path.join(out_dir, f"{name}_rank{dist.get_rank()}.json"), "w") as fh:
            json.dump({"eager": eager, "compiled_fused": fast, "is_last": state.get().is_last_stage,
                       "graph_breaks": sum(counters["graph_break"].values()) - breaks_before,
                       # graphs compiled so far in this process (a layout whose blocks match an
                       # earlier layout's reuses that graph)
                       "graphs_compiled": counters["stats"]["unique_graphs"]}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
