"""Input side of preprocessing: expand --input, then stream the files as chunks of whole lines.

Chunks are raw bytes (decoding and JSON parsing happen in the workers), cut at a newline, about
`chunk_bytes` long, so the main process does almost no work per document and memory stays bounded.
Each chunk carries its file and first line number, for error messages and for --partitions order.
"""
from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass
from typing import Iterator, List


@dataclass
class Chunk:
    file_index: int
    first_line: int        # 1-based line number, within its file, of the chunk's first line
    global_line: int       # 0-based index of that line over all inputs (partition assignment)
    data: bytes
    progress: int          # input bytes (compressed for .gz) consumed once this chunk is done


def expand_inputs(spec: str) -> List[str]:
    """--input: a file, a glob, or a comma-separated list of either; sorted within each glob."""
    files = []
    for part in [p for p in spec.split(",") if p]:
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise FileNotFoundError(f"--input {part!r}: no file matches")
        for f in matches:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--input {f!r}: no such file")
        files.extend(matches)
    if not files:
        raise FileNotFoundError("--input: no input files given")
    return files


def total_input_bytes(files: List[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def read_chunks(files: List[str], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    done_bytes = 0
    global_line = 0
    for fi, path in enumerate(files):
        raw = open(path, "rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        line = 1
        tail = b""
        try:
            while True:
                block = stream.read(chunk_bytes)
                if not block:
                    break
                block = tail + block
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # a line longer than the chunk: keep reading until it ends
                    tail = block
                    continue
                data, tail = block[:cut], block[cut:]
                n = data.count(b"\n")
                yield Chunk(fi, line, global_line, data, done_bytes + raw.tell())
                line += n
                global_line += n
            if tail:  # last line without a trailing newline
                yield Chunk(fi, line, global_line, tail, done_bytes + raw.tell())
                global_line += 1
        finally:
            stream.close()
            raw.close()
        done_bytes += os.path.getsize(path)


def count_lines(files: List[str]) -> int:
    """Lines over all inputs (a trailing line without newline counts), for --keep-sequential-samples."""
    total = 0
    for ch in read_chunks(files, 4 << 20):
        total += ch.data.count(b"\n") + (0 if ch.data.endswith(b"\n") else 1)
    return total
