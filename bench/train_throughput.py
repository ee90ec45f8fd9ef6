"""Training throughput of megaflow against Hugging Face's LlamaForCausalLM, eager and compiled, beside
the ceiling the step's own matrix multiplications set, all in one run.

Fixed config (issue 2): Llama style, 6 layers, hidden 256, 4 heads, seq 256, micro-batch 8, vocab 8192,
fp32 on CPU. Every runner does forward + backward + global-norm clip + fused AdamW (torch's: transformers'
Trainer default and megaflow's) on the same random tokens:

    megaflow eager            --gradient-accumulation-fusion (weight gradients added into the fp32
                              main-grad buffer by the linear layers' backward)
    megaflow eager, unfused   the same without it (what the fusion is worth)
    megaflow compiled         --compile (each transformer block compiled on its own) + fusion outside
    transformers eager        LlamaForCausalLM, SDPA attention
    transformers compiled     the same with each decoder layer compiled on its own (as megaflow)

Steps rotate between the runners (A B C D E ceiling A B ...) so machine noise hits all alike; the
median step time of each is kept. The ceiling is the step's own matrix multiplications timed alone with torch.mm on
the same shapes (bench/matmul_ceiling.py) and is printed as a fraction: ceiling time / step time (1.0 =
nothing but matmuls).

    python bench/train_throughput.py [--steps 20] [--no-compile]
    python bench/train_throughput.py --profile      # torch.profiler table of one megaflow eager step
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megaflow.config import config_from_kwargs, set_vocab_size  # noqa: E402
from megaflow.model import build_model  # noqa: E402
from megaflow.model.compile import compile_seconds  # noqa: E402
from megaflow.optim.optimizer import build_optimizer  # noqa: E402
from megaflow.training.step import train_step  # noqa: E402

from matmul_ceiling import ceiling_timer  # noqa: E402

LAYERS, HIDDEN, HEADS, SEQ, MBS, VOCAB = 6, 256, 4, 256, 8, 8192


def megaflow_runner(lr, compile=False, fusion=True):
    cfg = config_from_kwargs(model_style="llama", num_layers=LAYERS, hidden_size=HIDDEN,
                             num_attention_heads=HEADS, seq_length=SEQ, micro_batch_size=MBS,
                             hidden_dropout=0.0, attention_dropout=0.0, lr=lr, weight_decay=0.0,
                             make_vocab_size_divisible_by=128, compile=compile,
                             gradient_accumulation_fusion=fusion)
    set_vocab_size(cfg, VOCAB)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)

    def step(tokens):
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                 "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        return train_step(cfg, model, opt, None, iter([batch]), 1).loss
    return step, sum(p.numel() for p in model.parameters()), cfg.model.ffn_hidden_size


def hf_runner(lr, ffn, compile=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=ffn, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    if compile:
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)  # the Trainer's default

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step, sum(p.numel() for p in model.parameters())


def matmul_ceiling(ffn):
    """A timer of the step's own matrix multiplications alone (bench/matmul_ceiling.py)."""
    tokens = MBS * SEQ
    linears = {}
    for n_in, n_out in [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2 * ffn), (ffn, HIDDEN)] * LAYERS + \
            [(HIDDEN, VOCAB)]:                                            # + the output layer
        linears[(tokens, n_in, n_out)] = linears.get((tokens, n_in, n_out), 0) + 1
    return ceiling_timer(linears, attention=(LAYERS, MBS * HEADS, SEQ, HIDDEN // HEADS))


def profile(step, rows=15):
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        step(tokens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps of each")
    ap.add_argument("--no-compile", action="store_true", help="eager runners only (no compile time)")
    ap.add_argument("--profile", action="store_true", help="print where one megaflow eager step spends its time")
    args = ap.parse_args()
    runners = {}
    mf_step, mf_params, ffn = megaflow_runner(1e-4)
    if args.profile:
        profile(mf_step)
        return
    runners["megaflow eager"] = mf_step
    runners["megaflow eager, unfused"] = megaflow_runner(1e-4, fusion=False)[0]
    hf_step, hf_params = hf_runner(1e-4, ffn)
    runners["transformers eager"] = hf_step
    if not args.no_compile:
        runners["megaflow compiled"] = megaflow_runner(1e-4, compile=True)[0]
        runners["transformers compiled"] = hf_runner(1e-4, ffn, compile=True)[0]
    print(f"model: {LAYERS} layers, hidden {HIDDEN}, heads {HEADS}, ffn {ffn}, seq {SEQ}, micro-batch {MBS}, "
          f"vocab {VOCAB}, fp32, {torch.get_num_threads()} threads")
    print(f"parameters: megaflow {mf_params:,} | transformers {hf_params:,}")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g) for _ in range(args.steps)]
    warm = {}
    for name, step in runners.items():  # warm-up: compiles, allocator, thread pools
        before = compile_seconds()
        start = time.perf_counter()
        step(batches[0])
        warm[name] = (time.perf_counter() - start, compile_seconds() - before)
        step(batches[0])
    times = {name: [] for name in runners}
    ceiling_seconds, ceilings = matmul_ceiling(ffn), []
    for tokens in batches:
        for name, step in runners.items():
            start = time.perf_counter()
            step(tokens)
            times[name].append(time.perf_counter() - start)
        ceilings.append(ceiling_seconds())  # in the rotation: the same machine state as the steps
    ceiling = statistics.median(ceilings)
    tokens_per_step = MBS * SEQ
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"ceiling: the step's matmuls alone take {ceiling * 1e3:.0f} ms")
    print(f"median over {args.steps} rotating steps:")
    for name, t in medians.items():
        first, compiling = warm[name]
        note = f" | first step {first:.1f} s, {compiling:.1f} s of it compiling" if "compiled" in name else ""
        print(f"  {name:<26} {t * 1e3:7.0f} ms  {tokens_per_step / t:8,.0f} tokens/s  "
              f"{ceiling / t:.3f} of ceiling{note}")
    best_hf = min(t for name, t in medians.items() if name.startswith("transformers"))
    best_mf = min(t for name, t in medians.items() if name.startswith("megaflow") and "unfused" not in name)
    print(f"megaflow best / transformers best: {best_hf / best_mf:.3f}x the speed")


if __name__ == "__main__":
    main()
