"""The dataset index cache: arrays keyed by an md5 of the dataset's JSON description.

File names follow Megatron-Core: `{md5}-{Class}-{split}-{name}.npy` plus `…-description.txt`.
The first process to need an entry builds it under an exclusive file lock (the `filelock` package:
flock on POSIX, msvcrt on Windows); every other process (other ranks, other nodes on a shared
filesystem that supports locks, a later run) waits on the lock, then memory-maps the files.
No collective is involved, so it works whichever subset of ranks builds datasets. Files are written
under temporary names and renamed, so a killed build never leaves a half-written cache entry.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Sequence

import numpy as np
from filelock import FileLock


def description_hash(description: str) -> str:
    return hashlib.md5(description.encode("utf-8")).hexdigest()


def lock_path(cache_dir: str, stem: str) -> str:
    return os.path.join(cache_dir, f"{stem}.lock")


def load_or_build(cache_dir, stem: str, names: Sequence[str], description: str,
                  build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Return {name: array}: memory-mapped from cache_dir when cached, else built (and cached)."""
    if not cache_dir:
        return build()
    os.makedirs(cache_dir, exist_ok=True)
    paths = {n: os.path.join(cache_dir, f"{stem}-{n}.npy") for n in names}
    desc_path = os.path.join(cache_dir, f"{stem}-description.txt")

    def hit():
        return os.path.isfile(desc_path) and all(os.path.isfile(p) for p in paths.values())

    if not hit():
        with FileLock(lock_path(cache_dir, stem)):
            if not hit():
                arrays = build()
                for n, p in paths.items():
                    tmp = f"{p}.tmp{os.getpid()}.npy"
                    np.save(tmp, arrays[n], allow_pickle=False)
                    os.replace(tmp, p)
                tmp = f"{desc_path}.tmp{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.write(description)
                os.replace(tmp, desc_path)  # last: its presence marks the entry complete
                return arrays
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
