"""Command line of tools/preprocess_data.py: Megatron-LM's flags plus cleaning and robustness options."""
from __future__ import annotations

import argparse
import sys

from megaflow.data.preprocessing.reader import DEFAULT_MAX_LINE_BYTES
from megaflow.data.tokenizers import TOKENIZER_TYPES, TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py", allow_abbrev=False,
        description="JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet or a saved Hugging Face dataset -> Megatron "
                    ".bin/.idx (MMIDIDX v1). A drop-in for Megatron-LM's tools/preprocess_data.py: same flags, "
                    "same output bytes, streaming and bounded memory; a bad document is skipped and reported.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="one or more inputs (files, globs, comma-separated lists), read in order: .jsonl (any other "
                        "name is read as JSON lines too), .jsonl.gz, .jsonl.zst, .parquet, or a directory written "
                        "by datasets' save_to_disk")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract (default: text); the column names for Parquet and saved datasets")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (a built-in punctuation splitter; output level 'sentence')")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between split sentences")
    g.add_argument("--lang", default="english", help="accepted for compatibility (the splitter is language-neutral)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="tokenizer.json (or its folder) / SentencePiece .model")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_{level}.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: tokenize in the main process)")
    g.add_argument("--partitions", type=int, default=1,
                   help="Megatron's document order for N partitions (round-robin lines); no temp JSONL files")
    g.add_argument("--keep-sequential-samples", action="store_true", help="with --partitions: keep input order")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    g.add_argument("--quiet", action="store_true", help="no progress display")
    g.add_argument("--chunk-bytes", type=int, default=1 << 19, help="input bytes per work item")
    g = p.add_argument_group("cleaning (all off by default)")
    g.add_argument("--strip-html", action="store_true", help="remove HTML tags, scripts, styles; unescape entities")
    g.add_argument("--normalize-unicode", action="store_true", help="NFKC-normalise the text")
    g.add_argument("--min-chars", type=int, help="drop documents shorter than N characters (after cleaning)")
    g.add_argument("--max-chars", type=int, help="drop documents longer than N characters (after cleaning)")
    g.add_argument("--dedup", action="store_true", help="drop exact duplicates (hash of the normalised text)")
    g = p.add_argument_group("bad input")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first document that would be skipped (malformed, wrong type, rejected by the "
                        "tokenizer, ...) instead of skipping it")
    g.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                   help="skip (and report) lines longer than this; the reader never holds more of one (default 64 MiB)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.partitions < 1:
        p.error("--partitions must be >= 1")
    if args.log_interval < 1:
        p.error("--log-interval must be >= 1")
    for flag in ("min_chars", "max_chars"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.min_chars is not None and args.max_chars is not None and args.min_chars > args.max_chars:
        p.error("--min-chars is larger than --max-chars")
    if args.chunk_bytes < 1024:
        p.error("--chunk-bytes must be at least 1024")
    if args.max_line_bytes < 1024:
        p.error("--max-line-bytes must be at least 1024")
    return args


def main(argv=None) -> int:
    from concurrent.futures.process import BrokenProcessPool
    from megaflow.data.preprocessing.pipeline import PreprocessError, format_summary, run
    args = parse_args(argv)
    try:
        stats = run(args)
    except (PreprocessError, TokenizerError, OSError) as e:  # OSError: unreadable input, full disk
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("preprocess_data.py: error: a worker process died (out of memory? try fewer --workers or a "
              "smaller --chunk-bytes); no output was written", file=sys.stderr)
        return 1
    print(format_summary(stats))
    return 0
