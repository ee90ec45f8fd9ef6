"""Megatron's MegatronPretrainingSampler: sequential, resumable, sliced across data-parallel ranks.

Samples are taken in order from `consumed_samples`; every global micro-batch (micro_batch_size ×
data_parallel_size consecutive samples) is cut into DP contiguous slices and this rank yields its own.
Resuming with the consumed-sample count of a checkpoint continues exactly where the run stopped.
"""
from __future__ import annotations


class MegatronPretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed samples ({consumed_samples}) >= the dataset's {total_samples} samples: "
                             "ask for more samples (--train-iters/--train-samples) or a larger dataset")
        if micro_batch_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad sampler geometry: micro batch {micro_batch_size}, "
                             f"rank {data_parallel_rank} of {data_parallel_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def _slice(self):
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __iter__(self):
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                a, b = self._slice()
                yield batch[a:b]
                batch = []
        if batch and not self.drop_last:  # the last, partial global batch
            a, b = self._slice()
            if batch[a:b]:
                yield batch[a:b]
