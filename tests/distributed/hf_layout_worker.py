"""Worker for test_hf_layouts.py (4 gloo ranks), two phases in one launch:
1. build the tiny Llama (GQA) and GPT-2 at TP=2 x PP=2 and save them with the trainer's own checkpoint
   writer (checkpoint/save.py), as a TP/PP run does;
2. train the Llama briefly at TP=2 x PP=2 with pretrain() and save it; the test loads that checkpoint
   into one process (the loader reshards) and compares its logits with the exported folder's.
"""
import sys

import torch

from megaflow.checkpoint import save_checkpoint
from megaflow.config import parse_args, set_vocab_size
from megaflow.data import build_tokenizer
from megaflow.model import build_model
from megaflow.parallel import state
from megaflow.training.trainer import pretrain

out_dir, llama, gpt2 = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
torch.set_num_threads(1)


def configured(flags):
    cfg = parse_args(flags)
    set_vocab_size(cfg, build_tokenizer(cfg.data).vocab_size)
    return cfg


state.initialize(tp=2, pp=2, backend="gloo", device="cpu")
for name, flags in (("llama", llama), ("gpt2", gpt2)):
    cfg = configured(flags + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    save_checkpoint(f"{out_dir}/{name}", 3, build_model(cfg), None, None, None, 0, cfg.to_json())

train = llama + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--train-iters", "5", "--lr", "3e-3", "--global-batch-size",
                 "4", "--num-workers", "0", "--eval-interval", "1000", "--log-interval", "4",
                 "--save", f"{out_dir}/trained"]
pretrain(parse_args(train))
state.destroy()
