# Flags of the Llama-3-8B-style recipe, sourced by pretrain_llama3_8b.sh (torchrun) and
# pretrain_llama3_8b.sbatch (SLURM). Layout for N nodes x 8 GPUs: TP = 8 inside a node (NVLink),
# PP = 4 across nodes with 2 interleaved chunks per stage, DP = N / 4 (N a multiple of 4), ZeRO-2.
# tools/estimate.py chose it for 64 x 80 GB H100s (TP and PP fixed there): about 16 GiB per GPU, so
# there is room for longer sequences or a larger micro-batch.
# Check it anywhere, without GPUs: python pretrain_gpt.py --dry-run --world-size 64 <these flags>
# (docs/launching.md). Override the locations with DATA, TOKENIZER and OUT.
DATA=${DATA:-/data/llama3/corpus_text_document}     # preprocess_data.py output prefix
TOKENIZER=${TOKENIZER:-/data/llama3/tokenizer}      # Hugging Face tokenizer folder (tokenizer.json)
OUT=${OUT:-runs/llama3-8b}
PP=${PP:-4}

MODEL=(--model-style llama --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
       --num-attention-heads 32 --group-query-attention --num-query-groups 8
       --seq-length 8192 --max-position-embeddings 8192 --rotary-base 500000 --norm-epsilon 1e-5
       --attention-dropout 0 --hidden-dropout 0)
PARALLEL=(--tensor-model-parallel-size 8 --sequence-parallel
          --pipeline-model-parallel-size "$PP" --num-layers-per-virtual-pipeline-stage 4
          --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
          --distributed-timeout-minutes 10)
TRAINING=(--micro-batch-size 2 --global-batch-size 512 --train-iters 250000
          --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
          --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
          --bf16 --low-precision-params --check-for-spiky-loss --device cuda)
DATA_ARGS=(--data-path "$DATA" --split 990,9,1
           --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --num-workers 2)
OUTPUT=(--save "$OUT/checkpoints" --save-interval 1000
        --log-interval 10 --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$OUT/tensorboard")
# Resume automatically when a checkpoint exists (after a failure, just launch again).
if [ -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ]; then
    OUTPUT+=(--load "$OUT/checkpoints")
fi
ALL_FLAGS=("${MODEL[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" "${DATA_ARGS[@]}" "${OUTPUT[@]}")
