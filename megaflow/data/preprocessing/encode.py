"""Worker side of preprocessing: a chunk of JSONL bytes -> token arrays, per-document metadata, issues.

Megatron's per-document semantics: each JSON key is tokenized separately; a string value is one
sequence (or several with --split-sentences), a list of strings is one sequence per non-empty entry;
--append-eod adds EOD to a document's last sequence. Unlike Megatron, a bad line (malformed JSON,
non-UTF-8 bytes, a missing key) or an empty document is counted and skipped instead of crashing or
writing an empty document; a document is skipped for all keys at once, so the outputs stay aligned.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional

import numpy as np

from megaflow.data.preprocessing.clean import Cleaner, text_hash
from megaflow.data.preprocessing.reader import Chunk

ISSUES = ("malformed_json", "non_utf8", "missing_key", "empty")
MAX_EXAMPLES = 5  # issue examples kept per category (per chunk here, overall in the summary)

_SENT_END = re.compile(r"[.!?]+[\"')\]]*(\s+)")


def split_sentences(text: str, keep_newlines: bool = False) -> List[str]:
    """A dependency-free sentence splitter: breaks after ., ! or ? (and closing quotes) followed by
    whitespace. With keep_newlines, newlines after a sentence stay attached to it."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.start(1)
        if keep_newlines:
            ws = m.group(1)
            end += len(ws) - len(ws.lstrip("\n"))
        s = text[start:end]
        if s.strip():
            out.append(s if keep_newlines else s.strip())
        start = m.end()
    s = text[start:]
    if s.strip():
        out.append(s if keep_newlines else s.strip())
    return out


@dataclass
class EncoderSpec:
    json_keys: List[str]
    tokenizer: Dict[str, object]           # DataConfig-style fields for build_tokenizer
    dtype: str
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    cleaning: Dict[str, object] = field(default_factory=dict)


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


class _State:
    tokenizer = None
    cleaner: Cleaner = None
    spec: EncoderSpec = None


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


def encode_chunk(chunk: Chunk) -> Encoded:
    spec, cleaner, tok = _State.spec, _State.cleaner, _State.tokenizer
    keys = spec.json_keys
    counts = {k: 0 for k in ISSUES + ("min_chars", "max_chars", "blank_lines")}
    examples: List[tuple] = []

    def issue(reason, line, msg):
        counts[reason] += 1
        if sum(1 for e in examples if e[0] == reason) < MAX_EXAMPLES:
            examples.append((reason, chunk.file_index, line, msg))

    lines = chunk.data.split(b"\n")
    if chunk.data.endswith(b"\n"):
        lines.pop()
    texts = {k: [] for k in keys}      # key -> per document: list of sequences (strings)
    doc_lines, hashes, chars = [], [], 0
    for i, raw in enumerate(lines):
        lineno = chunk.first_line + i
        if not raw.strip():
            counts["blank_lines"] += 1
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            issue("non_utf8", lineno, f"invalid UTF-8 byte at column {e.start + 1}")
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            issue("malformed_json", lineno, str(e))
            continue
        if not isinstance(obj, dict):
            issue("malformed_json", lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        doc, bad = {}, None
        for k in keys:
            v = obj.get(k)
            if isinstance(v, str):
                doc[k] = [cleaner.clean(v)]
            elif isinstance(v, list) and all(isinstance(s, str) for s in v):
                doc[k] = [cleaner.clean(s) for s in v]
            else:
                bad = f"key {k!r} is missing" if v is None else f"key {k!r} is not a string"
                break
        if bad:
            issue("missing_key", lineno, bad)
            continue
        if any(not any(s.strip() for s in doc[k]) for k in keys):
            issue("empty", lineno, "empty text")
            continue
        whole = "".join(doc[keys[0]]) if len(keys) == 1 else "\x00".join("".join(doc[k]) for k in keys)
        verdict = cleaner.length_verdict(whole)
        if verdict:
            counts[verdict] += 1
            continue
        if cleaner.dedup:
            hashes.append(text_hash(whole))
        chars += len(whole)
        for k in keys:
            seqs = doc[k]
            if spec.split_sentences:
                seqs = [s for t in seqs for s in split_sentences(t, spec.keep_newlines)]
            texts[k].append(seqs)
        doc_lines.append(chunk.global_line + i)

    out_tokens, out_lens, out_nseq = {}, {}, {}
    keep = np.ones(len(doc_lines), dtype=bool)
    for k in keys:
        ids, nseq, seq_lens = _tokenize(tok, texts[k])
        out_tokens[k], out_lens[k], out_nseq[k] = ids, seq_lens, nseq
        keep &= nseq > 0  # every sequence tokenized to nothing
    if not keep.all():
        for j in np.flatnonzero(~keep):
            issue("empty", chunk.first_line + doc_lines[j] - chunk.global_line, "no tokens after tokenization")
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
    return Encoded(out_tokens, out_lens, out_nseq, np.asarray(doc_lines, np.int64)[keep],
                   np.asarray(hashes, np.uint64)[keep] if cleaner.dedup else None, counts, examples,
                   chars, len(chunk.data), chunk.progress)


def _tokenize(tok, docs: List[List[str]]):
    """Tokenize every sequence of every document in one batch; drop sequences with no tokens."""
    flat = [s for seqs in docs for s in seqs]
    doc_of_seq = np.repeat(np.arange(len(docs)), [len(s) for s in docs])
    encoded = tok.tokenize_batch(flat) if flat else []
    lens = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lens.sum()))
    nonempty = lens > 0
    nseq = np.bincount(doc_of_seq[nonempty], minlength=len(docs)).astype(np.int32)
    return ids, nseq, lens[nonempty]


def _select(tokens: np.ndarray, seq_lens: np.ndarray, nseq: np.ndarray, keep: np.ndarray):
    """The documents where keep is True (arrays as produced by _tokenize)."""
    seq_keep = np.repeat(keep, nseq)
    tok_keep = np.repeat(seq_keep, seq_lens)
    return tokens[tok_keep], seq_lens[seq_keep], nseq[keep]
