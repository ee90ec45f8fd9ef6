# The CPU recipes' data, sourced by quickstart_cpu.sh, pretrain_qwen3_tiny_cpu.sh and
# pretrain_deepseek_v3_tiny_cpu.sh: a corpus any machine can build offline (the Python standard
# library's own docstrings), a byte-level BPE tokenizer trained on it, Megatron-compatible .bin/.idx
# data. Everything goes to $OUT; steps whose outputs exist are not redone (recipes share them).
mkdir -p "$OUT"

[ -f "$OUT/corpus.jsonl" ] || python tools/make_corpus.py --output "$OUT/corpus.jsonl" --source docstrings --max-mb 4

[ -f "$OUT/tokenizer/tokenizer.json" ] || python tools/train_tokenizer.py --input "$OUT/corpus.jsonl" \
    --tokenizer-type HuggingFaceTokenizer --vocab-size 4096 --output "$OUT/tokenizer"

[ -f "$OUT/stdlib_text_document.idx" ] || python tools/preprocess_data.py --input "$OUT/corpus.jsonl" \
    --output-prefix "$OUT/stdlib" --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$OUT/tokenizer/tokenizer.json" --append-eod --workers 2

DATA_FLAGS=(--data-path "$OUT/stdlib_text_document" --split 98,2,0
            --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer/tokenizer.json" --num-workers 1)
