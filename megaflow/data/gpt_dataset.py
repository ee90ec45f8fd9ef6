"""GPTDataset: fixed-length samples cut from a shuffled stream of documents, in Megatron-Core's order.

For the same .idx, seed, sequence length, split and sample count, the document, sample and shuffle
indices here equal Megatron-Core's GPTDataset's (tests/unit/test_megatron_interop.py), so a run that
moves from Megatron to megaflow sees the same samples in the same order. The recipe (FORMATS.md §2):
one numpy RandomState(seed) shuffles the split's documents tiled over E epochs (the last epoch on its
own when it would supply < 80% of an epoch), the sample index walks that stream in steps of seq_length
(each sample reads one extra token, the next sample's first), and a permutation orders the samples.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from megaflow.data import helpers
from megaflow.data.cache import description_hash, load_or_build

logger = logging.getLogger(__name__)

_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


@dataclass
class GPTDatasetConfig:
    random_seed: int
    sequence_length: int
    eod: int
    pad: int = -1
    split: str = "969,30,1"
    split_matrix: Optional[list] = None
    path_to_cache: Optional[str] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # Megatron-Core's switch: with reset_attention_mask, build the [1, s, s] mask (True), or give the
    # document boundaries as cu_seqlens instead (False: what training uses; O(s), no s×s mask).
    create_attention_mask: bool = True
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    mid_level_dataset_surplus: float = 0.005


class MockLowLevelDataset:
    """Megatron-Core's mock documents: 100,000 documents of 1..4095 tokens (numpy default_rng(0)),
    document i = 1, 2, …, len-1 (mod vocab) followed by EOD. No files needed."""

    size = 100000
    max_sequence_length = 4096

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        rng = np.random.default_rng(seed=0)
        self.sequence_lengths = rng.integers(1, self.max_sequence_length, size=self.size, dtype=np.int32)
        self.path_prefix = None

    def __len__(self) -> int:
        return self.size

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        n = int(self.sequence_lengths[idx])
        doc = np.empty(n, dtype=np.int64)
        doc[:-1] = (np.arange(n - 1) + 1) % self.vocab_size
        doc[-1] = self.eod
        if length is None:
            length = n - offset
        return doc[offset:offset + length]


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length (+1) tokens over `indices` (sequence ids) of a low-level dataset."""

    def __init__(self, dataset, dataset_path: Optional[str], indices: np.ndarray, num_samples: Optional[int],
                 index_split: str, config: GPTDatasetConfig):
        self.dataset = dataset
        self.dataset_path = dataset_path
        self.indices = np.asarray(indices, dtype=np.int32)
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config
        self.unique_identifiers = OrderedDict([
            ("class", type(self).__name__), ("dataset_path", dataset_path), ("num_samples", num_samples),
            ("index_split", index_split), ("random_seed", config.random_seed),
            ("sequence_length", config.sequence_length), ("split", config.split),
            ("split_matrix", config.split_matrix),
            ("add_extra_token_to_sequence", config.add_extra_token_to_sequence),
            ("drop_last_partial_validation_sequence", config.drop_last_partial_validation_sequence),
            # The data itself (cheaply: counts and file sizes), so regenerated files never reuse a stale entry.
            ("num_sequences", len(dataset)), ("data_bytes", _file_sizes(dataset_path)),
        ])
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)
        self.unique_description_hash = description_hash(self.unique_description)
        self.document_index, self.sample_index, self.shuffle_index = self._build_indices()

    # ------------------------------------------------------------------ indices
    def _cache_dir(self) -> Optional[str]:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        if self.dataset_path is None:  # mock data: nothing on disk to sit beside
            return None
        return os.path.join(os.path.dirname(os.path.abspath(self.dataset_path)), "cache", "GPTDataset_indices")

    def _build_indices(self):
        stem = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split}"
        arrays = load_or_build(self._cache_dir(), stem, _INDEX_NAMES, self.unique_description, self._compute)
        return tuple(arrays[n] for n in _INDEX_NAMES)

    def num_tokens_per_epoch(self) -> int:
        return int(np.sum(self.dataset.sequence_lengths[self.indices], dtype=np.int64))

    def num_epochs(self, tokens_per_epoch: int) -> int:
        if self.num_samples is None:
            return 1
        needed = self.num_samples * self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        return max(1, -(-needed // tokens_per_epoch))  # ceil: the smallest E with E·T >= needed

    def _compute(self) -> Dict[str, np.ndarray]:
        cfg, seq = self.config, self.config.sequence_length
        extra = int(cfg.add_extra_token_to_sequence)
        tokens_per_epoch = self.num_tokens_per_epoch()
        if tokens_per_epoch <= 1:
            raise ValueError(f"{self.dataset_path or 'mock data'}: the {self.index_split} split has "
                             f"{tokens_per_epoch} tokens; cannot build samples (check --split)")
        num_epochs = self.num_epochs(tokens_per_epoch)
        separate_final_epoch = False
        if num_epochs > 1:
            sans_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq
            from_final = self.num_samples - sans_final
            per_epoch = (tokens_per_epoch - extra) // seq
            assert 0 <= from_final <= per_epoch + 1
            separate_final_epoch = from_final < int(0.80 * per_epoch)

        rng = np.random.RandomState(cfg.random_seed)
        document_index = _build_document_index(self.indices, num_epochs, rng, separate_final_epoch)
        drop_last = cfg.drop_last_partial_validation_sequence if self.index_split == "valid" else True
        sample_index = helpers.build_sample_idx(self.dataset.sequence_lengths, document_index, seq, num_epochs,
                                                tokens_per_epoch, drop_last, bool(extra))
        num = sample_index.shape[0] - 1
        first = sans_final if separate_final_epoch else num
        shuffle_index = _build_shuffle_index(first, num, rng)
        logger.info("GPTDataset %s: %d samples, %d epochs", self.index_split, num, num_epochs)
        return dict(document_index=document_index, sample_index=sample_index, shuffle_index=shuffle_index)

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + extra token ids of sample idx (after shuffling), padded with cfg.pad."""
        extra = int(self.config.add_extra_token_to_sequence)
        i = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(x) for x in self.sample_index[i])
        doc_end, off_end = (int(x) for x in self.sample_index[i + 1])
        if doc_beg == doc_end:
            parts = [self.dataset.get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + extra)]
        else:
            parts = []
            for j in range(doc_beg, doc_end + 1):
                offset = off_beg if j == doc_beg else 0
                length = off_end + extra if j == doc_end else None
                parts.append(self.dataset.get(int(self.document_index[j]), offset, length))
        want = self.config.sequence_length + extra
        have = sum(len(p) for p in parts)
        if have < want:
            parts.append(np.full(want - have, self.config.pad, dtype=np.int64))
        return np.concatenate(parts, dtype=np.int64)

    def __getitem__(self, idx) -> Dict[str, torch.Tensor]:
        cfg = self.config
        text = torch.from_numpy(self.sample_tokens(int(idx)))
        if cfg.add_extra_token_to_sequence:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:
            tokens, labels = text, torch.roll(text, -1)
            labels[-1] = cfg.pad
        sample = masks_and_position_ids(tokens, cfg.eod, cfg.reset_position_ids, cfg.reset_attention_mask,
                                        cfg.eod_mask_loss, cfg.create_attention_mask)
        sample["loss_mask"][labels == cfg.pad] = 0.0
        tokens[tokens == cfg.pad] = 0  # padding must still be a valid embedding row
        labels[labels == cfg.pad] = 0
        sample["tokens"], sample["labels"] = tokens, labels
        return sample


def _file_sizes(prefix: Optional[str]):
    if prefix is None:
        return None
    return [os.path.getsize(prefix + ext) for ext in (".idx", ".bin") if os.path.exists(prefix + ext)]


def masks_and_position_ids(tokens: torch.Tensor, eod: int, reset_position_ids: bool,
                           reset_attention_mask: bool, eod_mask_loss: bool,
                           create_attention_mask: bool = True) -> Dict[str, torch.Tensor]:
    """Megatron's left-to-right masks, vectorised. loss_mask 0 on EOD inputs (with eod_mask_loss);
    positions restart after each EOD (reset_position_ids); attention_mask [1, s, s] bool, True =
    masked, blocks attention across EODs (only built with reset_attention_mask). Without
    create_attention_mask the same documents come as cu_seqlens [s + 1] int64: 0, the start of each
    document after an EOD, s, then s repeated (a fixed length, so samples batch)."""
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float32)
    is_eod = tokens == eod
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = torch.arange(s, dtype=torch.long)
    out = {"loss_mask": loss_mask}
    if reset_position_ids or reset_attention_mask:
        # doc_start[j] = 1 + the last EOD index before j (0 when none)
        marker = torch.zeros(s, dtype=torch.long)
        eod_at = torch.nonzero(is_eod[:-1], as_tuple=True)[0]
        marker[eod_at + 1] = eod_at + 1
        doc_start = torch.cummax(marker, dim=0).values
        if reset_attention_mask and not create_attention_mask:
            cu = torch.full((s + 1,), s, dtype=torch.long)
            cu[0] = 0
            cu[1:1 + eod_at.numel()] = eod_at + 1
            out["cu_seqlens"] = cu
        elif reset_attention_mask:
            cols = positions.view(1, s)
            allowed = (cols <= positions.view(s, 1)) & (cols >= doc_start.view(s, 1))
            out["attention_mask"] = (~allowed).unsqueeze(0)
        if reset_position_ids:
            positions = positions - doc_start
    out["position_ids"] = positions
    return out


def _build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                          separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = _build_document_index(documents, num_epochs - 1, rng, False)
    last = _build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))
