"""BlendedDataset: interleave several GPTDatasets by weight (Megatron-Core's blending order).

Step k of the blend takes the dataset whose share lags most behind its weight (helpers.py); the
dataset_index / dataset_sample_index arrays are cached like the GPTDataset indices.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import List, Optional

import numpy as np
import torch

from megaflow.data import helpers
from megaflow.data.cache import description_hash, load_or_build
from megaflow.data.utils import normalize


class BlendedDataset(torch.utils.data.Dataset):
    """size None: every dataset contributes exactly weights[i] (integer) samples."""

    def __init__(self, datasets: List, weights: List[float], size: Optional[int], path_to_cache: Optional[str]):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset")
        if len(datasets) >= 32767:
            raise ValueError("at most 32766 datasets can be blended (int16 dataset index)")
        if size is not None:
            weights = normalize(weights)
        self.datasets, self.weights, self.size = datasets, list(weights), size
        self.split = datasets[0].index_split
        self.unique_identifiers = OrderedDict([
            ("class", type(self).__name__),
            ("datasets", [d.unique_identifiers for d in datasets]),
            ("split", self.split), ("weights", self.weights), ("size", size)])
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)
        stem = f"{description_hash(self.unique_description)}-{type(self).__name__}-{self.split}"
        arrays = load_or_build(path_to_cache, stem, ("dataset_index", "dataset_sample_index"),
                               self.unique_description, self._compute)
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]

    def _compute(self):
        if self.size is not None:
            di, dsi = helpers.build_blending_indices(self.weights, self.size)
        else:
            di, dsi = helpers.build_exhaustive_blending_indices([int(w) for w in self.weights])
        ids, counts = np.unique(di, return_counts=True)
        for i, c in zip(ids, counts):
            if len(self.datasets[i]) < c:
                raise IndexError(f"the {self.split} blend asks dataset {i} ({self.datasets[i].dataset_path}) for "
                                 f"{c} samples but it has {len(self.datasets[i])}")
        return dict(dataset_index=di, dataset_sample_index=dsi)

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, idx: int):
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
