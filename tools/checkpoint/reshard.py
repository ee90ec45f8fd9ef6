"""Rewrite a megaflow checkpoint at another layout, offline, in one CPU process.

    python tools/checkpoint/reshard.py --load DIR --save DIR --tensor-model-parallel-size T \
        --pipeline-model-parallel-size P [--data-parallel-size D --use-distributed-optimizer] [--iteration N]

Model weights, optimizer state (re-split per parameter; ZeRO shards for D ranks with
--use-distributed-optimizer), the data position, LR schedule and loss scale carry over; the vocabulary is
re-padded for T. RNG streams do not (they belong to the ranks of the saving layout): a run loading the
result re-seeds and says so. Training can load any layout directly (--load); this tool is for moving a
checkpoint to the layout it will be read at, or splitting it for other tools. See docs/checkpoints.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaflow.checkpoint.reshard import reshard  # noqa: E402
from megaflow.errors import naming, run_tool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory to read (holds the tracker file)")
    p.add_argument("--save", required=True, help="checkpoint directory to write")
    p.add_argument("--iteration", type=int, default=None, help="iteration to read (default: the latest)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="split the optimizer state for this many DP ranks (with --use-distributed-optimizer)")
    p.add_argument("--use-distributed-optimizer", action="store_true", help="write ZeRO optimizer shards")
    args = p.parse_args(argv)
    with naming("--load", args.load):
        cfg = reshard(args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                      args.data_parallel_size, args.use_distributed_optimizer, args.iteration)
    print(f"wrote {args.save} at TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
          f"DP={args.data_parallel_size}{' (distributed optimizer)' if args.use_distributed_optimizer else ''}, "
          f"padded vocabulary {cfg.padded_vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
