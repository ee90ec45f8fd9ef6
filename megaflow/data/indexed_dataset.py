"""Megatron's memory-mapped indexed dataset (.bin/.idx, "MMIDIDX" version 1): reader and builder.

Layout (FORMATS.md §1): `.bin` holds every sequence's tokens back to back; `.idx` is a 34-byte header
(magic, version, dtype code, N sequences, D = documents + 1) followed by int32 lengths[N], int64
byte pointers[N], int64 document boundaries[D] (and int8 modes[N] for multimodal data).

The reader memory-maps both files, so opening is constant-time whatever the size. The builder streams
everything to disk: sequence lengths and document boundaries go to side files as they arrive and the
index is assembled in fixed-size chunks at finalize, so memory stays bounded however large the corpus
(Megatron keeps them in Python lists, which runs out of memory on very large inputs).
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Optional, Sequence, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_CHUNK = 1 << 20  # elements per streamed block at finalize / add_index


def dtype_code(dtype) -> int:
    return CODES[np.dtype(dtype)]


def optimal_dtype(vocab_size: Optional[int]):
    """Megatron's choice: uint16 while every id fits comfortably, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def read_header(path: str):
    """(dtype, sequence_count, document_count) of an .idx file; errors name the file and say what was
    expected and what was found."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    if not head:
        raise ValueError(f"{path}: empty file (0 bytes); expected an MMIDIDX index (a {HEADER_SIZE}-byte header, "
                         "then the sequence table): an interrupted preprocessing run?")
    if not MAGIC.startswith(head[:len(MAGIC)]):
        raise ValueError(f"{path}: not an MMIDIDX index file (bad magic): expected the bytes {MAGIC!r} that "
                         f"Megatron's and megaflow's preprocessors write, found {head[:len(MAGIC)]!r}"
                         f"{_looks_like(head)}")
    if len(head) < HEADER_SIZE:
        raise ValueError(f"{path}: truncated: {len(head)} bytes, expected at least the {HEADER_SIZE}-byte header")
    version, code, n, d = struct.unpack("<QBQQ", head[9:])
    if version != VERSION:
        raise ValueError(f"{path}: unsupported index version {version} (expected {VERSION})")
    if code not in DTYPES:
        raise ValueError(f"{path}: unknown dtype code {code} (expected one of {sorted(DTYPES)})")
    return np.dtype(DTYPES[code]), n, d


def _looks_like(head: bytes) -> str:
    """A hint for files often passed by mistake in place of an .idx."""
    if head.startswith(b"\x93NUMPY"):
        return " (a numpy .npy file)"
    if head.lstrip()[:1] in (b"{", b"["):
        return " (JSON text: the input corpus, not the preprocessed index?)"
    if head.startswith(b"TNTIDX"):
        return " (the legacy Megatron 'lazy'/'cached' index format: re-run the preprocessor)"
    return ""


class IndexedDataset:
    """Read-only view of a prefix's .bin/.idx. `ds[i]` is sequence i (a numpy view into the mmap)."""

    def __init__(self, prefix: str, multimodal: bool = False):
        self.path_prefix = prefix
        self.multimodal = multimodal
        for p in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset {prefix!r}: missing {p}")
        self.dtype, n, d = read_header(idx_path(prefix))
        expected = HEADER_SIZE + 12 * n + 8 * d + (n if multimodal else 0)
        size = os.path.getsize(idx_path(prefix))
        if size < expected:
            raise ValueError(f"{idx_path(prefix)}: truncated: the header promises {n} sequences and {d} document "
                             f"boundaries ({expected} bytes), the file has {size} bytes")
        self._idx = np.memmap(idx_path(prefix), mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, n, off)
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, n, off + 4 * n)
        self.document_indices = np.frombuffer(self._idx, np.int64, d, off + 12 * n)
        self.sequence_modes = np.frombuffer(self._idx, np.int8, n, off + 12 * n + 8 * d) if multimodal else None
        if d == 0 or self.document_indices[-1] != n:
            raise ValueError(f"{idx_path(prefix)}: document indices do not end at the sequence count {n}")
        bsize = os.path.getsize(bin_path(prefix))
        needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if bsize < needed:
            raise ValueError(f"{bin_path(prefix)}: truncated: {idx_path(prefix)} indexes {needed} bytes of tokens, "
                             f"the file has {bsize} bytes")
        # An empty .bin cannot be memory-mapped; keep an empty buffer instead.
        self._bin = np.memmap(bin_path(prefix), mode="r", dtype=np.uint8) if bsize else np.zeros(0, np.uint8)

    def __getstate__(self):  # DataLoader workers re-open the maps instead of pickling them
        return (self.path_prefix, self.multimodal)

    def __setstate__(self, state):
        self.__init__(*state)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence idx, read straight from the mmap."""
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"sequence {idx} has {n} tokens; asked for [{offset}, {offset + length})")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, idx: Union[int, slice]):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous")
            if start >= stop:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = np.frombuffer(self._bin, self.dtype, int(lengths.sum()), int(self.sequence_pointers[start]))
            return np.split(flat, np.cumsum(lengths)[:-1])
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"index must be int or slice, got {type(idx).__name__}")
        if idx < 0:
            idx += len(self)
        return self.get(int(idx))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document doc (its sequences concatenated)."""
        a, b = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if a == b:
            return np.zeros(0, self.dtype)
        total = int(self.sequence_lengths[a:b].sum())
        return np.frombuffer(self._bin, self.dtype, total, int(self.sequence_pointers[a]))

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDatasetBuilder:
    """Streaming writer with Megatron's builder API: add_item / end_document / add_document /
    add_index / finalize. Only the current document's bookkeeping lives in memory."""

    def __init__(self, bin_file: str, dtype=np.int32, multimodal: bool = False):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_file = bin_file
        self.multimodal = multimodal
        self._data = open(bin_file, "wb")
        # Side files beside the .bin; removed at finalize (or by abort()).
        self._side = {k: bin_file + f".{k}.tmp" for k in ("len", "doc", "mode")}
        self._len = open(self._side["len"], "wb")
        self._doc = open(self._side["doc"], "wb")
        self._mode = open(self._side["mode"], "wb") if multimodal else None
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self._write_doc_boundary()  # document_indices start with 0

    def _write_doc_boundary(self):
        self._doc.write(struct.pack("<q", self.sequence_count))

    def add_item(self, tokens, mode: int = 0) -> None:
        arr = _as_array(tokens, self.dtype)
        self._data.write(arr.tobytes())
        self._len.write(struct.pack("<i", arr.size))
        if self._mode:
            self._mode.write(struct.pack("<b", mode))
        self.sequence_count += 1
        self.token_count += arr.size

    def end_document(self) -> None:
        self._write_doc_boundary()
        self.document_count += 1

    def add_document(self, tokens, lengths: Sequence[int], modes: Optional[Sequence[int]] = None) -> None:
        arr = _as_array(tokens, self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"add_document: lengths sum to {int(lengths.sum())} but {arr.size} tokens given")
        self._data.write(arr.tobytes())
        self._len.write(lengths.tobytes())
        if self._mode:
            self._mode.write(np.asarray(modes if modes is not None else [0] * len(lengths), np.int8).tobytes())
        self.sequence_count += len(lengths)
        self.token_count += arr.size
        self.end_document()

    def add_documents(self, tokens, seq_lengths, doc_nseq=None) -> None:
        """Many documents at once (the preprocessor's fast path): doc_nseq[i] sequences make
        document i (default: one sequence per document)."""
        arr = _as_array(tokens, self.dtype)
        seq_lengths = np.asarray(seq_lengths, dtype=np.int32)
        if doc_nseq is None:
            doc_nseq = np.ones(len(seq_lengths), dtype=np.int64)
        self._data.write(arr.tobytes())
        self._len.write(seq_lengths.tobytes())
        if self._mode:
            self._mode.write(np.zeros(len(seq_lengths), np.int8).tobytes())
        bounds = self.sequence_count + np.cumsum(doc_nseq, dtype=np.int64)
        self._doc.write(bounds.tobytes())
        self.sequence_count += len(seq_lengths)
        self.document_count += len(doc_nseq)
        self.token_count += arr.size

    def add_index(self, prefix: str) -> None:
        """Append another dataset (same dtype); its document boundaries shift by our sequence count."""
        other = IndexedDataset(prefix, multimodal=self.multimodal)
        if other.dtype != self.dtype:
            raise ValueError(f"add_index {prefix}: dtype {other.dtype} differs from the builder's {self.dtype}")
        offset = self.sequence_count
        self._len.write(other.sequence_lengths.tobytes())
        for a in range(1, len(other.document_indices), _CHUNK):
            self._doc.write((other.document_indices[a:a + _CHUNK] + offset).tobytes())
        if self._mode:
            self._mode.write(other.sequence_modes.tobytes())
        self.sequence_count += len(other)
        self.document_count += other.num_documents
        self.token_count += int(other.sequence_lengths.sum(dtype=np.int64))
        del other
        with open(bin_path(prefix), "rb") as fh:
            shutil.copyfileobj(fh, self._data, 16 << 20)

    def finalize(self, idx_file: str) -> None:
        """Close the .bin and write the .idx, streaming the side files in chunks."""
        for fh in (self._data, self._len, self._doc, self._mode):
            if fh:
                fh.close()
        item = self.dtype.itemsize
        with open(idx_file, "wb") as out:
            out.write(MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(self.dtype),
                                          self.sequence_count, self.document_count + 1))
            lengths = np.memmap(self._side["len"], np.int32, "r") if self.sequence_count else np.zeros(0, np.int32)
            for a in range(0, self.sequence_count, _CHUNK):
                out.write(lengths[a:a + _CHUNK].tobytes())
            carry = 0  # pointers: exclusive prefix sum of lengths × itemsize, carried across chunks
            for a in range(0, self.sequence_count, _CHUNK):
                nbytes = lengths[a:a + _CHUNK].astype(np.int64) * item
                ptr = np.cumsum(nbytes) - nbytes + carry
                out.write(ptr.tobytes())
                carry += int(nbytes.sum())
            del lengths
            _copy(self._side["doc"], out)
            if self.multimodal:
                _copy(self._side["mode"], out)
        self._remove_side_files()

    def abort(self) -> None:
        """Close and delete everything this builder wrote (an interrupted run)."""
        for fh in (self._data, self._len, self._doc, self._mode):
            if fh and not fh.closed:
                fh.close()
        self._remove_side_files()
        if os.path.exists(self.bin_file):
            os.remove(self.bin_file)

    def _remove_side_files(self):
        for p in self._side.values():
            if os.path.exists(p):
                os.remove(p)


def _as_array(tokens, dtype) -> np.ndarray:
    if hasattr(tokens, "numpy"):  # a torch tensor
        tokens = tokens.numpy()
    return np.ascontiguousarray(np.asarray(tokens).astype(dtype, copy=False)).reshape(-1)


def _copy(src: str, out) -> None:
    with open(src, "rb") as fh:
        shutil.copyfileobj(fh, out, 16 << 20)
