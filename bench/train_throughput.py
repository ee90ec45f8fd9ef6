"""Training throughput of megaflow against Hugging Face's LlamaForCausalLM, same model, same run.

Fixed config (issue 2): Llama style, 6 layers, hidden 256, 4 heads, seq 256, micro-batch 8, vocab 8192,
fp32 on CPU. Both sides run forward + backward + global-norm clip + AdamW on the same random tokens;
steps alternate between the two (A B A B ...) so machine noise hits both alike, and the median step
time of each is kept. Prints tokens/s of each and the ratio megaflow / transformers (target >= 1.0:
the engine adds no overhead).

    python bench/train_throughput.py [--steps 20]
"""
import argparse
import statistics
import time

import torch

from megaflow.config import config_from_kwargs, set_vocab_size
from megaflow.model import build_model
from megaflow.optim.optimizer import build_optimizer
from megaflow.training.step import train_step

LAYERS, HIDDEN, HEADS, SEQ, MBS, VOCAB = 6, 256, 4, 256, 8, 8192


def megaflow_runner(lr):
    cfg = config_from_kwargs(model_style="llama", num_layers=LAYERS, hidden_size=HIDDEN,
                             num_attention_heads=HEADS, seq_length=SEQ, micro_batch_size=MBS,
                             hidden_dropout=0.0, attention_dropout=0.0, lr=lr, weight_decay=0.0,
                             make_vocab_size_divisible_by=128)
    set_vocab_size(cfg, VOCAB)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)

    def step(tokens):
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                 "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        return train_step(cfg, model, opt, None, iter([batch]), 1).loss
    return step, sum(p.numel() for p in model.parameters()), cfg.model.ffn_hidden_size


def hf_runner(lr, ffn):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=ffn, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step, sum(p.numel() for p in model.parameters())


def step_seconds(step, tokens):
    start = time.perf_counter()
    step(tokens)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps of each")
    args = ap.parse_args()
    torch.manual_seed(0)
    mf_step, mf_params, ffn = megaflow_runner(1e-4)
    hf_step, hf_params = hf_runner(1e-4, ffn)
    print(f"model: {LAYERS} layers, hidden {HIDDEN}, heads {HEADS}, ffn {ffn}, seq {SEQ}, micro-batch {MBS}, "
          f"vocab {VOCAB}, fp32, {torch.get_num_threads()} threads")
    print(f"parameters: megaflow {mf_params:,} | transformers {hf_params:,}")
    batches = [torch.randint(0, VOCAB, (MBS, SEQ + 1)) for _ in range(args.steps)]
    for _ in range(2):  # warm-up both (allocator, thread pools)
        mf_step(batches[0])
        hf_step(batches[0])
    mf, hf = [], []
    for tokens in batches:
        mf.append(step_seconds(mf_step, tokens))
        hf.append(step_seconds(hf_step, tokens))
    tokens_per_step = MBS * SEQ
    m, h = tokens_per_step / statistics.median(mf), tokens_per_step / statistics.median(hf)
    print(f"median tokens/s over {args.steps} alternating steps: megaflow {m:,.0f} | "
          f"transformers LlamaForCausalLM {h:,.0f} | ratio {m / h:.2f}x")


if __name__ == "__main__":
    main()
