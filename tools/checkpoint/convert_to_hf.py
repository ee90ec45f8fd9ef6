"""Export a megaflow checkpoint (any TP/PP/DP/ZeRO layout) as a Hugging Face model folder.

    python tools/checkpoint/convert_to_hf.py --load CKPT_DIR --save HF_DIR [--iteration N]
        [--dtype fp32|bf16|fp16] [--max-shard-size 50GB] [--tokenizer-model PATH] [--export-mtp]

The folder loads with transformers' AutoModelForCausalLM (LlamaForCausalLM or GPT2LMHeadModel) and
serves with vLLM (tools/serve.py). See docs/conversion.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaflow.checkpoint.convert import DTYPES, export_to_hf  # noqa: E402
from megaflow.checkpoint.hf_folder import DEFAULT_MAX_SHARD_SIZE, parse_size  # noqa: E402
from megaflow.errors import naming, run_tool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megaflow checkpoint directory (holds the tracker file)")
    p.add_argument("--save", required=True, help="output Hugging Face folder")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split the weights into shards of at most this size (huggingface_hub's units: KB, MB, GB, "
                        "TB are powers of ten; default: transformers' save_pretrained default, %(default)s)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer file/folder to export, if not where the checkpoint's config says")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--export-mtp", action="store_true",
                   help="DeepSeek-V3: also write the multi-token-prediction layers, as DeepSeek's released "
                        "weights hold them (layers after the last; transformers ignores them, vLLM's MTP reads them)")
    args = p.parse_args(argv)
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        p.error(f"--max-shard-size {args.max_shard_size!r}: {e}")
    with naming("--load", args.load):
        config = export_to_hf(args.load, args.save, args.iteration, DTYPES[args.dtype], max_shard_bytes,
                              args.tokenizer_model, tokenizer=not args.no_tokenizer, keep_mtp=args.export_mtp)
    print(f"exported {config['architectures'][0]} ({args.dtype}) to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
