"""Data: indexed datasets, tokenizers, GPT sample construction, blending, samplers.

    build_tokenizer(data_cfg)                                    tokenizers.py
    build_train_valid_test_datasets(cfg, tokenizer, sizes)       builder.py
    build_data_loader(dataset, cfg, consumed_samples)            loader.py
"""
from megaflow.data.blended_dataset import BlendedDataset
from megaflow.data.builder import build_train_valid_test_datasets
from megaflow.data.gpt_dataset import GPTDataset, GPTDatasetConfig, MockLowLevelDataset
from megaflow.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megaflow.data.loader import build_data_loader
from megaflow.data.sampler import MegatronPretrainingSampler
from megaflow.data.tokenizers import build_tokenizer

__all__ = ["build_tokenizer", "build_train_valid_test_datasets", "build_data_loader", "IndexedDataset",
           "IndexedDatasetBuilder", "GPTDataset", "GPTDatasetConfig", "MockLowLevelDataset", "BlendedDataset",
           "MegatronPretrainingSampler"]
