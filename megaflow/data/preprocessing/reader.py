"""Input side of preprocessing: expand --input, then stream every input as chunks of documents.

Formats, told apart by name: JSON lines (`.jsonl`, `.json` or any other name), gzip (`.gz`) or
Zstandard (`.zst`) compressed JSON lines, Parquet (`.parquet`), and a directory written by Hugging Face
`datasets.Dataset.save_to_disk` (columnar.py reads the last two).

JSON-lines chunks are raw bytes (decoding and JSON parsing happen in the workers), cut at a newline,
about `chunk_bytes` long, so the main process does almost no work per document and memory stays
bounded. A line longer than `max_line_bytes` is never held whole: the reader skips to its end and
hands the worker an empty placeholder plus its length, so it is reported like any other bad line.
Each chunk carries its file and first line number, for messages and for --partitions order.
"""
from __future__ import annotations

import glob
import gzip
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

DEFAULT_MAX_LINE_BYTES = 64 << 20


class PreprocessError(RuntimeError):
    """Unusable input or option, or bad input under --strict; the message names the file (and line) or flag."""


@dataclass
class Chunk:
    file_index: int
    first_line: int        # 1-based line (row for columnar inputs), within its file, of the chunk's first document
    global_line: int       # 0-based index of that line over all inputs (partition assignment)
    data: bytes            # JSON lines; b"" for columnar chunks
    progress: int          # input bytes (compressed for .gz/.zst) consumed once this chunk is done
    records: object = None  # columnar inputs: a pyarrow RecordBatch holding the --json-keys columns
    too_long: Tuple[Tuple[int, int], ...] = ()  # (line offset in chunk, bytes) of lines the reader skipped


def input_format(path: str) -> str:
    if os.path.isdir(path):
        return "hf_dataset"
    name = path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return "jsonl"


def expand_inputs(spec: Union[str, Sequence[str]]) -> List[str]:
    """--input: files, saved-dataset directories or globs, given as several values and/or comma-separated;
    sorted within each glob, in the order given otherwise."""
    parts = [p for s in ([spec] if isinstance(spec, str) else spec) for p in s.split(",") if p]
    files = []
    for part in parts:
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise FileNotFoundError(f"--input {part!r}: no file matches")
        for f in matches:
            if not os.path.exists(f):
                raise FileNotFoundError(f"--input {f!r}: no such file")
        files.extend(matches)
    if not files:
        raise FileNotFoundError("--input: no input files given")
    return files


def check_inputs(files: List[str], json_keys: Sequence[str]) -> None:
    """Fail before any work on what no document could survive: a missing library, a directory that is not
    a saved dataset, columns that are not there. (Per-line problems are the workers' business.)"""
    from megaflow.data.preprocessing import columnar
    for f in files:
        fmt = input_format(f)
        if fmt == "zstd":
            _require("zstandard", f, ".zst")
        elif fmt in ("parquet", "hf_dataset"):
            _require("pyarrow", f, "Parquet and saved-dataset")
            columnar.check(f, fmt, json_keys)


def _require(module: str, path: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise PreprocessError(f"--input {path}: reading {what} input needs the {module} package "
                              f"(pip install {module}, or pip install 'megaflow[data]')") from None


def input_size(path: str) -> int:
    if os.path.isdir(path):
        from megaflow.data.preprocessing import columnar
        return sum(os.path.getsize(f) for f in columnar.dataset_files(path))
    return os.path.getsize(path)


def total_input_bytes(files: List[str]) -> int:
    return sum(input_size(f) for f in files)


def read_chunks(files: List[str], chunk_bytes: int = 1 << 20, json_keys: Optional[Sequence[str]] = None,
                max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Chunk]:
    """Chunks of every input in order. json_keys: the columns to read from columnar inputs."""
    done_bytes = 0
    global_line = 0
    for fi, path in enumerate(files):
        fmt = input_format(path)
        if fmt in ("parquet", "hf_dataset"):
            from megaflow.data.preprocessing import columnar
            chunks = columnar.read(path, fmt, fi, list(json_keys or ["text"]), chunk_bytes, done_bytes, global_line)
        else:
            chunks = _read_lines(path, fmt, fi, chunk_bytes, max_line_bytes, done_bytes, global_line)
        for ch in chunks:
            yield ch
            global_line = ch.global_line + _documents_in(ch)
        done_bytes += input_size(path)


def _documents_in(ch: Chunk) -> int:
    if ch.records is not None:
        return ch.records.num_rows
    return ch.data.count(b"\n") + (0 if ch.data.endswith(b"\n") else 1)


def _open(path: str, fmt: str):
    raw = open(path, "rb")
    if fmt == "gzip":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    if fmt == "zstd":
        return raw, ZstdStream(raw)
    return raw, raw


class ZstdStream:
    """read(n) over a .zst file of one or more frames (concatenated files are common). zstandard's own
    stream_reader ends quietly at a truncated frame; this raises, so a cut download is not half-read."""

    def __init__(self, raw, read_size: int = 1 << 15):
        import zstandard
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw, self._read_size = raw, read_size
        self._d, self._in_frame = self._new(), False
        self._buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self._raw.read(self._read_size)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends in the middle of a Zstandard frame")
                break
            while data:
                self._buf += self._d.decompress(data)
                self._in_frame = not self._d.eof
                data = b""
                if self._d.eof:  # the frame is complete; whatever follows starts the next one
                    data, self._d = self._d.unused_data, self._new()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        pass


def _read_lines(path, fmt, fi, chunk_bytes, max_line_bytes, done_bytes, global_line) -> Iterator[Chunk]:
    raw, stream = _open(path, fmt)
    line = 1
    tail: List[bytes] = []   # the pieces of an unfinished line (a list: no quadratic re-concatenation)
    tail_len = 0
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except Exception as e:  # a truncated or corrupt .gz/.zst: the whole file, not one line, is bad
                raise PreprocessError(f"{path}: cannot read past line {line} ({type(e).__name__}: {e}); "
                                      "the file is truncated or corrupt") from None
            if not block:
                break
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # still inside one line
                tail.append(block)
                tail_len += len(block)
                if tail_len > max_line_bytes:
                    nbytes, ended = _skip_line(stream, tail_len, chunk_bytes, tail)
                    yield Chunk(fi, line, global_line, b"\n", done_bytes + raw.tell(), too_long=((0, nbytes),))
                    line += 1
                    global_line += 1
                    if not ended:
                        return
                    rest = tail.pop()
                    cut = rest.rfind(b"\n") + 1
                    if cut:  # whole lines right after the skipped one
                        yield Chunk(fi, line, global_line, rest[:cut], done_bytes + raw.tell())
                        n = rest.count(b"\n")
                        line += n
                        global_line += n
                    tail, tail_len = [rest[cut:]], len(rest) - cut
                continue
            data = b"".join(tail + [block[:cut]])
            tail, tail_len = [block[cut:]], len(block) - cut
            n = data.count(b"\n")
            yield Chunk(fi, line, global_line, data, done_bytes + raw.tell())
            line += n
            global_line += n
        rest = b"".join(tail)
        if rest:  # last line without a trailing newline
            yield Chunk(fi, line, global_line, rest, done_bytes + raw.tell())
    finally:
        stream.close()
        raw.close()


def _skip_line(stream, nbytes: int, chunk_bytes: int, tail: List[bytes]):
    """Read to the end of an oversized line. Returns (its length, whether a newline ended it); `tail`
    is left holding whatever followed that newline."""
    tail.clear()
    while True:
        block = stream.read(chunk_bytes)
        if not block:
            return nbytes, False
        nl = block.find(b"\n")
        if nl >= 0:
            tail.append(block[nl + 1:])
            return nbytes + nl, True
        nbytes += len(block)


def count_lines(files: List[str]) -> int:
    """Documents over all inputs (a trailing line without newline counts)."""
    return sum(_documents_in(ch) for ch in read_chunks(files, 4 << 20))
