"""Worker for test_context_parallel_planner.py (2 gloo ranks, CP = 2): each rank measures the activation
peak of one forward-backward step (autograd's saved tensors, planner/measure.py) on its zigzag share of
the micro-batches, next to the planner's prediction, for each --cp-comm-type, packed documents and
selective recompute; and the same model at CP = 1 (planned only: one rank would hold the whole
sequence). Results: OUT_DIR/<name>_rank<r>.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megaflow.model import build_model
from megaflow.parallel import state
from megaflow.pipeline import schedules
from megaflow.planner.activations import stage_activation_bytes
from megaflow.planner.measure import measure_step
from megaflow.training.step import _forward_step, _split_for_context_parallel, autocast_context
from tests.distributed.planner_worker import VOCAB, make_cfg

BASE = dict(hidden_dropout=0.0, attention_dropout=0.0, global_batch_size=4, seq_length=64)
CONFIGS = {
    "llama_p2p": dict(model_style="llama", cp_comm_type="p2p"),
    "llama_a2a": dict(model_style="llama", cp_comm_type="a2a"),
    "gpt2_all_gather": dict(model_style="gpt2", cp_comm_type="all_gather"),
    "llama_p2p_selective": dict(model_style="llama", recompute_granularity="selective"),
    "llama_packed": dict(model_style="llama", reset_attention_mask=True, reset_position_ids=True),
}


def batches(cfg, m, cp_rank, cp_size):
    g = torch.Generator().manual_seed(5)
    s, b = cfg.data.seq_length, cfg.training.micro_batch_size
    out = []
    for _ in range(m):
        batch = {"tokens": torch.randint(0, VOCAB, (b, s), generator=g),
                 "labels": torch.randint(0, VOCAB, (b, s), generator=g), "loss_mask": torch.ones(b, s),
                 "position_ids": torch.arange(s).repeat(b, 1)}
        if cfg.data.reset_attention_mask:
            batch["cu_seqlens"] = torch.tensor([[0, 10, 37, s]]).repeat(b, 1)
            batch["position_ids"] = torch.cat([torch.arange(n) for n in (10, 27, s - 37)]).repeat(b, 1)
        out.append(_split_for_context_parallel(batch, cp_rank, cp_size))
    return out


def run(name, out):
    cfg = make_cfg(**{**BASE, **CONFIGS[name]}, context_parallel_size=2)
    st = state.initialize(1, 1, backend="gloo", timeout_minutes=2.0, device="cpu", cp=2)
    m = cfg.training.global_batch_size // (cfg.training.micro_batch_size * cfg.data_parallel_size)
    model = build_model(cfg)
    measured = measure_step(model, batches(cfg, m, st.cp_rank, st.cp_size), schedules.get_forward_backward_func(),
                            m, autocast_ctx=autocast_context(cfg), forward_step_func=_forward_step)
    one = make_cfg(**{**BASE, **CONFIGS[name]})   # CP = 1 (DP = 2): one micro-batch's whole sequence
    result = {"measured": measured["peak"], "predicted": stage_activation_bytes(cfg, 0, "cpu")["peak"],
              "predicted_cp1": stage_activation_bytes(one, 0, "cpu")["peak"]}
    with open(os.path.join(out, f"{name}_rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(result, fh)


def main():
    out = sys.argv[1]
    for name in CONFIGS:
        run(name, out)
    state.destroy()


if __name__ == "__main__":
    main()
