"""Datasets, splits, tokenizer and sample construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaflow.config.fields import _f


@dataclass
class DataConfig:
    data_path: Optional[list] = _f(None, "[weight] prefix pairs of .bin/.idx datasets", action="nargs+")
    split: str = _f("969,30,1", "train,valid,test proportions of --data-path")
    train_data_path: Optional[list] = _f(None, "separate training datasets", action="nargs+")
    valid_data_path: Optional[list] = _f(None, "separate validation datasets", action="nargs+")
    test_data_path: Optional[list] = _f(None, "separate test datasets", action="nargs+")
    data_cache_path: Optional[str] = _f(None, "where GPTDataset index caches go")
    mock_data: bool = _f(False, "synthetic data, no files", action="store_true")
    seq_length: int = _f(128, "tokens per sample")
    tokenizer_type: Optional[str] = _f(None, "tokenizer (NullTokenizer, HuggingFaceTokenizer, ...)")
    tokenizer_model: Optional[str] = _f(None, "tokenizer file or folder")
    vocab_file: Optional[str] = _f(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = _f(None, "GPT-2 BPE merges.txt")
    vocab_size: Optional[int] = _f(None, "vocabulary size for NullTokenizer")
    eod_mask_loss: bool = _f(False, "no loss on the token after an EOD", action="store_true")
    reset_position_ids: bool = _f(False, "restart positions after EOD", action="store_true")
    reset_attention_mask: bool = _f(False, "no attention across EOD", action="store_true")
    num_workers: int = _f(2, "dataloader worker processes")
