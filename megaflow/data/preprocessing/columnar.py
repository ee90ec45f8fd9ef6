"""Columnar inputs of preprocessing: Parquet files and saved Hugging Face dataset directories.

Both are read with pyarrow (imported lazily; the `data` extra), only the --json-keys columns, one
record batch at a time, so memory holds a row group or an Arrow batch, never the file:
- Parquet: `ParquetFile.iter_batches`, with a batch size aimed at --chunk-bytes from the file's
  metadata (uncompressed bytes per row).
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
    md = pf.metadata
    nbytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    rows = _rows_per_chunk(nbytes, md.num_rows, chunk_bytes)
    # iter_batches decodes one row group at a time and yields fresh (not sliced) batches.
    return pf.iter_batches(batch_size=rows, columns=keys), md.num_rows, os.path.getsize(path)


def _dataset_batches(path: str, keys: List[str], chunk_bytes: int):
    import pyarrow as pa
    files = dataset_files(path)
    total_rows, size = 0, 0
    for f in files:
        with pa.memory_map(f) as src:
            total_rows += sum(b.num_rows for b in pa.ipc.open_stream(src))  # reads headers of mapped pages only
        size += os.path.getsize(f)

    def batches():
        for f in files:
            with pa.memory_map(f) as src:
                for batch in pa.ipc.open_stream(src):
                    batch = batch.select(keys)
                    rows = _rows_per_chunk(batch.nbytes, batch.num_rows, chunk_bytes)
                    for start in range(0, batch.num_rows, rows):
                        # Copied out of the mapping (a batch may outlive it in the pool's queue), and a
                        # slice would pickle with its parent's whole buffers: concat_batches copies the rows.
                        yield pa.concat_batches([batch.slice(start, rows)])
    return batches(), total_rows, size


def _rows_per_chunk(nbytes: int, nrows: int, chunk_bytes: int) -> int:
    per_row = max(1, nbytes // max(nrows, 1))
    return int(min(max(1, chunk_bytes // per_row), 1 << 16))
