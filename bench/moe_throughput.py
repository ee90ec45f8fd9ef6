"""MoE training throughput: megaflow against transformers' MixtralForCausalLM, same weights, same run.

A small Mixtral-shaped model (8 experts, top-2; 4 layers, hidden 256, expert width 512, seq 256,
micro-batch 8, vocab 8192, fp32 on CPU). Both sides run forward + backward + global-norm clip + fused
AdamW (torch's: transformers' Trainer default, and megaflow's on CPU and CUDA) on the same random
tokens, steps rotating with the ceiling (A B ceiling A B ...) so machine noise hits all alike; the
median time of each is kept. megaflow runs its experts as one grouped GEMM (--moe-grouped-gemm, with
--gradient-accumulation-fusion), transformers as its default (torch._grouped_mm). Prints tokens/s of
each, their ratio, and the ceiling: the step's own matrix multiplications (forward, input and weight
gradients, experts at one step's real tokens per expert; bench/matmul_ceiling.py) timed alone, as a
fraction of megaflow's step.

With --compile, also both compiled (each decoder layer compiled on its own: megaflow's --compile, whose
MoE layers run their routing and experts eagerly between compiled graphs; transformers' layers with
layer.compile()), in the same rotation.

With --ep, also EP=2 against EP=1 on two gloo processes (both DP=2, same batch per rank): the step time
ratio is what the all-to-all dispatch costs.

    python bench/moe_throughput.py [--steps 10] [--compile] [--ep]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaflow.checkpoint.hf import to_hf_state_dict  # noqa: E402
from megaflow.config import config_from_kwargs, set_vocab_size  # noqa: E402
from megaflow.model import build_model  # noqa: E402
from megaflow.layers.moe.stats import clear_step_counts  # noqa: E402
from megaflow.model.init import global_named_parameters  # noqa: E402
from megaflow.optim.optimizer import build_optimizer  # noqa: E402
from megaflow.training.step import train_step  # noqa: E402

from matmul_ceiling import ceiling_timer  # noqa: E402

LAYERS, HIDDEN, HEADS, FFN, EXPERTS, TOPK, SEQ, MBS, VOCAB = 4, 256, 4, 512, 8, 2, 256, 8, 8192


def megaflow_config(world_size=1, **kw):
    cfg = config_from_kwargs(world_size=world_size, model_style="llama", num_layers=LAYERS, hidden_size=HIDDEN,
                             num_attention_heads=HEADS,
                             seq_length=SEQ, micro_batch_size=MBS, hidden_dropout=0.0, attention_dropout=0.0,
                             lr=1e-4, weight_decay=0.0, num_experts=EXPERTS, moe_ffn_hidden_size=FFN,
                             moe_router_topk=TOPK, moe_grouped_gemm=True, make_vocab_size_divisible_by=128,
                             gradient_accumulation_fusion=True, **kw)
    set_vocab_size(cfg, VOCAB)
    return cfg


def batch_of(tokens):
    n = tokens.shape[0]
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(n, SEQ),
            "position_ids": torch.arange(SEQ).expand(n, SEQ)}


def megaflow_runner(compile=False):
    cfg = megaflow_config(compile=compile)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)

    def step(tokens):
        return train_step(cfg, model, opt, None, iter([batch_of(tokens)]), 1).loss
    return cfg, model, step


def hf_runner(cfg, model, compile=False):
    from transformers import MixtralConfig, MixtralForCausalLM
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOPK, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                           rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0,
                           router_aux_loss_coef=0.0, output_router_logits=False)
    hf = MixtralForCausalLM(config)
    hf.config._attn_implementation = "sdpa"
    if compile:  # each decoder layer on its own, as megaflow's --compile
        for layer in hf.model.layers:
            layer.compile(dynamic=False)
    full = {name: p.detach() for name, p in global_named_parameters(model)}
    hf.load_state_dict(to_hf_state_dict(cfg, full), strict=False)   # same weights (HF fuses experts on load)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # the Trainer's default

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def matmul_ceiling(model):
    """A timer of the step's own matrix multiplications alone (bench/matmul_ceiling.py): attention,
    router and output layer on every token, each expert on the tokens the last step routed to it."""
    from megaflow.layers.moe import moe_layers
    t = SEQ * MBS
    linears = {(t, HIDDEN, 3 * HIDDEN): LAYERS, (t, HIDDEN, HIDDEN): LAYERS, (t, HIDDEN, EXPERTS): LAYERS,
               (t, HIDDEN, VOCAB): 1}
    for layer in moe_layers(model):
        for rows in layer.step_counts.tolist():
            for shape in [(int(rows), HIDDEN, 2 * FFN), (int(rows), FFN, HIDDEN)]:
                linears[shape] = linears.get(shape, 0) + 1
    return ceiling_timer(linears, attention=(LAYERS, MBS * HEADS, SEQ, HIDDEN // HEADS))


def ep_worker(steps: int):
    """Under torchrun (2 processes): median step time at EP=2 and at EP=1, DP=2 both."""
    from megaflow.parallel import state
    results = {}
    for ep in (1, 2):
        st = state.initialize(ep=ep)
        cfg = megaflow_config(2, expert_model_parallel_size=ep, global_batch_size=2 * MBS)
        torch.manual_seed(1)
        model = build_model(cfg)
        opt = build_optimizer(cfg, model)
        times = []
        for i in range(steps + 2):
            tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(i * 2 + st.rank))
            t = time.perf_counter()
            train_step(cfg, model, opt, None, iter([batch_of(tokens)]), 1)
            times.append(time.perf_counter() - t)
        results[ep] = statistics.median(times[2:])
    state.destroy()  # once: the process group is reused by the second layout (as tests' layout workers do)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"EP=2 vs EP=1 (2 processes, DP=2, micro-batch {MBS} per rank): median step {results[2]:.3f} s vs "
              f"{results[1]:.3f} s: dispatch overhead {results[2] / results[1] - 1:+.1%}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps of each")
    ap.add_argument("--ep", action="store_true", help="also time EP=2 against EP=1 on 2 processes")
    ap.add_argument("--compile", action="store_true", help="also time both with each layer compiled")
    ap.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ep_worker:
        return ep_worker(args.steps)
    cfg, model, mf_step = megaflow_runner()
    runners = {"megaflow": mf_step, "transformers": hf_runner(cfg, model)}
    if args.compile:
        runners["megaflow compiled"] = megaflow_runner(compile=True)[2]
        runners["transformers compiled"] = hf_runner(cfg, model, compile=True)
    total = sum(p.numel() for p in model.parameters())
    print(f"model: Mixtral-shaped, {LAYERS} layers, hidden {HIDDEN}, {EXPERTS} experts of width {FFN}, top-{TOPK}, "
          f"seq {SEQ}, micro-batch {MBS}, vocab {VOCAB}, fp32, {torch.get_num_threads()} threads; "
          f"{total:,} parameters")
    batches = [torch.randint(0, VOCAB, (MBS, SEQ + 1)) for _ in range(args.steps)]
    for _ in range(2):                     # warm-up (and compilation)
        for step in runners.values():
            step(batches[0])
    clear_step_counts(model)
    mf_step(batches[0])                    # the tokens per expert of one step, for the ceiling
    ceiling_seconds = matmul_ceiling(model)
    times, ceilings = {k: [] for k in runners}, []
    for tokens in batches:                 # rotating: machine noise hits all alike
        for name, step in runners.items():
            t = time.perf_counter()
            step(tokens)
            times[name].append(time.perf_counter() - t)
        ceilings.append(ceiling_seconds())
    med, ceiling = {k: statistics.median(v) for k, v in times.items()}, statistics.median(ceilings)
    m, h = med["megaflow"], med["transformers"]
    tokens = MBS * SEQ
    print(f"median tokens/s over {args.steps} rotating steps: megaflow {tokens / m:,.0f} | transformers "
          f"MixtralForCausalLM {tokens / h:,.0f} | ratio {h / m:.2f}x")
    print(f"ceiling (the step's matmuls alone): {ceiling:.3f} s = {ceiling / m:.2f} of megaflow's step "
          f"({m:.3f} s), {ceiling / h:.2f} of transformers' ({h:.3f} s)")
    if args.compile:
        mc, hc = med["megaflow compiled"], med["transformers compiled"]
        print(f"compiled: megaflow {tokens / mc:,.0f} | transformers {tokens / hc:,.0f} tokens/s | ratio {hc / mc:.2f}x "
              f"| ceiling {ceiling / mc:.2f} of megaflow's compiled step ({mc:.3f} s), {ceiling / hc:.2f} of "
              f"transformers' ({hc:.3f} s)")
    if args.ep:
        from tests.launch import torchrun
        proc = torchrun(os.path.abspath(__file__), 2, ["--ep-worker", "--steps", str(args.steps)], timeout=1800)
        print(proc.stdout.strip())


if __name__ == "__main__":
    main()
