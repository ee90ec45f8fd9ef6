"""Build the train/valid/test datasets from a Config, with Megatron-Core's BlendedMegatronDatasetBuilder
semantics: --mock-data; --data-path (one prefix, or weighted prefixes blended) cut by --split; or
--train-data-path / --valid-data-path / --test-data-path, each its own blend.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

import numpy as np

from megaflow.data.blended_dataset import BlendedDataset
from megaflow.data.gpt_dataset import GPTDataset, GPTDatasetConfig, MockLowLevelDataset
from megaflow.data.indexed_dataset import IndexedDataset
from megaflow.data.utils import SPLITS, normalize, parse_blend, parse_split, split_matrix, split_range

logger = logging.getLogger(__name__)


def gpt_config_from(cfg, tokenizer) -> GPTDatasetConfig:
    d = cfg.data
    split = "1,1,1" if d.mock_data else d.split  # Megatron-Core forces an even split for mock data
    pad = getattr(tokenizer, "pad", -1)
    return GPTDatasetConfig(
        random_seed=cfg.training.seed, sequence_length=d.seq_length, eod=tokenizer.eod,
        pad=pad if pad is not None and pad >= 0 and pad != tokenizer.eod else -1,
        split=split, split_matrix=split_matrix(parse_split(split)), path_to_cache=d.data_cache_path,
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss, create_attention_mask=False)


def train_valid_test_num_samples(cfg, train_iters: Optional[int] = None) -> List[int]:
    """Megatron-LM's sample counts: train = iterations × global batch (or --train-samples); valid =
    eval_iters × global batch × (train_iters // eval_interval + 1); test = eval_iters × global batch."""
    t = cfg.training
    gbs = t.global_batch_size
    iters = train_iters if train_iters is not None else t.train_iters
    if iters is None and t.train_samples is not None:
        iters = t.train_samples // gbs
    if iters is None:
        raise ValueError("give --train-iters or --train-samples to size the datasets")
    train = t.train_samples if t.train_samples is not None else iters * gbs
    evals = (iters // t.eval_interval + 1) if t.eval_interval else 0
    return [train, t.eval_iters * gbs * evals, t.eval_iters * gbs]


def build_train_valid_test_datasets(cfg, tokenizer, train_valid_test_num_samples: Sequence[Optional[int]]):
    """(train, valid, test); an entry is None when its split is empty or has no data path.
    Call it on every rank that reads data: index caches are built once (file lock) and mmap-ed."""
    sizes = list(train_valid_test_num_samples) + [None] * (3 - len(train_valid_test_num_samples))
    gcfg = gpt_config_from(cfg, tokenizer)
    d = cfg.data
    if d.mock_data:
        low = MockLowLevelDataset(tokenizer.vocab_size, tokenizer.eod)
        return tuple(_split_datasets(low, None, gcfg.split_matrix, sizes, gcfg))
    if d.data_path:
        return tuple(_build_blend(parse_blend(d.data_path, "--data-path"), gcfg.split_matrix, sizes, gcfg,
                                  per_split=False))
    per_split = (d.train_data_path, d.valid_data_path, d.test_data_path)
    if not any(per_split):
        raise ValueError("no data: give --data-path, --train-data-path/--valid-data-path/--test-data-path, "
                         "or --mock-data")
    out = []
    for i, (paths, flag) in enumerate(zip(per_split, ("--train-data-path", "--valid-data-path",
                                                      "--test-data-path"))):
        blend = parse_blend(paths, flag)
        if blend is None:
            out.append(None)
            continue
        matrix = [None, None, None]
        matrix[i] = (0.0, 1.0)
        spoof = [0, 0, 0]
        spoof[i] = sizes[i]
        out.append(_build_blend(blend, matrix, spoof, gcfg, per_split=True)[i])
    return tuple(out)


def _build_blend(blend, matrix, sizes, gcfg, per_split: bool) -> List:
    prefixes, weights = blend
    # Megatron-Core blends a lone weighted prefix of --data-path (which changes the sample count it
    # draws), but not a lone prefix of a per-split path: keep both quirks so orders stay identical.
    if len(prefixes) == 1 and (weights is None or per_split):
        return _split_datasets(_open(prefixes[0]), prefixes[0], matrix, sizes, gcfg)
    if weights is not None:
        weights = normalize(weights)
        if any(s is None for s, m in zip(sizes, matrix) if m is not None):
            raise ValueError("weighted blends need a sample count for every non-empty split")
        target = [[_per_dataset(s, w, 0.0) for s in sizes] for w in weights]
        buffer = [[_per_dataset(s, w, gcfg.mid_level_dataset_surplus) for s in sizes] for w in weights]
    else:  # no weights: each dataset contributes exactly one epoch
        buffer = [[None] * 3 for _ in prefixes]
    per_prefix = [_split_datasets(_open(p), p, matrix, buf, gcfg) for p, buf in zip(prefixes, buffer)]
    out = [None, None, None]
    for i in range(3):
        if matrix[i] is None:
            continue
        members = [pp[i] for pp in per_prefix]
        if any(m is None for m in members):
            raise ValueError(f"the {SPLITS[i]} split of a blended dataset is empty in "
                             f"{[p for p, m in zip(prefixes, members) if m is None]} (check --split)")
        if weights is not None:
            w, size = weights, sum(t[i] for t in target)
        else:
            w = [len(m) for m in members]
            size = min(sizes[i], sum(w)) if sizes[i] is not None else None
        out[i] = BlendedDataset(members, w, size, gcfg.path_to_cache)
    return out


def _per_dataset(target: Optional[int], weight: float, surplus: float) -> Optional[int]:
    if target is None:
        return None
    return int(math.ceil(math.ceil(target * weight) * (1 + surplus)))


def _open(prefix: str) -> IndexedDataset:
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"data path {prefix!r}: {prefix}.bin / {prefix}.idx not found")
    return IndexedDataset(prefix)


def _split_datasets(low, path, matrix, sizes, gcfg) -> List[Optional[GPTDataset]]:
    n = len(low)
    out = []
    for i, name in enumerate(SPLITS):
        if matrix[i] is None:
            out.append(None)
            continue
        beg, end = split_range(matrix[i], n)
        if end <= beg:  # Megatron-Core would loop forever on an empty split; report it instead
            logger.warning("%s: the %s split is empty (%d sequences, --split %s)", path, name, n, gcfg.split)
            out.append(None)
            continue
        out.append(GPTDataset(low, path, np.arange(beg, end, dtype=np.int32), sizes[i], name, gcfg))
    return out
