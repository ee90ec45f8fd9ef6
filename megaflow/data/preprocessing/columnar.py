"""Columnar inputs of preprocessing: Parquet files and saved Hugging Face dataset directories.

Both are read with pyarrow (imported lazily; the `data` extra), only the --json-keys columns, and
handed to the workers as compact record batches of about --chunk-bytes each, so memory holds one
Parquet row group or one Arrow batch of those columns, never the file:
- Parquet: row group by row group (`ParquetFile.read_row_group`).
- `datasets.Dataset.save_to_disk` directories: state.json lists the Arrow stream files in order
  (`data-0000i-of-0000n.arrow`); they are memory-mapped and read batch by batch. save_to_disk
  flattens any index mapping first, so file order is row order. (No `datasets` import is needed: its
  import costs seconds and a heavy dependency tree.) A DatasetDict directory names its splits instead.
A row is a document; its "line" in messages is its 1-based row number within the file or directory.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, List, Sequence

from megaflow.data.preprocessing.reader import Chunk, PreprocessError


def dataset_files(folder: str) -> List[str]:
    """The Arrow files of a save_to_disk directory, in row order."""
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            with open(os.path.join(folder, "dataset_dict.json")) as fh:
                splits = json.load(fh).get("splits", [])
            raise PreprocessError(f"--input {folder}: a DatasetDict with splits {splits}; name one split's "
                                  f"directory, e.g. --input {os.path.join(folder, splits[0] if splits else 'train')}")
        raise PreprocessError(f"--input {folder}: a directory, but not one written by datasets' save_to_disk "
                              "(no state.json); give files or a glob such as DIR/*.jsonl")
    with open(state) as fh:
        names = [d["filename"] for d in json.load(fh).get("_data_files", [])]
    return [os.path.join(folder, n) for n in names]


def _schema_names(path: str, fmt: str) -> List[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if fmt == "parquet":
            return pq.ParquetFile(path).schema_arrow.names
        files = dataset_files(path)
        if not files:
            return []
        with pa.memory_map(files[0]) as src:
            return pa.ipc.open_stream(src).schema.names
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet file" if fmt == "parquet" else "saved dataset"
        raise PreprocessError(f"--input {path}: not a readable {kind} ({e})") from None


def check(path: str, fmt: str, json_keys: Sequence[str]) -> None:
    names = _schema_names(path, fmt)
    missing = [k for k in json_keys if k not in names]
    if missing and names:
        raise PreprocessError(f"--input {path}: no column {', '.join(map(repr, missing))} (--json-keys); "
                              f"its columns are {names}")


def read(path: str, fmt: str, fi: int, keys: List[str], chunk_bytes: int, done_bytes: int,
         global_line: int) -> Iterator[Chunk]:
    """Chunks whose `records` hold about chunk_bytes of the key columns each."""
    import pyarrow as pa
    row = 1
    size = 0
    try:
        if fmt == "parquet":
            batches, total_rows, size = _parquet_batches(path, keys, chunk_bytes)
        else:
            batches, total_rows, size = _dataset_batches(path, keys, chunk_bytes)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            row += batch.num_rows
            progress = done_bytes + (size * (row - 1) // max(total_rows, 1))
            yield Chunk(fi, row - batch.num_rows, global_line, b"", progress, records=batch)
            global_line += batch.num_rows
    except pa.ArrowException as e:
        raise PreprocessError(f"{path}: cannot read past row {row} ({e}); the file is truncated or corrupt") from None


def _parquet_batches(path: str, keys: List[str], chunk_bytes: int):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)

    def batches():
        # One row group of the key columns at a time: Parquet's unit of reading (its encoded sizes say
        # little about decoded text, so chunks are cut by the decoded Arrow size).
        for i in range(pf.metadata.num_row_groups):
            for batch in pf.read_row_group(i, columns=keys).to_batches():
                yield from _pieces(batch, chunk_bytes)
    return batches(), pf.metadata.num_rows, os.path.getsize(path)


def _dataset_batches(path: str, keys: List[str], chunk_bytes: int):
    import pyarrow as pa
    files = dataset_files(path)
    total_rows, size = 0, 0
    for f in files:
        with pa.memory_map(f) as src:
            total_rows += sum(b.num_rows for b in pa.ipc.open_stream(src))  # touches message headers only
        size += os.path.getsize(f)

    def batches():
        for f in files:
            with pa.memory_map(f) as src:
                for batch in pa.ipc.open_stream(src):
                    yield from _pieces(batch.select(keys), chunk_bytes)
    return batches(), total_rows, size


def _pieces(batch, chunk_bytes: int):
    """About chunk_bytes of rows at a time, each copied into a compact batch of its own: a batch may
    outlive a memory map in the pool's queue, and a slice would pickle with its parent's whole buffers."""
    import pyarrow as pa
    rows = _rows_per_chunk(batch.nbytes, batch.num_rows, chunk_bytes)
    for start in range(0, batch.num_rows, rows):
        yield pa.concat_batches([batch.slice(start, rows)])


def _rows_per_chunk(nbytes: int, nrows: int, chunk_bytes: int) -> int:
    per_row = max(1, nbytes // max(nrows, 1))
    return int(min(max(1, chunk_bytes // per_row), 1 << 16))
