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

# A tiny Llama whose vocabulary (299 + EOD = 300 ids) pads differently per layout: 384 rows at TP=1,
# 512 at TP=2. Padding takes no part in the loss, so every layout must still give the same run; the
# comparisons below use the real rows, and every padding row must stay exactly 0.
LLAMA = ["--model-style", "llama", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "299",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--num-workers", "0", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--log-interval", "1000", "--eval-interval", "2", "--eval-iters", "1",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--clip-grad", "0.05",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4"]
GPT2 = [a if a != "llama" else "gpt2" for a in LLAMA]
# DeepSeek-V3's attention (issue 19): multi-latent, with a query latent and YaRN; its heads are sized by
# their own flags and share keys through the latent, so no grouped-query flags.
_MHA = LLAMA[:LLAMA.index("--group-query-attention")] + LLAMA[LLAMA.index("--num-query-groups") + 2:]
MLA = _MHA + ["--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16",
              "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12"]
DEEPSEEK_MLA = MLA + ["--q-lora-rank", "24", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
                      "--original-max-position-embeddings", "16", "--mscale", "0.9", "--mscale-all-dim", "1.0"]
VOCAB_TENSORS = ("word_embeddings.weight", "output_layer.weight")  # rows past cfg.vocab_size: padding


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


def split_padding(weights: dict, vocab_size: int) -> tuple[dict, float]:
    """(weights with the vocabulary tensors cut to their real rows, max |padding row value|)."""
    real, pad = {}, 0.0
    for name, w in weights.items():
        if name in VOCAB_TENSORS:
            pad = max(pad, w[vocab_size:].abs().max().item() if w.shape[0] > vocab_size else 0.0)
            w = w[:vocab_size]
        real[name] = w
    return real, pad


def run(args, extra=None) -> dict:
    """extra(trainer) -> dict: more entries for the result, computed after training (optional)."""
    trainer = _Trainer(parse_args([str(a) for a in args]))
    opt = trainer.optimizer
    # AdamW and clipping are blind to a uniform scale of the gradient: record the global gradient
    # norm of every step, which is not (a wrong 1/DP or a missing reduction shows there).
    norms, norm_of = [], opt.grad_norm
    opt.grad_norm = lambda: norms.append(norm_of()) or norms[-1]
    result = trainer.run()
    cfg = trainer.cfg
    with opt.gathered_parameters():  # ZeRO-3 keeps only shards between forwards
        weights, padding_max = split_padding(full_weights(model_chunks(trainer.model)), cfg.vocab_size)
    return {"losses": result.losses, "skipped": result.skipped_iterations, "grad_norms": norms,
            "padded_vocab_size": cfg.padded_vocab_size, "padding_max": padding_max,
            "iteration": result.iteration, "consumed_samples": result.consumed_samples,
            "weights": weights,                              # real rows only: layout-independent
            "memory": opt.memory_bytes(), "measured_state": opt.measured_state_bytes(),
            "launched_in_backward": opt.sync.launched_in_backward,
            "gathers_waited_in_forward": opt.sync.gathers_waited_in_forward,
            "gathers": getattr(opt.sync, "gathers", None),                  # ZeRO-3's all-gathers
            "peak_gathered": getattr(opt.sync, "peak_gathered_bytes", None),
            "full_parameter_bytes": sum(p.numel() * p.element_size() for c in model_chunks(trainer.model)
                                        for p in c.parameters()),
            "valid_losses": result.valid_losses,
            "num_buckets": sum(len(b.buckets) for b in opt.sync.buffers),
            # elements of each bucket that belong to no parameter (alignment gaps and the tail)
            "bucket_padding": [sum(hi - lo for lo, hi in b.padding()) for buf in opt.sync.buffers for b in buf.buckets],
            "bucket_params": [len(b.params) for buf in opt.sync.buffers for b in buf.buckets],
            "rank": state.get().rank, "dp_size": state.get().dp_size, **(extra(trainer) if extra else {})}


def reference(args) -> dict:
    """The same run in this (pytest) process, world size 1: what every layout is compared with."""
    try:
        return run(args)
    finally:
        state.destroy()
