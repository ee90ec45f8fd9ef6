#!/usr/bin/env bash
# GPT-2 small (124M) on one node: 10B tokens (19,073 steps of 512 x 1024 tokens) with the GPT-2 BPE
# tokenizer, data parallel over the node's GPUs with ZeRO-2 (tools/estimate.py's pick for 8 x 80 GB:
# micro-batch 16, about 7.3 GiB per GPU).
#
#   GPUS=8 DATA=/data/owt/owt_text_document VOCAB=/data/gpt2/vocab.json MERGES=/data/gpt2/merges.txt \
#       bash examples/pretrain_gpt2_124m.sh
#
# Extra arguments go to pretrain_gpt.py (e.g. --train-iters 100).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
DATA=${DATA:-/data/openwebtext/owt_text_document}
VOCAB=${VOCAB:-/data/gpt2/vocab.json}
MERGES=${MERGES:-/data/gpt2/merges.txt}
OUT=${OUT:-runs/gpt2-124m}

exec torchrun --standalone --nproc-per-node "$GPUS" pretrain_gpt.py \
    --model-style gpt2 --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
    --seq-length 1024 --max-position-embeddings 1024 --attention-dropout 0 --hidden-dropout 0 \
    --micro-batch-size 16 --global-batch-size 512 --train-iters 19073 \
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 715 \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --low-precision-params --device cuda \
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --data-path "$DATA" --split 995,5,0 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" --num-workers 2 \
    --save "$OUT/checkpoints" --save-interval 2000 --log-interval 10 \
    --eval-interval 500 --eval-iters 20 --tensorboard-dir "$OUT/tensorboard" "$@"
