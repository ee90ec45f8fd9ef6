"""Pretrain a GPT with megaflow. Megatron-LM's flag names; run with python (one process) or torchrun.

    python pretrain_gpt.py --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 --train-iters 10
    torchrun --nproc-per-node 8 pretrain_gpt.py --tensor-model-parallel-size 2 ... (see examples/)
"""
import sys

from megaflow.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
