"""The single streaming writer of preprocessing: dedup, partition order, temporary names, final rename.

Outputs are `{prefix}_{key}_{level}.bin/.idx`. Everything is written under `*.tmp-{pid}` names and
renamed only after every key's index is complete (.bin before .idx, so a present .idx means a complete
pair); an interrupted or failed run deletes its temporary files and never leaves a complete-looking one.

--partitions P reproduces Megatron's document order: its input lines are dealt round-robin to P
partition files (or in P contiguous blocks with --keep-sequential-samples) that are processed
separately and concatenated. Here each partition is a temporary dataset, merged at the end.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from megaflow.data.indexed_dataset import IndexedDatasetBuilder
from megaflow.data.preprocessing.clean import HashSet
from megaflow.data.preprocessing.encode import Encoded, _select


class OutputWriter:
    def __init__(self, prefix: str, keys: List[str], level: str, dtype, partitions: int = 1, dedup: bool = False):
        self.keys, self.dtype = keys, np.dtype(dtype)
        self.final = {k: f"{prefix}_{k}_{level}" for k in keys}
        self.tag = f".tmp-{os.getpid()}"
        self.partitions = partitions
        # (Contiguous blocks, --keep-sequential-samples, keep input order: the caller passes 1.)
        self.round_robin = partitions > 1
        nb = partitions if self.round_robin else 1
        self.builders: Dict[str, List[IndexedDatasetBuilder]] = {}
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        for k in keys:
            names = [self.final[k] + ".bin" + self.tag] if nb == 1 else \
                [f"{self.final[k]}.part{p}{self.tag}.bin" for p in range(nb)]
            self.builders[k] = [IndexedDatasetBuilder(n, self.dtype) for n in names]
        self.seen = HashSet() if dedup else None
        self.documents = 0
        self.duplicates = 0

    def write(self, enc: Encoded) -> None:
        keep = None
        if self.seen is not None and len(enc.doc_hashes):
            keep = self.seen.add_new(enc.doc_hashes)
            self.duplicates += int((~keep).sum())
        for k in self.keys:
            t, lens, nseq = enc.tokens[k], enc.seq_lengths[k], enc.doc_nseq[k]
            if keep is not None and not keep.all():
                t, lens, nseq = _select(t, lens, nseq, keep)
            if not self.round_robin:
                self.builders[k][0].add_documents(t, lens, nseq)
                continue
            lines = enc.doc_lines if keep is None else enc.doc_lines[keep]
            part = lines % self.partitions
            for p in range(self.partitions):
                sel = part == p
                if sel.any():
                    self.builders[k][p].add_documents(*_select(t, lens, nseq, sel))
        kept = len(enc.doc_lines) if keep is None else int(keep.sum())
        self.documents += kept

    @property
    def tokens(self) -> int:
        """Tokens written so far for the first key."""
        return sum(b.token_count for b in self.builders[self.keys[0]])

    def finalize(self) -> List[str]:
        """Complete every index, merge partitions, then rename all outputs into place."""
        staged = []
        for k in self.keys:
            bins = self.builders[k]
            for b in bins:
                b.finalize(b.bin_file[:-len(".bin")] + ".idx" if len(bins) > 1 else self.final[k] + ".idx" + self.tag)
            if len(bins) > 1:
                merged = IndexedDatasetBuilder(self.final[k] + ".bin" + self.tag, self.dtype)
                for b in bins:
                    merged.add_index(b.bin_file[:-len(".bin")])
                merged.finalize(self.final[k] + ".idx" + self.tag)
                for b in bins:
                    for ext in (".bin", ".idx"):
                        os.remove(b.bin_file[:-len(".bin")] + ext)
            staged.append(k)
        outputs = []
        for k in staged:
            for ext in (".bin", ".idx"):
                os.replace(self.final[k] + ext + self.tag, self.final[k] + ext)
                outputs.append(self.final[k] + ext)
        return outputs

    def abort(self) -> None:
        """Remove every temporary file of this run."""
        for k in self.keys:
            for b in self.builders[k]:
                b.abort()
                idx = b.bin_file[:-len(".bin")] + ".idx"
                if b.bin_file.endswith(".bin") and os.path.exists(idx):
                    os.remove(idx)
            for ext in (".bin", ".idx"):
                p = self.final[k] + ext + self.tag
                if os.path.exists(p):
                    os.remove(p)
