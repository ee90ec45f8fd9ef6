#!/usr/bin/env bash
# Qwen3-8B-shaped pretraining on NNODES nodes x 8 GPUs (80 GB) with torchrun and c10d rendezvous. Run
# the same command on every node:
#
#   MASTER_ADDR=node0.cluster NNODES=4 bash examples/pretrain_qwen3_8b.sh
#
# Layout from the planner, for 4 nodes (32 GPUs): TP 2 inside a node with sequence parallelism, no PP,
# DP 16 with ZeRO-1, micro-batch 2, no recompute. Its output (Dec 2026):
#
#   python tools/estimate.py --gpus 32 --gpu-memory-gib 80 --top 3 <MODEL flags below> \
#       --seq-length 4096 --vocab-size 151936 --global-batch-size 512 --bf16 --attention-dropout 0 --hidden-dropout 0
#   2265 layouts evaluated for 32 GPUs (8 per node, 80 GiB each); 1677 fit in 76 GiB.
#     #  TP SP CP PP VPP   DP ZeRO recompute MBS |  param   grad    opt    act  total |  step(s) tok/s/GPU  MFU% bubble
#     1  2  y  1  1   -   16   Z1         -   2 |   15.3   15.3    1.9   26.8   59.2 |    6.873      9536  47.3  0.00
#     2  2  y  1  1   -   16   Z1 selective   2 |   15.3   15.3    1.9   26.8   59.2 |    7.009      9350  46.4  0.00
#     3  1  -  1  2   9   16   Z1         -   1 |   15.3   15.3    1.9   33.1   65.6 |    7.182      9125  45.2  0.02
#
# More nodes: DP grows (NNODES × 4); check any count without GPUs: python pretrain_gpt.py --dry-run
# --world-size N <these flags>. Override the locations with DATA, TOKENIZER and OUT; extra arguments
# go to pretrain_gpt.py.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of one node (the rendezvous host)}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-/data/qwen3/corpus_text_document}
TOKENIZER=${TOKENIZER:-/data/qwen3/tokenizer}
OUT=${OUT:-runs/qwen3-8b}

MODEL=(--model-style llama --num-layers 36 --hidden-size 4096 --ffn-hidden-size 12288
       --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
       --qk-layernorm --rotary-base 1000000 --norm-epsilon 1e-6
       --seq-length 4096 --max-position-embeddings 40960 --attention-dropout 0 --hidden-dropout 0)
PARALLEL=(--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer
          --overlap-grad-reduce --overlap-param-gather --distributed-timeout-minutes 10)
TRAINING=(--micro-batch-size 2 --global-batch-size 512 --train-iters 250000
          --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
          --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --device cuda)
DATA_ARGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$TOKENIZER" --num-workers 2)
OUTPUT=(--save "$OUT/checkpoints" --save-interval 1000 --log-interval 10 --eval-interval 1000
        --eval-iters 10 --tensorboard-dir "$OUT/tensorboard")
if [ -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]; then
    OUTPUT+=(--load "$OUT/checkpoints")   # resume after a failure: just launch again
fi

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-qwen3-8b}" \
    --max-restarts 0 \
    pretrain_gpt.py "${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${DATA_ARGS[@]}" "${OUTPUT[@]}" "$@"
