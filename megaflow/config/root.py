"""The whole configuration: one dataclass per section, and the section registry the CLI reads.

A new section (MoE, context parallelism, ...) is a dataclass in its own module plus one entry in
SECTIONS and one field in Config."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from megaflow.config.data import DataConfig
from megaflow.config.model import ModelConfig
from megaflow.config.moe import MoEConfig
from megaflow.config.parallel import ParallelConfig
from megaflow.config.resilience import ResilienceConfig
from megaflow.config.performance import PerformanceConfig
from megaflow.config.training import CheckpointConfig, LoggingConfig, TrainingConfig


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig, "data": DataConfig,
            "training": TrainingConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
            "resilience": ResilienceConfig, "performance": PerformanceConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    # Derived at validation from the world size; not flags.
    world_size: int = 1
    data_parallel_size: int = 1
    vocab_size: Optional[int] = None         # the tokenizer's vocabulary (NullTokenizer adds its EOD)
    padded_vocab_size: Optional[int] = None  # vocab_size rounded up for TP (pad_vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, klass in SECTIONS.items():
            setattr(cfg, section, klass(**d.get(section, {})))
        for k in ("world_size", "data_parallel_size", "vocab_size", "padded_vocab_size"):
            if k in d:
                setattr(cfg, k, d[k])
        return cfg


