"""The data loader of one data-parallel rank: Megatron's sampler over a dataset, batched by torch."""
from __future__ import annotations

import torch

from megaflow.data.sampler import MegatronPretrainingSampler


def build_data_loader(dataset, cfg, consumed_samples: int = 0):
    """Micro-batches (dicts of [b, s] tensors) of this rank's slice, starting after consumed_samples.
    Returns None for a None dataset."""
    if dataset is None:
        return None
    from megaflow.parallel import state
    ps = state.get()
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=cfg.training.micro_batch_size,
        data_parallel_rank=ps.dp_rank, data_parallel_size=ps.dp_size)
    workers = int(getattr(cfg.data, "num_workers", 0) or 0)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=ps.device.type == "cuda",
        persistent_workers=workers > 0)
