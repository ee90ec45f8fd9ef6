"""Capture and restore every random stream a training step touches, in a form that
torch.load(weights_only=True) accepts (tensors, ints, tuples; no numpy objects): Python, numpy, torch's
CPU (and CUDA) default generators, and the tensor-parallel tracker's streams (megaflow.parallel.random),
so dropout after a resume continues exactly where it stopped."""
from __future__ import annotations

import random

import numpy as np
import torch

from megaflow.parallel import device
from megaflow.parallel.random import get_rng_tracker


def get_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(),
           "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
           "torch": torch.get_rng_state()}
    if device.accelerator_rng_states() is not None:
        out["cuda"] = device.accelerator_rng_states()
    out["tracker"] = get_rng_tracker().get_states()  # {stream name: state tensor}
    return out


def set_rng_state(sd: dict) -> None:
    random.setstate(_to_tuples(sd["python"]))
    kind, keys, pos, has_gauss, cached = sd["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(sd["torch"])
    device.set_accelerator_rng_states(sd.get("cuda"))
    if sd.get("tracker"):
        get_rng_tracker().set_states(sd["tracker"])


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
