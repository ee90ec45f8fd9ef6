"""Distributed overhead: a training step at TP=2 × DP=2 (or, with --tp 1, DP=4) on 4 gloo processes,
megaflow against the PyTorch-native equivalent of the same model (DTensor tensor parallelism + FSDP2
over DP, as torchtitan composes them), in the same processes of the same run.

    megaflow  ColumnParallel/RowParallel layers, vocab-parallel embedding and cross entropy, ZeRO-1
              (--use-distributed-optimizer, --overlap-grad-reduce, --overlap-param-gather: gradients
              reduce-scattered once per step, optimizer state sharded)
    megaflow-zero3  the same with --zero-stage 3: parameters, gradients and optimizer state sharded,
              each layer gathered before its forward and again before its backward (prefetched)
    native    the same Llama in plain nn.Modules; parallelize_module with ColwiseParallel /
              RowwiseParallel (vocab-parallel embedding and output, loss_parallel cross entropy), then
              fully_shard per block and at the root over the DP mesh dimension, torch.optim.AdamW
              fused (torchtitan's default, and megaflow's).
              Two variants: reshard_after_forward=False (gradients and optimizer state sharded,
              parameters kept whole between forward and backward: ZeRO-2-like, the peer of megaflow's
              ZeRO-1) and FSDP2's default True (parameters re-gathered for backward: ZeRO-3, the peer
              of megaflow-zero3)

Both do forward + backward + global-norm clip + AdamW on the same micro-batch per DP rank, fp32. Steps
alternate (A B A B ...) so machine noise hits both alike; a step's time is the slowest rank's; the
median over steps is kept. Prints each step time, tokens/s and the ratio megaflow / native
(< 1: megaflow is faster), and the model-state bytes per rank each holds between steps (megaflow:
its optimizer's figures; FSDP2: the local shards of parameters, gradients and AdamW state), plus the
most parameter bytes megaflow's ZeRO-3 hooks held gathered at once.

    python bench/dist_overhead.py [--steps 10] [--tp 2|1]   (starts torchrun with 4 processes itself)
"""
import argparse
import contextlib
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

TP, DP = 2, 2  # --tp 1: TP, DP = 1, 4


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps of each (after 2 warm-up steps)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tp", type=int, default=2, choices=[1, 2], help="TP size (DP = 4 / TP)")
    a = p.parse_args()
    global TP, DP
    TP, DP = a.tp, 4 // a.tp
    return a


# ---------------------------------------------------------------------------------------------
# The native model: Llama in plain modules (RMSNorm, RoPE rotate-half, SwiGLU, untied output).

class Attention(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.head_dim = h // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(h, h, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        # -1: the local head count once TP has split the projections by columns
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(h, eps=1e-5), nn.RMSNorm(h, eps=1e-5)
        self.attention = Attention(h, heads)
        self.w1, self.w3 = nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False)
        self.w2 = nn.Linear(ffn, h, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        n = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(n)) * self.w3(n))


class Llama(nn.Module):
    def __init__(self, a, ffn):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(Block(a.hidden, a.heads, ffn) for _ in range(a.layers))
        self.norm = nn.RMSNorm(a.hidden, eps=1e-5)
        self.output = nn.Linear(a.hidden, a.vocab, bias=False)
        hd = a.hidden // a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(a.seq).float(), inv)
        self.register_buffer("cos", torch.cat([ang, ang], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([ang, ang], -1).sin(), persistent=False)
        for p in self.parameters():
            if p.ndim > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.output(self.norm(x))


@torch.no_grad()
def clip_grad_norm_mixed_meshes(params, max_norm):
    """clip_grad_norm_ for FSDP2 + TP: TP weights live on the 2-D mesh, norm weights on the DP mesh
    only, and torch's clip_grad_norm_ cannot stack norms of different meshes (torchtitan has the same
    helper): one norm per mesh, made whole, summed in squares."""
    by_mesh = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh, []).append(p.grad)
    sq = sum(torch.nn.utils.get_total_norm(g, foreach=False).full_tensor() ** 2 for g in by_mesh.values())
    coeff = max_norm / (math.sqrt(sq.item()) + 1e-6)
    if coeff < 1.0:
        for grads in by_mesh.values():
            for g in grads:
                g.mul_(coeff)


def native_runner(a, ffn, lr, reshard_after_forward):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                   parallelize_module)
    # Mesh rank layout [dp][tp]: TP varies fastest, as megaflow's TP-DP order.
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Llama(a, ffn)
    if TP > 1:
        parallelize_module(model, mesh["tp"], {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    for block in model.layers:
        if TP > 1:
            parallelize_module(block, mesh["tp"], {
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh["dp"], reshard_after_forward=reshard_after_forward)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        with loss_parallel() if TP > 1 else contextlib.nullcontext():
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        clip_grad_norm_mixed_meshes(model.parameters(), 1.0)
        opt.step()
        return loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item()

    def local_bytes(tensors):
        return sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
                   for t in tensors if t is not None and torch.is_tensor(t) and t.dim() > 0)

    def memory():
        params = list(model.parameters())
        return {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(v for s in opt.state.values() for v in s.values())}
    step.memory = memory
    return step


def megaflow_runner(a, lr, zero_stage=1):
    from megaflow.config import config_from_kwargs, set_vocab_size
    from megaflow.model import build_model
    from megaflow.optim.optimizer import build_optimizer
    from megaflow.parallel import state
    from megaflow.training.step import train_step
    cfg = config_from_kwargs(world_size=TP * DP, model_style="llama", num_layers=a.layers, hidden_size=a.hidden,
                             num_attention_heads=a.heads, seq_length=a.seq, micro_batch_size=a.micro_batch,
                             tensor_model_parallel_size=TP, hidden_dropout=0.0, attention_dropout=0.0, lr=lr,
                             weight_decay=0.0, make_vocab_size_divisible_by=128, use_distributed_optimizer=True,
                             overlap_grad_reduce=True, overlap_param_gather=True, zero_stage=zero_stage)
    set_vocab_size(cfg, a.vocab)
    if not dist.is_initialized():  # the second megaflow runner shares the process groups
        state.initialize(tp=TP, backend="gloo", device="cpu")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    s = a.seq

    def step(tokens):
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(a.micro_batch, s),
                 "position_ids": torch.arange(s).expand(a.micro_batch, s)}
        return train_step(cfg, model, opt, None, iter([batch]), 1).loss
    step.memory = lambda: dict(opt.memory_bytes(), gathered_peak=getattr(opt.sync, "peak_gathered_bytes", 0))
    return step, cfg.model.ffn_hidden_size


def timed(step, tokens):
    dist.barrier()
    t0 = time.perf_counter()
    loss = step(tokens)
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the step is as slow as its slowest rank
    return t.item(), loss


def worker(a):
    torch.set_num_threads(1)
    mega, ffn = megaflow_runner(a, lr=1e-4)
    mega3, _ = megaflow_runner(a, lr=1e-4, zero_stage=3)
    runners = {"megaflow": mega, "megaflow-zero3": mega3,
               "fsdp2-zero2": native_runner(a, ffn, 1e-4, reshard_after_forward=False),
               "fsdp2-zero3": native_runner(a, ffn, 1e-4, reshard_after_forward=True)}
    from megaflow.parallel import state
    dp_rank = state.get().dp_rank
    gen = torch.Generator().manual_seed(1000 + dp_rank)          # each DP rank its own micro-batch
    times = {k: [] for k in runners}
    losses = {k: [] for k in runners}
    for i in range(a.steps + 2):
        tokens = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=gen)
        for name, step in runners.items():
            t, loss = timed(step, tokens)
            losses[name].append(loss)
            if i >= 2:
                times[name].append(t)
    mems = {k: step.memory() for k, step in runners.items()}
    if dist.get_rank() == 0:
        tokens = a.micro_batch * a.seq * DP
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"model: Llama {a.layers} layers, hidden {a.hidden}, {a.heads} heads, ffn {ffn}, seq {a.seq}, "
              f"micro-batch {a.micro_batch} per DP rank, vocab {a.vocab}, fp32; TP={TP} x DP={DP} on 4 gloo "
              f"processes; {a.steps} timed steps each, alternating")
        print(f"first losses (ln vocab = {math.log(a.vocab):.3f}): "
              + ", ".join(f"{k} {v[0]:.4f}" for k, v in losses.items()))
        for k, m in mems.items():
            total = m["parameters"] + m["gradients"] + m["optimizer"]
            extra = f", + {m['gathered_peak'] / 2**20:.2f} MiB gathered at most" if m.get("gathered_peak") else ""
            print(f"{k:>14} model states per rank between steps: {m['parameters'] / 2**20:.2f} MiB params, "
                  f"{m['gradients'] / 2**20:.2f} MiB grads, {m['optimizer'] / 2**20:.2f} MiB optimizer = "
                  f"{total / 2**20:.2f} MiB{extra}")
        for k in runners:
            print(f"{k:>14} (TP={TP} x DP={DP}): median step {med[k] * 1000:8.1f} ms  ({tokens / med[k]:8.0f} "
                  f"tokens/s)  [min {min(times[k]) * 1000:.1f}, max {max(times[k]) * 1000:.1f}]")
        print(f"ratio megaflow / native step time: {med['megaflow'] / med['fsdp2-zero2']:.3f} (ZeRO-1 against "
              f"FSDP2 without resharding after forward); {med['megaflow-zero3'] / med['fsdp2-zero3']:.3f} "
              f"(ZeRO-3 against FSDP2's default reshard_after_forward=True)")
    dist.destroy_process_group()


def main():
    from launch import worker_or_torchrun
    a = parse()
    worker_or_torchrun(__file__, TP * DP, worker, a)


if __name__ == "__main__":
    main()
