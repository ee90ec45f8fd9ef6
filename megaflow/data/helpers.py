"""Dataset-index helpers: the C++ extension (megaflow.data._helpers) when it was built, else numpy.

Both implementations follow Megatron-Core's helpers.cpp semantics exactly and give identical arrays
(tests/unit/test_data_helpers.py compares them):
  build_sample_idx        the [num_samples + 1, 2] (document-index position, token offset) table
  build_blending_indices  greedy weighted interleaving of datasets (dataset_index, dataset_sample_index)
  build_exhaustive_blending_indices   the same, drawing exactly sizes[i] samples from dataset i
"""
from __future__ import annotations

import numpy as np

try:  # built by setup.py when a C++ compiler exists
    from megaflow.data import _helpers as _cpp
except ImportError:  # pragma: no cover - depends on the install
    _cpp = None

_INT32_MAX = np.iinfo(np.int32).max


def have_cpp() -> bool:
    return _cpp is not None


def num_samples_of(num_epochs: int, tokens_per_epoch: int, seq_length: int, drop_last: bool,
                   extra: int) -> int:
    """How many samples build_sample_idx makes (helpers.cpp: the keep-partial case divides in float32)."""
    total = num_epochs * tokens_per_epoch - extra
    if drop_last:
        return total // seq_length
    return int(np.ceil(np.float32(total) / np.float32(seq_length)))


def build_sample_idx(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int, drop_last_partial_sequence: bool = True,
                     add_extra_token_to_sequence: bool = True, use_cpp: bool | None = None) -> np.ndarray:
    """Sample boundaries over the token stream of document_index; int32 when values fit, else int64."""
    extra = 1 if add_extra_token_to_sequence else 0
    if seq_length <= 1 or num_epochs <= 0 or tokens_per_epoch <= 1:
        raise ValueError("build_sample_idx needs seq_length > 1, num_epochs > 0 and tokens_per_epoch > 1")
    wide = max(len(document_index), int(sizes.max()) if len(sizes) else 0) > _INT32_MAX
    dtype = np.int64 if wide else np.int32
    if use_cpp is None:
        use_cpp = _cpp is not None
    if use_cpp:
        fn = _cpp.build_sample_idx_int64 if wide else _cpp.build_sample_idx_int32
        return fn(np.ascontiguousarray(sizes, np.int32), np.ascontiguousarray(document_index, np.int32),
                  int(seq_length), int(num_epochs), int(tokens_per_epoch), bool(drop_last_partial_sequence),
                  extra)
    return _build_sample_idx_numpy(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                   drop_last_partial_sequence, extra).astype(dtype)


def _build_sample_idx_numpy(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                            drop_last, extra) -> np.ndarray:
    """Vectorised: sample k ends at stream position q = k·S; its row is the document position holding
    token q + extra - 1 and the offset of q inside it. Zero-length documents hold no token, so a
    left-sided search over the documents' cumulative ends lands on the right one."""
    num_samples = num_samples_of(num_epochs, tokens_per_epoch, seq_length, drop_last, extra)
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index)]
    ends = np.cumsum(lengths)  # stream position just past each document position
    q = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, q + extra, side="left")
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[0] = (0, 0)
    last = len(lengths) - 1
    inside = pos[1:] <= last
    k = pos[1:][inside]
    out[1:][inside, 0] = k
    out[1:][inside, 1] = q[1:][inside] - (ends[k] - lengths[k])
    # Past the end of the stream (only the kept partial last sample): helpers.cpp pins it to the last
    # document position at offset size - extra.
    out[1:][~inside, 0] = last
    out[1:][~inside, 1] = int(sizes[int(document_index[last])]) - extra
    return out


def build_blending_indices(weights, size: int, use_cpp: bool | None = None):
    """Step k takes the dataset with the largest deficit w_i·max(k,1) − count_i (first on ties)."""
    weights = np.asarray(weights, dtype=np.float64)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    if use_cpp is None:
        use_cpp = _cpp is not None
    if use_cpp:
        _cpp.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights), int(size))
        return dataset_index, dataset_sample_index
    w = weights.tolist()  # Python floats are IEEE doubles: the same arithmetic as the C++ loop
    counts = [0] * len(w)
    n = len(w)
    for k in range(size):
        kd = float(max(k, 1))
        best, best_err = 0, w[0] * kd - counts[0]
        for i in range(1, n):
            err = w[i] * kd - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[k] = best
        dataset_sample_index[k] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes, use_cpp: bool | None = None):
    """Exactly sizes[i] samples from dataset i, interleaved in proportion to the sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    dataset_index = np.zeros(total, dtype=np.int16)
    dataset_sample_index = np.zeros(total, dtype=np.int64)
    if use_cpp is None:
        use_cpp = _cpp is not None
    if use_cpp:
        _cpp.build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, len(sizes))
        return dataset_index, dataset_sample_index
    w = [s / float(total) for s in sizes.tolist()]
    counts = [0] * len(w)
    unspent = [i for i in range(len(w)) if sizes[i] > 0]
    k = 0
    while unspent:
        kd = float(max(k, 1))
        best, best_err = -1, -np.inf
        for i in unspent:
            err = w[i] * kd - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[k] = best
        dataset_sample_index[k] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        k += 1
    return dataset_index, dataset_sample_index
