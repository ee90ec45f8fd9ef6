"""Train one configuration with the real trainer and collect what layout-equivalence tests compare:
losses, the full (TP-unsharded) final weights by global name, memory figures, skipped steps.

Used in both the single-process reference (pytest process) and the torchrun workers."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.config import parse_args
from megaflow.layers.sharding import unshard
from megaflow.model.init import global_name
from megaflow.optim.optimizer import model_chunks
from megaflow.parallel import state
from megaflow.training.trainer import _Trainer

# A tiny Llama whose padded vocabulary is the same at TP=1 and TP=2 (255 + EOD = 256 = 128·2):
# padding rows take part in the softmax, so the padded size must not change with the layout.
LLAMA = ["--model-style", "llama", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "255",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--num-workers", "0", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--log-interval", "1000", "--eval-interval", "2", "--eval-iters", "1",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--clip-grad", "0.05",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4"]
GPT2 = [a if a != "llama" else "gpt2" for a in LLAMA]


@torch.no_grad()
def full_weights(chunks) -> dict:
    """{global name: full tensor (fp32)} of this rank's chunks, TP shards gathered."""
    st = state.get()
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            t = p.detach().float()
            if getattr(p, "tensor_parallel", False) and st.tp_size > 1:
                parts = [torch.empty_like(t) for _ in range(st.tp_size)]
                dist.all_gather(parts, t.contiguous(), group=st.groups["tp"])
                t = unshard(parts, p.partition_dim, p.fused_sizes)
            out[global_name(chunk, name)] = t.clone()
    return out


def run(args, extra=None) -> dict:
    """extra(trainer) -> dict: more entries for the result, computed after training (optional)."""
    trainer = _Trainer(parse_args([str(a) for a in args]))
    opt = trainer.optimizer
    # AdamW and clipping are blind to a uniform scale of the gradient: record the global gradient
    # norm of every step, which is not (a wrong 1/DP or a missing reduction shows there).
    norms, norm_of = [], opt.grad_norm
    opt.grad_norm = lambda: norms.append(norm_of()) or norms[-1]
    result = trainer.run()
    with opt.gathered_parameters():  # ZeRO-3 keeps only shards between forwards
        weights = full_weights(model_chunks(trainer.model))
    return {"losses": result.losses, "skipped": result.skipped_iterations, "grad_norms": norms,
            "iteration": result.iteration, "consumed_samples": result.consumed_samples,
            "weights": weights,
            "memory": opt.memory_bytes(), "measured_state": opt.measured_state_bytes(),
            "launched_in_backward": opt.sync.launched_in_backward,
            "gathers_waited_in_forward": opt.sync.gathers_waited_in_forward,
            "valid_losses": result.valid_losses,
            "num_buckets": sum(len(b.buckets) for b in opt.sync.buffers),
            "bucket_padding": [b.padded - b.numel for buf in opt.sync.buffers for b in buf.buckets],
            "rank": state.get().rank, "dp_size": state.get().dp_size, **(extra(trainer) if extra else {})}


def reference(args) -> dict:
    """The same run in this (pytest) process, world size 1: what every layout is compared with."""
    try:
        return run(args)
    finally:
        state.destroy()
