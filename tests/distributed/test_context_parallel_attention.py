"""Context-parallel attention on 4 gloo processes (CP = 4): each --cp-comm-type (p2p ring, a2a,
all_gather), on plain and on packed sequences (documents crossing the zigzag chunks), gives every rank
the output and the dQ, dK, dV of its tokens exactly as full causal attention on one process (fp64)."""
import os

import pytest
import torch

from tests.launch import torchrun

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def diffs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_attention")
    torchrun(os.path.join(HERE, "cp_attention_worker.py"), 4, [tmp, "torch"], timeout=300)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("comm", ["p2p", "a2a", "all_gather"])
def test_cp4_attention_equals_full_attention(diffs, comm, packed):
    for rank, d in enumerate(diffs):
        out, dq, dk, dv = d[(comm, packed)]
        assert max(out, dq, dk, dv) < 1e-12, (rank, d[(comm, packed)])
