#!/usr/bin/env bash
# DeepSeek-V3-shaped pretraining (671B in the main model, 37B active per token, plus one
# multi-token-prediction module) on NNODES nodes x 8 GPUs (80 GB) with torchrun and c10d rendezvous.
# Run the same command on every node:
#
#   MASTER_ADDR=node0.cluster NNODES=128 bash examples/pretrain_deepseek_v3.sh
#
# Layout (1024 GPUs): PP 16 with one layer on the first stage (the embedding's) and 4 on each other,
# EP 64 (4 experts per rank), DP 64 with ZeRO-1, TP 1, full recompute, micro-batch 1; the MTP module
# sits on the last stage. The planner, with EP and PP fixed, ranks it first (Dec 2026):
#
#   python tools/estimate.py --gpus 1024 --gpu-memory-gib 80 --top 3 <MODEL flags below> \
#       --expert-model-parallel-size 64 --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 1 \
#       --seq-length 4096 --vocab-size 129280 --global-batch-size 1536 --bf16 --attention-dropout 0 --hidden-dropout 0
#   48 layouts evaluated for 1024 GPUs (8 per node, 80 GiB each); 13 fit in 76 GiB.
#     #  TP SP CP PP VPP   DP ZeRO recompute MBS |  param   grad    opt    act  total |  step(s) tok/s/GPU  MFU% bubble
#     1  1  -  1 16   -   64   Z1      full   1 |   14.9   14.9    6.9    8.0   44.8 |   17.240       356   9.4  0.38
#     2  1  -  1 16   -   64    -      full   1 |   14.9   14.9   29.8    8.0   67.7 |   17.398       353   9.3  0.38
#     3  1  -  1 16   -   64    -      full   2 |   14.9   14.9   29.8   13.6   73.3 |   23.578       261   6.9  0.56
#   predicted step 17.240 s (compute 5.036, ..., EP comm 5.339, bubble 38.5%, ...)
#
# The last stage needs most memory (the MTP layer and an embedding copy besides the output layer). The
# expert all-to-alls across 8 nodes (EP comm, not overlapped in the model) take as long as the compute:
# overlapping them with computation (as DeepSeek's DualPipe does) is not modelled or implemented here.
# Parameters, gradients and optimizer state are exact (the dry run builds every stage on the meta
# device and agrees); activations assume balanced expert loads (docs/moe.md), so keep the headroom.
# Check any node count without GPUs: python pretrain_gpt.py --dry-run --world-size N <these flags>.
# Override DATA, TOKENIZER and OUT; extra arguments go to pretrain_gpt.py.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-128}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of one node (the rendezvous host)}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-/data/deepseek/corpus_text_document}
TOKENIZER=${TOKENIZER:-/data/deepseek/tokenizer}
OUT=${OUT:-runs/deepseek-v3}

MODEL=(--model-style llama --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128
       --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512
       --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 --norm-epsilon 1e-6
       --num-experts 256 --moe-ffn-hidden-size 2048 --moe-router-topk 8 --moe-layer-freq "([0]*3+[1]*58)"
       --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
       --moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-topk-scaling-factor 2.5
       --moe-shared-expert-intermediate-size 2048 --moe-aux-loss-coeff 0.0001 --moe-grouped-gemm
       --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3
       --seq-length 4096 --attention-dropout 0 --hidden-dropout 0)
PARALLEL=(--expert-model-parallel-size 64 --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 1
          --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
          --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
          --distributed-timeout-minutes 20)
TRAINING=(--micro-batch-size 1 --global-batch-size 1536 --train-iters 500000
          --lr 2.2e-4 --min-lr 2.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000
          --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --device cuda)
DATA_ARGS=(--data-path "$DATA" --split 990,9,1 --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$TOKENIZER" --num-workers 2)
OUTPUT=(--save "$OUT/checkpoints" --save-interval 500 --log-interval 10 --eval-interval 1000
        --eval-iters 10 --tensorboard-dir "$OUT/tensorboard")
if [ -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]; then
    OUTPUT+=(--load "$OUT/checkpoints")   # resume after a failure: just launch again
fi

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-deepseek-v3}" \
    --max-restarts 0 \
    pretrain_gpt.py "${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${DATA_ARGS[@]}" "${OUTPUT[@]}" "$@"
