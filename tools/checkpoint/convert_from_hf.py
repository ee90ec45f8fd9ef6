"""Convert a Hugging Face Llama or GPT-2 folder into a megaflow checkpoint at any TP/PP.

    python tools/checkpoint/convert_from_hf.py --load HF_DIR --save CKPT_DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P

The checkpoint holds model weights only (no optimizer state): continue pretraining or fine-tune with
the printed flags plus `--load CKPT_DIR --finetune`. See docs/conversion.md.
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaflow.checkpoint.convert import DTYPES, import_from_hf, training_flags  # noqa: E402


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
    cfg = import_from_hf(args.load, args.save, tp=args.tensor_model_parallel_size,
                         pp=args.pipeline_model_parallel_size, iteration=args.iteration,
                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, dtype=args.dtype)
    flags = training_flags(cfg) + ["--load", args.save, "--finetune"]
    print(f"wrote {args.save} (TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size})")
    print("continue training with:\n  python pretrain_gpt.py " + shlex.join(flags) + " ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
