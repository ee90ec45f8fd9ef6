"""Worker: build the tiny Llama (GQA) and GPT-2 models at TP=2 x PP=2 (4 gloo ranks) and save them with
the trainer's own checkpoint writer (checkpoint/io.py), as a TP/PP run would."""
import sys

from megaflow.checkpoint import save_checkpoint
from megaflow.config import parse_args, set_vocab_size
from megaflow.data import build_tokenizer
from megaflow.model import build_model
from megaflow.parallel import state

out_dir = sys.argv[1]
MODELS = {"llama": sys.argv[2].split(), "gpt2": sys.argv[3].split()}
st = state.initialize(tp=2, pp=2, backend="gloo", device="cpu")
for name, flags in MODELS.items():
    cfg = parse_args(flags + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    set_vocab_size(cfg, build_tokenizer(cfg.data).vocab_size)
    model = build_model(cfg)
    save_checkpoint(f"{out_dir}/{name}", 3, model, None, None, None, 0, cfg.to_json())
state.destroy()
