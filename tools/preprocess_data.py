#!/usr/bin/env python
"""Tokenize JSONL corpora into Megatron .bin/.idx files (drop-in for Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --append-eod --workers 2

See docs/data.md for every flag; the implementation lives in megaflow/data/preprocessing/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.data.preprocessing.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
