"""The preprocessing run: reader -> worker processes (parse, clean, tokenize) -> one streaming writer.

The main process only slices the input into ~512 KiB chunks of lines (or Arrow record batches) and
writes results in order; the workers do all per-document work in batches, and catch every failure
that concerns one document (encode.py), so a run ends with complete outputs and a summary of what was
kept and what was skipped, by reason. At most `2 × workers + 2` chunks are in flight, so
memory is bounded by a few chunks' worth plus the dedup table, whatever the input size.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace
from typing import Dict, Iterator, List

import numpy as np

from megaflow.data.indexed_dataset import optimal_dtype
from megaflow.data.preprocessing import reader
from megaflow.data.preprocessing.documents import ISSUE_LABELS, ISSUES
from megaflow.data.preprocessing.encode import MAX_EXAMPLES, Encoded, EncoderSpec, encode_chunk, init_worker
from megaflow.data.preprocessing.reader import PreprocessError
from megaflow.data.preprocessing.progress import Progress
from megaflow.data.preprocessing.writer import OutputWriter
from megaflow.data.tokenizers import build_tokenizer

TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


__all__ = ["PreprocessError", "EncoderSpec", "encoded_stream", "run", "format_summary"]
FILTERS = ("min_chars", "max_chars")
def encoded_stream(files: List[str], spec: EncoderSpec, workers: int, chunk_bytes: int) -> Iterator[Encoded]:
    chunks = reader.read_chunks(files, chunk_bytes, json_keys=spec.json_keys, max_line_bytes=spec.max_line_bytes)
    if workers <= 0:  # in-process, for debugging and tiny inputs
        init_worker(spec, single_threaded=False)
        yield from map(encode_chunk, chunks)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # A ProcessPoolExecutor, not a Pool: a worker that dies (OOM killer, segfault) fails the run with
    # BrokenProcessPool instead of leaving its result pending forever.
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(spec,))
    try:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(encode_chunk, chunk))
            if len(pending) >= 2 * workers + 2:  # backpressure: never read far ahead of the workers
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run(args) -> Dict[str, object]:
    """Preprocess per `args` (the tools/preprocess_data.py namespace); returns the run's statistics."""
    files = reader.expand_inputs(args.input)
    reader.check_inputs(files, args.json_keys)
    tok_cfg = {f: getattr(args, f, None) for f in TOKENIZER_FIELDS}
    tokenizer = build_tokenizer(SimpleNamespace(**tok_cfg))
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    cleaning = dict(strip_html=args.strip_html, normalize_unicode=args.normalize_unicode,
                    min_chars=args.min_chars, max_chars=args.max_chars, dedup=args.dedup)
    spec = EncoderSpec(json_keys=list(args.json_keys), tokenizer=tok_cfg, dtype=dtype.name,
                       append_eod=args.append_eod, split_sentences=args.split_sentences,
                       keep_newlines=args.keep_newlines, cleaning=cleaning,
                       max_line_bytes=getattr(args, "max_line_bytes", None) or reader.DEFAULT_MAX_LINE_BYTES)
    level = "sentence" if args.split_sentences else "document"
    # --keep-sequential-samples keeps input order, which is what one partition gives.
    partitions = 1 if args.keep_sequential_samples else max(1, args.partitions)
    writer = OutputWriter(args.output_prefix, spec.json_keys, level, dtype, partitions=partitions,
                          dedup=args.dedup)
    total_bytes = reader.total_input_bytes(files)
    progress = Progress(total_bytes, args.log_interval, enabled=not args.quiet)
    counts = collections.Counter()
    examples: List[tuple] = []
    chars = lines = 0
    start = time.time()
    try:
        for enc in encoded_stream(files, spec, args.workers, args.chunk_bytes):
            if args.strict and enc.examples:
                reason, fi, line, msg = enc.examples[0]
                raise PreprocessError(f"{files[fi]}:{line}: {ISSUE_LABELS[reason]}: {msg} "
                                      "(--strict stops at the first bad line; without it such lines are skipped)")
            before_docs, before_tokens = writer.documents, writer.tokens
            writer.write(enc)
            counts.update(enc.counts)
            chars += enc.chars
            lines += enc.lines
            for ex in enc.examples:
                if sum(1 for e in examples if e[0] == ex[0]) < MAX_EXAMPLES:
                    examples.append(ex)
            progress.update(writer.documents - before_docs, writer.tokens - before_tokens, enc.nbytes,
                            enc.progress)
        outputs = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    elapsed = time.time() - start
    dropped = {k: counts[k] for k in ISSUES + FILTERS}
    return dict(files=files, outputs=outputs, documents=writer.documents, tokens=writer.tokens,
                input_bytes=progress.bytes, chars=chars, elapsed=elapsed, dtype=dtype.name,
                vocab_size=tokenizer.vocab_size, lines=lines, dropped=dropped,
                skipped=sum(dropped.values()) + writer.duplicates,
                duplicates=writer.duplicates, blank_lines=counts["blank_lines"],
                examples=[(r, files[fi], line, msg) for r, fi, line, msg in sorted(examples, key=lambda e: e[1:3])])


LABELS = dict(ISSUE_LABELS, min_chars="--min-chars", max_chars="--max-chars", duplicates="--dedup")


def format_summary(stats: Dict[str, object]) -> str:
    """kept + skipped (by reason) + blank lines = lines read, then a few examples as file:line: reason: why."""
    dt = max(stats["elapsed"], 1e-9)
    blank = f", {stats['blank_lines']:,} blank" if stats["blank_lines"] else ""
    lines = [
        "preprocess summary",
        f"  inputs        {len(stats['files'])} input(s), {stats['input_bytes'] / (1 << 20):,.1f} MB, "
        f"{stats['lines']:,} lines/rows",
        f"  documents     {stats['documents']:,} kept, {stats['skipped']:,} skipped{blank}",
        f"  written       {stats['documents']:,} documents, {stats['tokens']:,} tokens ({stats['dtype']}, "
        f"vocab {stats['vocab_size']:,})",
        f"  speed         {stats['documents'] / dt:,.1f} docs/s, {stats['tokens'] / dt:,.0f} tokens/s, "
        f"{stats['input_bytes'] / dt / (1 << 20):,.2f} MB/s in {dt:,.1f} s",
    ]
    dropped = dict(stats["dropped"], duplicates=stats["duplicates"])
    skipped = ", ".join(f"{LABELS[k]}: {v:,}" for k, v in dropped.items() if v)
    lines.append(f"  skipped       {skipped or 'none'}")
    for reason, path, line, msg in stats["examples"]:
        lines.append(f"    {path}:{line}: {LABELS[reason]}: {msg}")
    for out in stats["outputs"]:
        lines.append(f"  output        {out}")
    return "\n".join(lines)
