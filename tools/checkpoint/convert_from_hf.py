"""Convert a Hugging Face Llama or GPT-2 folder into a megaflow checkpoint at any TP/PP.

    python tools/checkpoint/convert_from_hf.py --load HF_DIR --save CKPT_DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

The checkpoint holds model weights only (no optimizer state). It prints the pretrain_gpt.py command
that continues from it (`--load CKPT_DIR --finetune` and the model's flags; torchrun when TP×PP > 1),
runnable as printed on mock data. See docs/conversion.md.
"""
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megaflow.checkpoint.convert import DTYPES, import_from_hf, training_flags  # noqa: E402
from megaflow.errors import naming, run_tool  # noqa: E402


def next_command(cfg, ckpt_dir: str) -> str:
    """A pretrain_gpt.py command line that runs as printed from the current directory: the flags that
    rebuild the converted model, --load/--finetune, and enough data and iterations to start; under
    torchrun when the layout has more than one process."""
    procs = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    script = os.path.relpath(os.path.join(ROOT, "pretrain_gpt.py"))
    launcher = ["torchrun", f"--nproc-per-node={procs}"] if procs > 1 else ["python"]
    seq = min(512, cfg.model.max_position_embeddings)
    smoke = ["--mock-data", "--seq-length", str(seq), "--micro-batch-size", "1", "--train-iters", "10"]
    return shlex.join(launcher + [script] + training_flags(cfg) + ["--load", ckpt_dir, "--finetune"] + smoke)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--save", required=True, help="megaflow checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--iteration", type=int, default=0, help="iteration number the checkpoint is saved as")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    args = p.parse_args(argv)
    with naming("--load", args.load):
        cfg = import_from_hf(args.load, args.save, tp=args.tensor_model_parallel_size,
                             pp=args.pipeline_model_parallel_size, iteration=args.iteration,
                             make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, dtype=args.dtype)
    print(f"wrote {args.save} (TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size})")
    print("continue training from it; as printed, a 10-iteration smoke test on mock data (put your --data-path, "
          "--train-iters and --save in place of the last flags):\n  " + next_command(cfg, args.save))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
