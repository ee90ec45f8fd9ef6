#!/usr/bin/env python
"""Time to build GPTDataset indices (document, sample, shuffle) for 10^8 tokens: ours vs megatron-core.

Writes an .idx describing 10^8 tokens in documents of realistic lengths (the .bin is a sparse file of
the right size: index building never reads tokens), then builds the train split's indices with
megaflow's GPTDataset (C++ helpers, and the numpy fallback) and with megatron-core 0.16.1's GPTDataset
(its compiled helpers), for one and for several epochs, each from a cold cache, and checks that all
produce the same arrays.

    python bench/dataset_index.py [--tokens 1e8] [--seq-length 2048 256] [--epochs 1 3]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")


def write_index(prefix, tokens, seed=0):
    """Document lengths ~ lognormal (median ~600 tokens, long tail), summing to `tokens`."""
    from megaflow.data.indexed_dataset import MAGIC, VERSION
    import struct
    rng = np.random.RandomState(seed)
    lengths = np.clip(rng.lognormal(6.4, 1.0, size=int(tokens / 600 * 1.3)), 1, 200_000).astype(np.int64)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), tokens) + 1]
    lengths[-1] -= int(lengths.sum() - tokens)
    lengths = lengths[lengths > 0].astype(np.int32)
    n = len(lengths)
    ptr = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * 2)[:-1]])
    with open(prefix + ".idx", "wb") as fh:
        fh.write(MAGIC + struct.pack("<QBQQ", VERSION, 8, n, n + 1))
        fh.write(lengths.tobytes() + ptr.tobytes() + np.arange(n + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as fh:
        fh.truncate(int(lengths.sum()) * 2)
    return n, int(lengths.sum())


def ours(prefix, num_samples, seq, cache, use_cpp):
    from megaflow.data import helpers
    from megaflow.data.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megaflow.data.indexed_dataset import IndexedDataset
    from megaflow.data.utils import parse_split, split_matrix
    saved = helpers._cpp
    if not use_cpp:
        helpers._cpp = None
    try:
        low = IndexedDataset(prefix)
        cfg = GPTDatasetConfig(random_seed=1234, sequence_length=seq, eod=0, split="100,0,0",
                               split_matrix=split_matrix(parse_split("100,0,0")), path_to_cache=cache)
        t = time.perf_counter()
        ds = GPTDataset(low, prefix, np.arange(len(low), dtype=np.int32), num_samples, "train", cfg)
        return time.perf_counter() - t, ds
    finally:
        helpers._cpp = saved


def megatron(prefix, num_samples, seq, cache):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split
    from megatron.core.tokenizers import MegatronTokenizer
    tok = MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=1000)
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=([prefix], None), split="100,0,0",
                           path_to_cache=cache, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, tokenizer=tok)
    low = IndexedDataset(prefix)
    t = time.perf_counter()
    ds = GPTDataset(low, prefix, np.arange(len(low), dtype=np.int32), num_samples, Split.train, cfg)
    return time.perf_counter() - t, ds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=1e8)
    p.add_argument("--seq-length", type=int, nargs="+", default=[2048, 256])
    p.add_argument("--epochs", type=float, nargs="+", default=[1, 3])
    args = p.parse_args()
    from megaflow.data import helpers
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "data")
        n, tokens = write_index(prefix, int(args.tokens))
        print(f"dataset: {tokens:,} tokens in {n:,} documents; "
              f"C++ helpers {'built' if helpers.have_cpp() else 'NOT built (numpy fallback only)'}")
        print(f"{'seq':>6s}{'epochs':>7s}{'samples':>12s}{'megaflow C++':>14s}{'megaflow numpy':>16s}"
              f"{'megatron-core':>15s}{'ratio C++':>11s}")
        for seq, e in [(s, e) for s in args.seq_length for e in args.epochs]:
            num = int(e * tokens / seq) - 1
            times = {}
            results = {}
            for name in ("cpp", "numpy", "megatron"):
                cache = os.path.join(d, f"cache-{name}-{e}")
                if name == "megatron":
                    times[name], results[name] = megatron(prefix, num, seq, cache)
                elif name == "cpp" and not helpers.have_cpp():
                    times[name], results[name] = float("nan"), None
                else:
                    times[name], results[name] = ours(prefix, num, seq, cache, name == "cpp")
                shutil.rmtree(cache, ignore_errors=True)
            ref = results["megatron"]
            for name in ("cpp", "numpy"):
                if results[name] is not None:
                    for a in ("document_index", "sample_index", "shuffle_index"):
                        assert np.array_equal(getattr(results[name], a), getattr(ref, a)), (name, a)
            base = times["cpp"] if helpers.have_cpp() else times["numpy"]
            print(f"{seq:6d}{e:7g}{num:12,d}{times['cpp']:13.3f}s{times['numpy']:15.3f}s{times['megatron']:14.3f}s"
                  f"{times['megatron'] / base:10.2f}x")
        print("ratio = megatron-core time / megaflow time (higher is better for megaflow); all arrays identical")


if __name__ == "__main__":
    main()
