#!/usr/bin/env bash
# Llama-3-8B-style pretraining on NNODES nodes x 8 GPUs with torchrun and c10d rendezvous.
# Run the same command on every node (flags and layout: examples/llama3_8b_flags.sh):
#
#   MASTER_ADDR=node0.cluster NNODES=8 bash examples/pretrain_llama3_8b.sh
#
# MASTER_ADDR is any one node's address (it hosts the rendezvous); MASTER_PORT (29500) must be open
# between nodes. Extra arguments go to pretrain_gpt.py. On SLURM use pretrain_llama3_8b.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/llama3_8b_flags.sh
NNODES=${NNODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of one node (the rendezvous host)}
MASTER_PORT=${MASTER_PORT:-29500}

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-llama3-8b}" \
    --max-restarts 0 \
    pretrain_gpt.py "${ALL_FLAGS[@]}" "$@"
