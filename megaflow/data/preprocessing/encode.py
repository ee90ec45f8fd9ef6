"""Worker side of preprocessing: a chunk of input -> token arrays, per-document metadata, issues.

Megatron's per-document semantics: each JSON key is tokenized separately; a string value is one
sequence (or several with --split-sentences), a list of strings is one sequence per non-empty entry;
--append-eod adds EOD to a document's last sequence. Unlike Megatron, nothing confined to one document
stops the run: a bad line, a wrong type, text the tokenizer rejects or an empty document is counted
under its reason (documents.py), reported with its file and line, and skipped for all keys at once,
so the outputs stay aligned. The worker catches it where it happens; the run never sees a traceback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional

import numpy as np

from megaflow.data.preprocessing.clean import Cleaner, text_hash
from megaflow.data.preprocessing.documents import ISSUES, Skip, records, split_sentences, texts_of
from megaflow.data.preprocessing.reader import DEFAULT_MAX_LINE_BYTES, Chunk

MAX_EXAMPLES = 5  # issue examples kept per category (per chunk here, overall in the summary)
__all__ = ["ISSUES", "MAX_EXAMPLES", "EncoderSpec", "Encoded", "init_worker", "encode_chunk", "split_sentences"]


@dataclass
class EncoderSpec:
    json_keys: List[str]
    tokenizer: Dict[str, object]           # DataConfig-style fields for build_tokenizer
    dtype: str
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    cleaning: Dict[str, object] = field(default_factory=dict)
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES


@dataclass
class Encoded:
    """One chunk's output. Arrays cover the kept documents only, in input order."""
    tokens: Dict[str, np.ndarray]          # key -> all tokens
    seq_lengths: Dict[str, np.ndarray]     # key -> int32 length of each sequence
    doc_nseq: Dict[str, np.ndarray]        # key -> int32 sequences per document
    doc_lines: np.ndarray                  # int64 global line index of each document
    doc_hashes: Optional[np.ndarray]       # uint64 text hash per document (with --dedup)
    counts: Dict[str, int]                 # documents dropped per reason, blank lines
    examples: List[tuple]                  # (reason, file_index, line, message), first few per reason
    chars: int                             # characters of the kept documents
    nbytes: int                            # input bytes of the chunk
    progress: int
    lines: int = 0                         # lines (rows) the chunk held: kept + skipped + blank


class _State:
    tokenizer = None
    cleaner: Cleaner = None
    spec: EncoderSpec = None
    vocab_size: int = 0


def init_worker(spec: EncoderSpec, single_threaded: bool = True) -> None:
    """Pool initializer: one tokenizer per process. Each worker owns one core, so the Rust
    tokenizers' own thread pool is switched off (it would oversubscribe the cores)."""
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from types import SimpleNamespace
    from megaflow.data.tokenizers import build_tokenizer
    _State.spec = spec
    _State.tokenizer = build_tokenizer(SimpleNamespace(**spec.tokenizer))
    if single_threaded and hasattr(_State.tokenizer, "num_threads"):
        _State.tokenizer.num_threads = 1
    _State.cleaner = Cleaner(**spec.cleaning)
    _State.vocab_size = _State.tokenizer.vocab_size


def encode_chunk(chunk: Chunk) -> Encoded:
    spec, cleaner, tok = _State.spec, _State.cleaner, _State.tokenizer
    keys = spec.json_keys
    counts = {k: 0 for k in ISSUES + ("min_chars", "max_chars", "blank_lines")}
    examples: List[tuple] = []

    def issue(reason, line, msg):
        counts[reason] += 1
        if sum(1 for e in examples if e[0] == reason) < MAX_EXAMPLES:
            examples.append((reason, chunk.file_index, line, msg))

    # Lone surrogates can only come from \ud800-\udfff escapes: look for them only where one is written.
    check_unicode = b"\\ud" in chunk.data or b"\\uD" in chunk.data
    texts = {k: [] for k in keys}      # key -> per document: list of sequences (strings)
    doc_lines, hashes, chars, nlines = [], [], 0, 0
    for i, rec in records(chunk, keys, spec.max_line_bytes):
        nlines += 1
        if rec is None:
            counts["blank_lines"] += 1
            continue
        try:
            if isinstance(rec, Skip):
                raise rec
            doc = {k: [cleaner.clean(t) for t in seqs] for k, seqs in texts_of(rec, keys, check_unicode).items()}
            if any(not any(t.strip() for t in doc[k]) for k in keys):
                raise Skip("empty", "empty text")
            whole = "".join(doc[keys[0]]) if len(keys) == 1 else "\x00".join("".join(doc[k]) for k in keys)
            verdict = cleaner.length_verdict(whole)
            if verdict:
                counts[verdict] += 1
                continue
            if spec.split_sentences:
                doc = {k: [s for t in doc[k] for s in split_sentences(t, spec.keep_newlines)] for k in keys}
            digest = text_hash(whole) if cleaner.dedup else None
        except Skip as e:
            issue(e.reason, chunk.first_line + i, e.message)
            continue
        except Exception as e:  # a failure nobody foresaw, still confined to this document
            issue("error", chunk.first_line + i, f"{type(e).__name__}: {e}")
            continue
        if digest is not None:
            hashes.append(digest)
        chars += len(whole)
        for k in keys:
            texts[k].append(doc[k])
        doc_lines.append(chunk.global_line + i)

    def line_of(j):
        return chunk.first_line + doc_lines[j] - chunk.global_line

    encoded = {k: _encode(tok, texts[k]) for k in keys}
    keep = np.ones(len(doc_lines), dtype=bool)
    for k in keys:
        for j, why in encoded[k][1].items():
            if keep[j]:
                issue("tokenizer_error", line_of(j), f"key {k!r}: {why}")
            keep[j] = False
    out_tokens, out_lens, out_nseq = {}, {}, {}
    for k in keys:
        out_tokens[k], out_nseq[k], out_lens[k] = _pack(encoded[k][0], texts[k])
        bad = _out_of_vocab(out_tokens[k], out_lens[k], out_nseq[k], _State.vocab_size)
        for j in np.flatnonzero(bad & keep):
            issue("tokenizer_error", line_of(j), f"key {k!r}: token id outside the vocabulary [0, {_State.vocab_size})")
        keep &= ~bad
    for j in np.flatnonzero(keep & np.logical_or.reduce([out_nseq[k] == 0 for k in keys])):
        issue("empty", line_of(j), "no tokens after tokenization")
    for k in keys:
        keep &= out_nseq[k] > 0
    if not keep.all():
        for k in keys:
            out_tokens[k], out_lens[k], out_nseq[k] = _select(out_tokens[k], out_lens[k], out_nseq[k], keep)
    dtype = np.dtype(spec.dtype)
    for k in keys:
        t, lens = out_tokens[k], out_lens[k]
        if spec.append_eod and len(lens):
            last = np.cumsum(out_nseq[k]) - 1          # each document's last sequence
            t = np.insert(t, np.cumsum(lens)[last], tok.eod)
            lens = lens.copy()
            lens[last] += 1
        out_tokens[k], out_lens[k] = t.astype(dtype, copy=False), lens
    nbytes = len(chunk.data) if chunk.records is None else chunk.records.nbytes
    return Encoded(out_tokens, out_lens, out_nseq, np.asarray(doc_lines, np.int64)[keep],
                   np.asarray(hashes, np.uint64)[keep] if cleaner.dedup else None, counts, examples,
                   chars, nbytes, chunk.progress, nlines)


def _encode(tok, docs: List[List[str]]):
    """Token lists of every sequence of every document, in one batch; when the batch raises, document
    by document, so only the documents the tokenizer rejects are lost. Returns (lists or None per
    document, {document: why it failed})."""
    flat = [s for seqs in docs for s in seqs]
    try:
        encoded = tok.tokenize_batch(flat) if flat else []
        out, pos = [], 0
        for seqs in docs:
            out.append(encoded[pos:pos + len(seqs)])
            pos += len(seqs)
        return out, {}
    except Exception:
        pass
    out, failed = [], {}
    for j, seqs in enumerate(docs):
        try:
            out.append(tok.tokenize_batch(seqs))
        except Exception as e:
            out.append(None)
            failed[j] = f"{type(e).__name__}: {e}"[:300]
    return out, failed


def _pack(per_doc, docs: List[List[str]]):
    """(all ids int64, sequences per document int32, lengths of the non-empty sequences int32); a
    failed document (None) has no sequences."""
    seqs = [s for enc in per_doc if enc is not None for s in enc]
    counts = [len(enc) if enc is not None else 0 for enc in per_doc]
    doc_of_seq = np.repeat(np.arange(len(docs)), counts)
    lens = np.fromiter(map(len, seqs), dtype=np.int32, count=len(seqs))
    ids = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    nonempty = lens > 0
    nseq = np.bincount(doc_of_seq[nonempty], minlength=len(docs)).astype(np.int32)
    return ids, nseq, lens[nonempty]


def _out_of_vocab(ids, seq_lens, nseq, vocab_size) -> np.ndarray:
    """Which documents hold an id the dtype or the model cannot represent (a tokenizer bug, or a
    NullTokenizer text with numbers past --vocab-size)."""
    bad_tok = (ids < 0) | (ids >= vocab_size)
    if not bad_tok.any():
        return np.zeros(len(nseq), dtype=bool)
    seq_of_tok = np.repeat(np.arange(len(seq_lens)), seq_lens)
    doc_of_seq = np.repeat(np.arange(len(nseq)), nseq)
    return np.bincount(doc_of_seq[seq_of_tok[bad_tok]], minlength=len(nseq)) > 0


def _select(tokens: np.ndarray, seq_lens: np.ndarray, nseq: np.ndarray, keep: np.ndarray):
    """The documents where keep is True (arrays as produced by _pack)."""
    seq_keep = np.repeat(keep, nseq)
    tok_keep = np.repeat(seq_keep, seq_lens)
    return tokens[tok_keep], seq_lens[seq_keep], nseq[keep]
