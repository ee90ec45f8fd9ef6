#!/usr/bin/env bash
# A tiny Qwen3 pretrained on CPU in minutes, then exported as a Hugging Face Qwen3ForCausalLM folder
# (transformers loads it, tools/serve.py serves it with vLLM). Qwen3's shape: QK-norm, grouped-query
# attention with its own head dimension, RoPE base 1e6, no biases, untied output layer (docs/models.md).
# Data: the quickstart's (examples/cpu_corpus.sh, shared in $OUT). Extra arguments go to pretrain_gpt.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
source examples/cpu_corpus.sh

python pretrain_gpt.py \
    --model-style llama --num-layers 4 --hidden-size 256 --ffn-hidden-size 768 \
    --num-attention-heads 4 --group-query-attention --num-query-groups 2 --kv-channels 64 \
    --qk-layernorm --rotary-base 1000000 --norm-epsilon 1e-6 \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    "${DATA_FLAGS[@]}" \
    --train-iters 400 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --hidden-dropout 0.0 --attention-dropout 0.0 --weight-decay 0.1 --clip-grad 1.0 \
    --log-interval 10 --eval-interval 200 --eval-iters 4 \
    --save "$OUT/qwen3/checkpoints" --save-interval 400 "$@"

python tools/checkpoint/convert_to_hf.py --load "$OUT/qwen3/checkpoints" --save "$OUT/qwen3/hf"
python tools/generate.py --load "$OUT/qwen3/checkpoints" --prompt "Return the" --max-new-tokens 24 --greedy
