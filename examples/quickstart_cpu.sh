#!/usr/bin/env bash
# megaflow quickstart on CPU: from raw text to a trained tiny GPT in a few minutes on 2 cores.
#
#   1. a corpus any machine can build offline: the Python standard library's own docstrings
#   2. a byte-level BPE tokenizer trained on it
#   3. Megatron-compatible .bin/.idx data
#   4. a tiny Llama-style GPT pretrained on it (watch `lm loss` fall), checkpointed, then sampled
#
# Everything goes to $OUT (default runs/quickstart); steps whose outputs exist are not redone.
# Extra arguments are passed to pretrain_gpt.py (e.g. --train-iters 50).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
source examples/cpu_corpus.sh

python pretrain_gpt.py \
    --model-style llama --num-layers 4 --hidden-size 256 --num-attention-heads 4 \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    "${DATA_FLAGS[@]}" \
    --train-iters 400 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --hidden-dropout 0.0 --attention-dropout 0.0 --weight-decay 0.1 --clip-grad 1.0 \
    --log-interval 10 --eval-interval 200 --eval-iters 4 \
    --save "$OUT/checkpoints" --save-interval 400 --tensorboard-dir "$OUT/tensorboard" "$@"

python tools/generate.py --load "$OUT/checkpoints" --prompt "Return the" --max-new-tokens 24 --greedy
