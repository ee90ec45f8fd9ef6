#!/usr/bin/env bash
# A tiny DeepSeek-V3 pretrained on CPU in minutes, then exported as a Hugging Face
# DeepseekV3ForCausalLM folder. DeepSeek-V3's shape: multi-latent attention (query and key/value
# latents, a decoupled RoPE part), a leading dense layer, then MoE layers with sigmoid routing,
# aux-loss-free balancing (expert bias), group-limited choice and a shared expert, and a
# multi-token-prediction module (its loss in the log as mtp_1 loss; dropped on export) (docs/models.md).
# Data: the quickstart's (examples/cpu_corpus.sh, shared in $OUT). Extra arguments go to pretrain_gpt.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
source examples/cpu_corpus.sh

python pretrain_gpt.py \
    --model-style llama --num-layers 4 --hidden-size 256 --ffn-hidden-size 768 --num-attention-heads 4 \
    --multi-latent-attention --q-lora-rank 128 --kv-lora-rank 64 \
    --qk-head-dim 32 --qk-pos-emb-head-dim 16 --v-head-dim 32 --norm-epsilon 1e-6 \
    --num-experts 8 --moe-ffn-hidden-size 128 --moe-router-topk 2 --moe-layer-freq "([0]*1+[1]*3)" \
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias \
    --moe-router-num-groups 4 --moe-router-group-topk 1 --moe-shared-expert-intermediate-size 128 \
    --moe-aux-loss-coeff 0.001 --moe-grouped-gemm --mtp-num-layers 1 \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    "${DATA_FLAGS[@]}" \
    --train-iters 400 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --hidden-dropout 0.0 --attention-dropout 0.0 --weight-decay 0.1 --clip-grad 1.0 \
    --log-interval 10 --eval-interval 200 --eval-iters 4 \
    --save "$OUT/deepseek_v3/checkpoints" --save-interval 400 "$@"

python tools/checkpoint/convert_to_hf.py --load "$OUT/deepseek_v3/checkpoints" --save "$OUT/deepseek_v3/hf"
python tools/generate.py --load "$OUT/deepseek_v3/checkpoints" --prompt "Return the" --max-new-tokens 24 --greedy
