"""Data: indexed datasets, tokenizers, GPT sample construction, blending, samplers.

    build_tokenizer(data_cfg)                                    tokenizers.py
    build_train_valid_test_datasets(cfg, tokenizer, sizes)       builder.py
    build_data_loader(dataset, cfg, consumed_samples)            loader.py

Exports resolve lazily, so the preprocessing tools (which need no torch) start fast.
"""
import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizers", "build_train_valid_test_datasets": "builder",
    "build_data_loader": "loader", "train_valid_test_num_samples": "builder", "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset", "GPTDataset": "gpt_dataset", "GPTDatasetConfig": "gpt_dataset",
    "MockLowLevelDataset": "gpt_dataset", "BlendedDataset": "blended_dataset",
    "MegatronPretrainingSampler": "sampler",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megaflow.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megaflow.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
